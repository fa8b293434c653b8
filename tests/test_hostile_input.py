"""Hostile input as a new user meets it: ``fastalign sft`` subprocesses on the tiny model.

Each case asserts the exit code, a one-line error naming the problem (no traceback), and that no existing run
folder changed (a hash of every file before and after) or, for a new name, that no folder was created.
The ops-level cases (labels out of range with value checks off, masks, NaN) are in test_hostile_ops.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ARGS = ["--max_steps", "2", "--save_every", "1", "--batch_size", "4", "--num_examples", "0", "--threads", "1",
        "--progress", "false", "--warmup_steps", "0"]


def _rows(n=8):
    return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(root: Path, *args, env=None):
    """``fastalign sft`` with the small-run defaults in ``root``; returns the finished process."""
    cmd = [sys.executable, "-m", "fastalign.cli", "sft", "--output_dir", str(root / "runs"),
           "--dataset", str(root / "data.jsonl"), *ARGS, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                          env=dict(os.environ, **(env or {})))


def tree_hash(folder: Path) -> dict:
    """Every file under ``folder`` (relative path -> sha256) and every folder (-> 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(proc, *needles):
    """Non-zero exit, no traceback, and a last stderr line 'fastalign sft: error: ...' holding every needle."""
    assert proc.returncode != 0, f"exit 0; stdout: {proc.stdout[-1000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("fastalign sft: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
    return lines[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with data.jsonl and a finished run runs/done (2 steps, checkpoints at 1 and 2)."""
    root = tmp_path_factory.mktemp("hostile")
    _write_jsonl(root / "data.jsonl", _rows())
    proc = cli(root, "--name", "done")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "runs" / "done" / "eval.json").exists()
    return root


@pytest.fixture
def done(workdir):
    """The finished run's folder and its hash; the test asserts the hash is unchanged at the end."""
    run_dir = workdir / "runs" / "done"
    before = tree_hash(run_dir)
    yield run_dir
    assert tree_hash(run_dir) == before, "the existing run folder changed"


def assert_no_new_run(workdir, name):
    assert not (workdir / "runs" / name).exists(), f"a failed run left runs/{name}"


# --------------------------------------------------------------------------------- run folders (A, I, J)
def test_reusing_a_finished_runs_name_is_refused(workdir, done):
    line = assert_one_line_error(cli(workdir, "--name", "done"), "runs/done already holds a run", "--resume",
                                 "--overwrite")
    assert "choose another --name" in line


def test_overwrite_with_bad_data_leaves_the_old_run_as_it_was(workdir, done):
    """Issue A: the run is validated (here: its data) before the old folder is touched."""
    (workdir / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n'
                                           b'{"prompt": "caf\xe9", "completion": "x"}\n')
    assert_one_line_error(cli(workdir, "--name", "done", "--overwrite", "--dataset", workdir / "latin1.jsonl"),
                          "latin1.jsonl: row 2 is not UTF-8 text (byte 0xe9 at column 16)")


def test_resume_without_a_checkpoint_says_so(workdir):
    assert_one_line_error(cli(workdir, "--name", "never", "--resume"), "runs/never does not exist",
                          "nothing to resume", "--resume auto")
    assert_no_new_run(workdir, "never")


def test_a_second_process_on_the_same_run_is_refused(workdir, done):
    """Issue J: the lock is held for the run's lifetime; here by a process that sleeps with it."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from fastalign.engine.runs import acquire_run_lock
        acquire_run_lock({str(done)!r})
        print("locked", flush=True)
        time.sleep(300)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_one_line_error(cli(workdir, "--name", "done", "--resume", "--max_steps", "3"),
                              f"runs/done is in use by pid {holder.pid}")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


# ------------------------------------------------------------------------------------- resume (G, H)
def test_resume_refuses_a_changed_batch_size(workdir, done):
    assert_one_line_error(cli(workdir, "--name", "done", "--resume", "--max_steps", "3", "--batch_size", "8"),
                          "config key 'batch_size' (4 -> 8) differs from the checkpoint's run", "resume can change "
                          "only")


def test_resume_refuses_a_planted_pickle_and_runs_nothing(workdir):
    """Issue G: an object whose __reduce__ runs code, planted in the latest checkpoint's optimizer state."""
    planted = workdir / "runs" / "planted"
    shutil.copytree(workdir / "runs" / "done", planted)
    latest = planted / "checkpoints" / (planted / "checkpoints" / "latest").read_text().strip()
    marker = workdir / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (latest / "optimizer.json").unlink()
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, latest / "optimizer.pt")
    before = tree_hash(planted)
    assert_one_line_error(cli(workdir, "--name", "planted", "--resume", "--max_steps", "3"),
                          "optimizer.pt was refused", "could run code", "convert")
    assert not marker.exists(), "the planted pickle ran"
    assert tree_hash(planted) == before


# ------------------------------------------------------------------------------------- data and config (B-E)
def test_an_empty_target_is_rejected_naming_the_row(workdir):
    data = _write_jsonl(workdir / "empty.jsonl", [_rows(1)[0], {"messages": []}])
    assert_one_line_error(cli(workdir, "--name", "empty", "--dataset", data),
                          "empty.jsonl: row 2 field 'messages' is empty")
    assert_no_new_run(workdir, "empty")


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "row 2 field 'messages' turn 2 (the assistant reply, the target) is empty"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "row 2 field 'messages' has no assistant turn (roles: ['system', 'user'])"),
    ({"prompt": "1+1=", "completion": ""}, "row 2 field 'completion' is empty"),
    ({"prompt": "1+1=", "completion": [{"role": "assistant", "content": ""}]},
     "row 2 field 'completion' turn 1 (the assistant reply, the target) is empty"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": ""}, "row 2 field 'rejected' is empty"),
])
def test_every_empty_target_is_rejected_alike(tmp_path, row, needle):
    """The same reader the CLI case above runs through, in-process for the other shapes of an empty target."""
    from fastalign.data import loading

    first = {"prompt": "1+1=", "chosen": "2", "rejected": "3"} if "chosen" in row else _rows(1)[0]
    data = _write_jsonl(tmp_path / "empty.jsonl", [first, row])
    with pytest.raises(ValueError, match=f"empty.jsonl: {re.escape(needle)}"):
        loading.load_rows(data, "preferences" if "chosen" in row else "sft")


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(workdir):
    (workdir / "bad.yaml").write_text("lr: 0.001\nmax_steps: [2\nbatch_size: 4\n")
    assert_one_line_error(cli(workdir, "--name", "yaml", "--config", workdir / "bad.yaml"),
                          "bad.yaml' is not valid YAML at line 3, column")
    assert_no_new_run(workdir, "yaml")


def test_a_missing_local_file_is_never_looked_up_on_the_hub(workdir):
    """Issue E: 'bad/nope.jsonl' has the shape of a hub id 'owner/name' but a data-file suffix."""
    proc = cli(workdir, "--name", "nope", "--dataset", "bad/nope.jsonl")
    assert_one_line_error(proc, "dataset file 'bad/nope.jsonl' does not exist (a local path")
    assert "huggingface" not in proc.stderr.lower()
    assert_no_new_run(workdir, "nope")
