"""The ``fastalign`` command: ``--version`` and the ``ops`` table (as installed, in a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import fastalign
from fastalign import cli
from fastalign.ops import dispatch

CORE_OPS = ("token_logprobs", "logprobs_from_logits", "sequence_logprobs", "kl_penalty", "group_advantages",
            "rloo_advantages", "gae", "whiten", "policy_loss", "value_loss", "dpo_loss", "simpo_loss",
            "bradley_terry_loss")


def _command() -> list[str]:
    """The installed console script, else the module it points to."""
    script = shutil.which("fastalign", path=os.path.dirname(sys.executable)) or shutil.which("fastalign")
    return [script] if script else [sys.executable, "-m", "fastalign.cli"]


def _table(text: str) -> dict[str, list[str]]:
    """Rows of the ops table: op -> cells per backend, from the header line to the blank line."""
    lines = text.splitlines()
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        op, *cells = line.split()
        rows[op] = cells
    return rows


@pytest.fixture(scope="module")
def cli_runs():
    """Run ``fastalign --version`` and ``fastalign ops`` at once (each start imports torch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTALIGN_BACKEND", "TRITON_INTERPRET")}
    procs = {args[0]: subprocess.Popen(_command() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=env)
             for args in (["--version"], ["ops"])}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (proc.returncode, out, err)
    return results


def test_version(cli_runs):
    code, out, err = cli_runs["--version"]
    assert code == 0, err
    assert out.strip() == f"fastalign {fastalign.__version__}"


def test_ops_lists_every_op_and_backend(cli_runs):
    code, out, err = cli_runs["ops"]
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header == ["op", "torch", "cpu", "triton", "cuda"]
    rows = _table(out)
    assert set(CORE_OPS) <= set(rows), set(CORE_OPS) - set(rows)
    cpu_ok = dispatch.backends()["cpu"].available
    for op in CORE_OPS:
        cells = rows[op]
        assert len(cells) == 4 and all(c in ("yes", "-", "unavailable") for c in cells), (op, cells)
        assert cells[0] == "yes", op
        if "cpu" in dispatch.implementations(op):
            assert cells[1] == ("yes" if cpu_ok else "unavailable"), op
    footer = out.split("backends on this machine:")[1]
    for name, status in dispatch.backends().items():
        if name == "triton":  # this process may run with the interpreter on; the subprocess does not
            continue
        assert f"{name:<7} {'available  ' if status.available else 'unavailable'}  {status.reason}" in footer


def test_ops_table_in_process_matches_the_registry(capsys):
    assert cli.main(["ops"]) == 0
    rows = _table(capsys.readouterr().out)
    assert sorted(rows) == dispatch.registered_ops()
    status = dispatch.backends()
    for op, cells in rows.items():
        impls = dispatch.implementations(op)
        expected = ["-" if b not in impls else ("yes" if status[b].available else "unavailable")
                    for b in dispatch.BACKENDS]
        assert cells == expected, op


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "ops" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_flow_help_lists_every_config_key(capsys):
    import dataclasses

    from fastalign.engine.config import DPOConfig

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dpo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(DPOConfig):
        assert f"--{f.name} (" in out, f.name
    assert "--loss_type (str, default 'sigmoid')" in out and "sigmoid | hinge | ipo | robust" in out


def test_every_registered_flow_is_a_command_with_its_config_keys(capsys):
    from fastalign.flows import FLOWS

    assert cli.main([]) == 2
    listing = capsys.readouterr().out
    commands = {line.split()[0] for line in listing.splitlines() if line.startswith("    ") and line[4] != " "}
    assert set(FLOWS) | {"ops", "bench", "pipeline", "plan", "experiment"} == commands
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ppo", "--help"])
    assert exit_info.value.code == 0
    assert "--kl_coef (float, default 0.05)" in capsys.readouterr().out


NEW_FLOW = '''
from dataclasses import dataclass
from pathlib import Path

from fastalign.engine.config import TrainConfig, knob


@dataclass
class EchoConfig(TrainConfig):
    greeting: str = knob("hello", "what the flow writes into its run folder")


def run(cfg: EchoConfig) -> dict:
    folder = Path(cfg.output_dir) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "greeting.txt").write_text(cfg.greeting)
    return {"greeting": cfg.greeting}
'''


def test_a_new_flow_is_one_module_and_one_registry_line(tmp_path, monkeypatch, capsys):
    """A module with its config class and ``run``, plus one FLOWS entry: the CLI lists it, its ``--help`` lists
    its keys, it runs with ``--key value`` overrides and a wrong key is refused like any flow's."""
    from fastalign.flows import FLOWS, Flow

    (tmp_path / "echo_flow.py").write_text(NEW_FLOW)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(FLOWS, "echo", Flow("echo", "EchoConfig", "writes a greeting", module="echo_flow"))

    assert cli.main([]) == 2
    assert "writes a greeting" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["echo", "--help"])
    assert exit_info.value.code == 0
    assert "--greeting (str, default 'hello'): what the flow writes into its run folder" in capsys.readouterr().out
    assert cli.main(["echo", "--greeting", "hi", "--output_dir", str(tmp_path), "--name", "run"]) == 0
    assert (tmp_path / "run" / "greeting.txt").read_text() == "hi"
    assert cli.main(["echo", "--greting", "hi"]) == 1
    assert "did you mean 'greeting'" in capsys.readouterr().err
