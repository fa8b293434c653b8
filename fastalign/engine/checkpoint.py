"""Atomic checkpoints: write into a temporary folder, fsync, then rename into place.

A checkpoint folder ``<run>/checkpoints/step-0000042/`` holds ``model.safetensors`` (the trainable
module's full state), ``optimizer.pt``, ``trainer.pt`` (step, scheduler, data position, metrics
history) and ``rng-rank<r>.pt`` per process. ``<run>/checkpoints/latest`` names the newest complete
one; a crash mid-write leaves only a ``.tmp-*`` folder that is ignored and cleaned up later, so the
last good checkpoint always survives.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from .distributed import DistState, barrier, unwrap


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _full_state_dicts(model, optimizer, state: DistState):
    """Full (unsharded) model and optimizer states on CPU; works for plain, DDP and FSDP2 modules."""
    if state.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(unwrap(model), optimizer, options=opts)
    return unwrap(model).state_dict(), optimizer.state_dict()


def _trainable_only(model, model_state):
    """Only what training changes: frozen weights (a reference trunk, LoRA's base) are rebuilt from the start."""
    names = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    buffers = {n for n, _ in unwrap(model).named_buffers()}
    return {k: v for k, v in model_state.items() if k in names or k in buffers}


def save_checkpoint(run_dir, step, model, optimizer, trainer_state: dict, state: DistState, keep: int = 2) -> Path:
    """Write the checkpoint for ``step`` atomically (rank 0 writes the shared files); returns its folder."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    model_state, optim_state = _full_state_dicts(model, optimizer, state)
    if state.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in _trainable_only(model, model_state).items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
    barrier(state)
    # Every process writes its own RNG state into the shared temporary folder.
    if state.is_main or tmp.exists():
        torch.save(rng_state(), tmp / f"rng-rank{state.rank}.pt")
    barrier(state)
    if state.is_main:
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier(state)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    marker = Path(run_dir) / "checkpoints" / "latest"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / "trainer.pt").exists() else None


def load_checkpoint(path, model, optimizer, state: DistState) -> dict:
    """Restore model, optimizer and this process's RNG; returns the trainer state (step, scheduler, data...)."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path / "model.safetensors"))
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if state.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(unwrap(model), optimizer, model_state_dict=tensors, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        missing = unwrap(model).load_state_dict(tensors, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint {path} has weights this model lacks: {missing.unexpected_keys[:5]}")
        optimizer.load_state_dict(optim_state)
    rng_file = path / f"rng-rank{state.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
