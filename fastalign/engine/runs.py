"""Run folders: threads and seeds, ``runs/<name>/`` with its ``config.yaml``, and the final ``eval.json``.

A run never damages another run's folder:

* :func:`start_run` only *checks* (name free, or ``--resume`` / ``--overwrite`` given; a checkpoint to
  resume from; config changes on resume allowed) and takes the run's lock; it writes nothing into
  ``runs/<name>/``. The flow then loads its model and data, which may fail without leaving a trace.
* :func:`commit_run`, called when setup is done (by the trainer, the first checkpoint or the logger,
  whichever comes first), replaces the old folder on ``--overwrite``, creates the folder and writes
  ``config.yaml`` — the config the run actually uses.
* The lock ``<output_dir>/.<name>.lock`` is an ``flock`` held for the process's lifetime: a second
  process on the same folder is refused, naming the holder; a lock file left by a dead process holds
  no ``flock`` and is simply taken over.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import random
import shutil
import socket
import time
import typing
from pathlib import Path

import torch
import yaml

from .config import RESUME_APPLIED, RESUME_IGNORED, _convert, resume_mode, save_config
from .distributed import DistState, broadcast_object, init_distributed


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (taken, locked, nothing to resume, a refused config change)."""


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------ locks
_held_locks: dict[str, tuple[int, Path]] = {}


def lock_path(run_dir) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def acquire_run_lock(run_dir) -> Path:
    """Hold ``lock_path(run_dir)`` until :func:`release_run_locks` or the process exits; RunFolderError if another
    live process holds it."""
    import fcntl

    path = lock_path(run_dir)
    key = str(path.resolve())
    if key in _held_locks:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"run folder {run_dir} is in use by {holder} (lock {path}); wait for that run to "
                                 "end or choose another --name") from None
        # Its previous holder may have removed the file between our open and our lock: lock the current one.
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _held_locks[key] = (fd, path)
    return path


def release_run_locks():
    """Release every run lock this process holds (removing the files first, while still locked)."""
    for key, (fd, path) in list(_held_locks.items()):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        del _held_locks[key]


atexit.register(release_run_locks)


# ------------------------------------------------------------------------------------------ the folder
@dataclasses.dataclass
class _PendingRun:
    cfg: object
    state: DistState
    replace_old: bool  # --overwrite, or --resume auto over a folder without a checkpoint


_pending: dict[str, _PendingRun] = {}


def _key(run_dir) -> str:
    return str(Path(run_dir).resolve())


def holds_run(run_dir) -> bool:
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(run_dir.iterdir())


def _check_name(name: str):
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise RunFolderError(f"config key 'name' must be a relative folder name under output_dir (no '..'), "
                             f"got {name!r}")


