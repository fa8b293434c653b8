"""Run folders: written only after setup, never silently reused, locked while in use; resume and config changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from fastalign.engine import checkpoint as ckpt
from fastalign.engine import runs
from fastalign.engine.config import SFTConfig, load_config
from fastalign.engine.optim import build_optimizer, build_scheduler, lr_factor
from fastalign.engine.runs import RunFolderError


def _data(tmp_path, rows=8):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) + "\n"
                            for i in range(rows)))
    return str(path)


def _sft(tmp_path, name, **over):
    from fastalign.flows import sft

    values = dict(output_dir=str(tmp_path / "runs"), name=name, dataset=_data(tmp_path), num_examples=0,
                  batch_size=4, max_steps=2, save_every=1, warmup_steps=0, log_every=1, threads=1, progress=False)
    values.update(over)
    return sft.run(load_config(SFTConfig, overrides=values))


def test_a_failed_setup_writes_nothing_and_an_existing_run_needs_resume_or_overwrite(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="row 1 field 'messages' is empty"):
        _sft(tmp_path, "fresh", dataset=str(bad))
    assert not (tmp_path / "runs" / "fresh").exists()

    _sft(tmp_path, "done")
    run_dir = tmp_path / "runs" / "done"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(RunFolderError, match="already holds a run; pass --resume .* --overwrite"):
        _sft(tmp_path, "done")
    # --overwrite replaces it only once setup succeeded: a bad dataset leaves the old run as it was.
    with pytest.raises(ValueError, match="row 1 field 'messages' is empty"):
        _sft(tmp_path, "done", dataset=str(bad), overwrite=True)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    _sft(tmp_path, "done", overwrite=True, max_steps=1)
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-0000001"]
    with pytest.raises(RunFolderError, match="contradict"):
        _sft(tmp_path, "done", overwrite=True, resume=True)


def test_resume_needs_a_checkpoint_unless_auto(tmp_path):
    with pytest.raises(RunFolderError, match=r"does not exist, so there is nothing to resume; pass --resume auto"):
        _sft(tmp_path, "new", resume=True)
    assert not (tmp_path / "runs" / "new").exists()
    report = _sft(tmp_path, "new", resume="auto", max_steps=1)
    assert report["steps"] == 1 and ckpt.latest_checkpoint(tmp_path / "runs" / "new").name == "step-0000001"
    # A folder whose run crashed before its first checkpoint: resume refuses, auto starts afresh.
    crashed = tmp_path / "runs" / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(RunFolderError, match="has no complete checkpoint"):
        _sft(tmp_path, "crashed", resume=True)
    _sft(tmp_path, "crashed", resume="auto", max_steps=1)
    assert yaml.safe_load((crashed / "config.yaml").read_text())["resume"] == "auto"


def test_resume_applies_schedule_changes_and_refuses_the_rest(tmp_path):
    _sft(tmp_path, "r", max_steps=2, lr=1e-3)
    run_dir = tmp_path / "runs" / "r"
    with pytest.raises(RunFolderError, match=r"'batch_size' \(4 -> 8\).*resume can change only .*'?lr"):
        _sft(tmp_path, "r", resume=True, max_steps=3, batch_size=8)
    with pytest.raises(RunFolderError, match=r"'max_steps' \(1\) is below the checkpoint's step 2"):
        _sft(tmp_path, "r", resume=True, max_steps=1)
    _sft(tmp_path, "r", resume=True, max_steps=4, lr=5e-3)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["lr"] == 5e-3  # what the run used
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    # Steps 3-4 ran at the new peak lr on the new horizon; steps 1-2 were logged by the first run.
    assert logged[3] == pytest.approx(5e-3 * lr_factor(3, 0, 4, 0.1))
    assert logged[4] == pytest.approx(5e-3 * lr_factor(4, 0, 4, 0.1))
    assert logged[2] == pytest.approx(1e-3 * lr_factor(2, 0, 2, 0.1))


def test_scheduler_resumes_its_position_with_this_runs_lr():
    class Cfg:
        lr, weight_decay, adam_beta1, adam_beta2, adam_eps = 1e-2, 0.0, 0.9, 0.98, 1e-8
        warmup_steps, max_steps, min_lr_ratio = 2, 10, 0.1

    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([p], Cfg)
    sched = build_scheduler(opt, Cfg)
    for _ in range(4):
        opt.step()
        sched.step()
    same_opt = build_optimizer([p], Cfg)
    same = build_scheduler(same_opt, Cfg)
    same_opt.load_state_dict(opt.state_dict())
    same.load_state_dict(sched.state_dict())
    assert same.get_last_lr() == sched.get_last_lr() and same_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    Cfg.lr = 3e-2
    new_opt = build_optimizer([p], Cfg)
    new = build_scheduler(new_opt, Cfg)
    new_opt.load_state_dict(opt.state_dict())
    new.load_state_dict(sched.state_dict())
    assert new_opt.param_groups[0]["lr"] == pytest.approx(3 * opt.param_groups[0]["lr"])
    new_opt.step()
    new.step()
    assert new.get_last_lr()[0] == pytest.approx(3e-2 * lr_factor(5, 2, 10, 0.1))


_HOLDER = textwrap.dedent("""
    import sys, time
    from fastalign.engine.runs import acquire_run_lock
    acquire_run_lock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold_lock(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_refuses_a_second_process_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by pid {holder.pid} on .*choose another --name"):
            runs.acquire_run_lock(run_dir)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert runs.lock_path(run_dir).exists()  # left behind by the killed process: stale
    runs.acquire_run_lock(run_dir)
    assert f"pid {os.getpid()} " in runs.lock_path(run_dir).read_text()
    runs.release_run_locks()
    assert not runs.lock_path(run_dir).exists()


def test_a_run_holds_its_lock_until_the_next_run_in_the_process(tmp_path):
    _sft(tmp_path, "held", max_steps=1)
    lock = runs.lock_path(tmp_path / "runs" / "held")
    probe = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(120)", ""),
                            str(tmp_path / "runs" / "held")], capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "is in use by pid" in probe.stderr
    runs.release_run_locks()
    assert not lock.exists()
    again = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(120)", ""),
                            str(tmp_path / "runs" / "held")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr


def test_the_pipeline_refuses_an_existing_pipeline_folder(tmp_path, capsys):
    from fastalign import cli

    (tmp_path / "p" / "sft").mkdir(parents=True)
    (tmp_path / "p" / "sft" / "config.yaml").write_text("seed: 0\n")
    assert cli.main(["pipeline", "--quick", "--output_dir", str(tmp_path), "--name", "p"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a pipeline run; pass --overwrite" in err[0]
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["sft"]