def _saved_config(checkpoint: Path, run_dir: Path) -> dict | None:
    """The config of the run that wrote ``checkpoint`` (its copy, else the run folder's), as a dict."""
    for path in (checkpoint / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise RunFolderError(f"--resume: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
            return data if isinstance(data, dict) else None
    return None


def resume_changes(cfg, saved: dict, source) -> dict:
    """``{key: (old, new)}`` for the knobs ``cfg`` changes and resume applies; RunFolderError for any other change."""
    hints = typing.get_type_hints(type(cfg))
    applied, refused = {}, []
    for f in dataclasses.fields(cfg):
        if f.name in RESUME_IGNORED or f.name not in saved:
            continue
        new = getattr(cfg, f.name)
        try:
            old = _convert(f.name, saved[f.name], hints[f.name], str(source))
        except (ValueError, TypeError):
            old = saved[f.name]
        if old == new:
            continue
        if f.name in RESUME_APPLIED:
            applied[f.name] = (old, new)
        else:
            refused.append(f"{f.name!r} ({old!r} -> {new!r})")
    if refused:
        raise RunFolderError(f"--resume: config key{'s' if len(refused) > 1 else ''} {', '.join(refused)} differ"
                             f"{'' if len(refused) > 1 else 's'} from the checkpoint's run ({source}); resume can "
                             f"change only {', '.join(sorted(RESUME_APPLIED))} — start a new run (another --name) "
                             "to change the rest")
    return applied


def _check_run_folder(cfg, flow: str, run_dir: Path) -> tuple[bool, str]:
    """Raise RunFolderError if this run may not use ``run_dir``; returns (replace_old, a note to print)."""
    from . import checkpoint as ckpt

    mode = resume_mode(cfg)
    overwrite = bool(getattr(cfg, "overwrite", False))
    if mode and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: resume continues the run in "
                             f"{run_dir}, overwrite replaces it; pass one")
    if mode and flow == "icl":
        raise RunFolderError("--resume does not apply to icl (it trains nothing and writes no checkpoint)")
    if not mode:
        if holds_run(run_dir) and not overwrite:
            raise RunFolderError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                                 "--overwrite to replace it, or choose another --name")
        return overwrite and holds_run(run_dir), ""
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        if mode == "auto":
            return holds_run(run_dir), f"resume auto: no checkpoint in {run_dir}; starting a fresh run"
        what = "does not exist" if not run_dir.exists() else "has no complete checkpoint"
        raise RunFolderError(f"--resume: run folder {run_dir} {what}, so there is nothing to resume; pass "
                             "--resume auto to start a fresh run when there is no checkpoint")
    step = ckpt.read_trainer_state(last)["step"]
    if step > cfg.max_steps:
        raise RunFolderError(f"--resume: config key 'max_steps' ({cfg.max_steps}) is below the checkpoint's step "
                             f"{step} ({last})")
    saved = _saved_config(last, run_dir)
    note = f"resuming {run_dir} from {last.name} (step {step})"
    if saved is not None:
        applied = resume_changes(cfg, saved, last / "config.yaml" if (last / "config.yaml").exists()
                                 else run_dir / "config.yaml")
        if applied:
            note += "; applying " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in applied.items())
    return False, note


def start_run(cfg, flow: str) -> tuple[DistState, Path]:
    """Join torchrun if launched by it, fix threads and seeds, check the run folder may be used and lock it.

    Nothing is written into the run folder here: :func:`commit_run` does that once the model and data loaded."""
    state = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    # A previous run in this process (the pipeline, tests) is over: its lock and pending folder go.
    release_run_locks()
    _pending.clear()
    if not cfg.name:
        cfg.name = broadcast_object(f"{flow}-{time.strftime('%Y%m%d-%H%M%S')}", state)
    run_dir = Path(cfg.output_dir) / cfg.name
    error, replace_old, note = None, False, ""
    if state.is_main:
        try:
            _check_name(cfg.name)
            acquire_run_lock(run_dir)
            replace_old, note = _check_run_folder(cfg, flow, run_dir)
        except (ValueError, OSError) as e:  # a RunFolderError, or a checkpoint that cannot be read safely
            error = str(e)
    # Every process raises the same error, so none waits for the others at a barrier.
    error, replace_old, note = broadcast_object((error, replace_old, note), state)
    if error:
        release_run_locks()
        raise RunFolderError(error)
    if note and state.is_main:
        print(note)
    _pending[_key(run_dir)] = _PendingRun(cfg, state, replace_old)
    return state, run_dir


def commit_run(run_dir) -> Path:
    """The end of setup: create ``run_dir`` (replacing the old one on --overwrite) and write its ``config.yaml``.

    Only for a folder :func:`start_run` checked; a no-op once done (and for folders it did not check)."""
    run_dir = Path(run_dir)
    pending = _pending.pop(_key(run_dir), None)
    if pending is None or not pending.state.is_main:
        return run_dir
    if pending.replace_old and run_dir.exists():
        # Renamed aside first, so the name never points at a half-removed folder.
        aside = run_dir.parent / f".{run_dir.name}.replaced-{os.getpid()}"
        os.rename(run_dir, aside)
        shutil.rmtree(aside, ignore_errors=True)
        print(f"removed the previous run in {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(pending.cfg, run_dir, echo=pending.cfg.progress)
    return run_dir


def write_json(path, data) -> Path:
    path = Path(path)
    commit_run(path.parent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
