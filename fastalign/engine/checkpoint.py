"""Atomic checkpoints that execute no code when loaded: write into a temporary folder, fsync, rename.

A checkpoint folder ``<run>/checkpoints/step-0000042/`` holds

* ``model.safetensors``: the trainable weights (and buffers) of the module saved;
* ``optimizer.json`` + ``optimizer.safetensors``: the optimizer state;
* ``trainer.json`` + ``trainer.safetensors``: step, scheduler, data position, history and whatever
  else the flow keeps (KL coefficient, sampler state...);
* ``rng-rank<r>.json`` + ``rng-rank<r>.safetensors``: each process's RNG states;
* ``config.yaml``: the run's config when the checkpoint was written (what ``--resume`` compares against).

Nothing is pickled. A state is split by :func:`encode_state` into a JSON tree (dicts, lists, tuples,
str, int, float, bool, None) and its tensors, which go to safetensors; loading reads JSON and
safetensors only, so a planted file cannot run code. Checkpoints of the previous format
(``optimizer.pt``, ``trainer.pt``, ``rng-rank<r>.pt``) are read with ``torch.load(weights_only=True)``
and an explicit allow-list (numpy's RNG state types); anything else in them is refused, and
``python -m fastalign.engine.checkpoint convert DIR`` rewrites such a checkpoint in this format.

``<run>/checkpoints/latest`` names the newest complete one; a crash mid-write leaves only a ``.tmp-*``
folder that is ignored and cleaned up later, so the last good checkpoint always survives.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import torch

from .distributed import DistState, barrier, unwrap

# Keys that mark a non-plain JSON node; a dict holding one of them as a key is written as an item list.
_TENSOR, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"
_MARKERS = (_TENSOR, _TUPLE, _ITEMS, _FLOAT)


class UnsafeCheckpoint(ValueError):
    """A checkpoint file that could run code when loaded (a pickle outside the allow-list): refused."""


# ---------------------------------------------------------------------------------------------- codec
def encode_state(obj, path: str = "state") -> tuple[object, dict]:
    """``obj`` as (JSON tree, {name: tensor}); TypeError naming the path of anything else.

    Holds nested dicts (any str/int/float/bool/tuple keys), lists, tuples, str, int, float (NaN/Inf
    included), bool, None and torch tensors (any dtype/device; saved contiguous on CPU)."""
    tensors: dict = {}

    def enc(x, where):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            # JSON has no NaN/Inf; repr round-trips every finite float exactly through json.
            return x if x == x and abs(x) != float("inf") else {_FLOAT: repr(x)}
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu").contiguous().clone()
            return {_TENSOR: name}
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {_ITEMS: [[enc(k, f"{where} key"), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "shape", None) == ():
            return enc(x.item(), where)  # a numpy scalar
        raise TypeError(f"checkpoint state {where} is a {type(x).__module__}.{type(x).__name__}; a checkpoint holds "
                        "only dicts, lists, tuples, str, int, float, bool, None and torch tensors")

    return enc(obj, path), tensors


def decode_state(tree, tensors: dict, source="checkpoint"):
    """The inverse of :func:`encode_state`."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            (key, value), = x.items()
            if key == _TENSOR:
                if value not in tensors:
                    raise ValueError(f"{source}: tensor {value!r} is missing from its .safetensors file")
                return tensors[value]
            if key == _TUPLE:
                return tuple(dec(v) for v in value)
            if key == _ITEMS:
                return {_hashable(dec(k)): dec(v) for k, v in value}
            if key == _FLOAT:
                return float(value)
        return {k: dec(v) for k, v in x.items()}

    return dec(tree)


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _save_state(obj, folder: Path, stem: str):
    """``<stem>.json`` and ``<stem>.safetensors`` in ``folder``."""
    from safetensors.torch import save_file

    tree, tensors = encode_state(obj, stem)
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps({"format": 1, "state": tree}))


def _legacy_safe_globals() -> list:
    """What the previous format's pickles may hold besides tensors and containers: numpy's RNG state."""
    try:
        import numpy as np
    except ImportError:
        return []
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    core = getattr(np, "_core", None) or np.core
    allowed.append(core.multiarray._reconstruct)
    return allowed


def _load_legacy(file: Path):
    """A ``.pt`` file of the previous format, unpickled with ``weights_only=True`` and the allow-list only."""
    try:
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("\n")[0].strip()
        raise UnsafeCheckpoint(
            f"checkpoint file {file} was refused: it holds objects outside the allow-list of a weights_only load, and "
            f"unpickling them could run code ({detail[:160]}). fastalign's own checkpoints of the previous format load "
            f"as they are; if you wrote this one and trust it, convert it with `python -m fastalign.engine.checkpoint "
            f"convert --trust {file.parent}`") from None


def _load_state(folder: Path, stem: str):
    """The state saved by :func:`_save_state`, or the previous format's ``<stem>.pt`` loaded safely."""
    from safetensors.torch import load_file

    js = folder / f"{stem}.json"
    if js.exists():
        try:
            data = json.loads(js.read_text())
            tree = data["state"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint file {js} is not a fastalign state file ({e})") from None
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        return decode_state(tree, tensors, source=str(js))
    legacy = folder / f"{stem}.pt"
    if legacy.exists():
        return _load_legacy(legacy)
    raise FileNotFoundError(f"checkpoint {folder} has no {stem}.json (incomplete or not a fastalign checkpoint)")


def _has_state(folder: Path, stem: str) -> bool:
    return (folder / f"{stem}.json").exists() or (folder / f"{stem}.pt").exists()


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------- save / load
def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    """Write the checkpoint for ``step`` atomically (rank 0 writes the shared files); returns its folder.

    ``trainer_state`` may nest dicts, lists, tuples, Python scalars, strings and torch tensors."""
    from safetensors.torch import save_file

    from .runs import commit_run

    commit_run(run_dir)  # a run's folder exists before its first checkpoint (no-op once committed)
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
        _save_state(optim_state, tmp, "optimizer")
        _save_state(trainer_state, tmp, "trainer")
        config = Path(run_dir) / "config.yaml"
        if config.exists():
            shutil.copyfile(config, tmp / "config.yaml")
    barrier(state)
    # Every process writes its own RNG state into the shared temporary folder.
    if state.is_main or tmp.exists():
        _save_state(rng_state(), tmp, f"rng-rank{state.rank}")
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
        # The one just written is always kept, whatever step numbers older folders carry.
        older = sorted(p for p in root.iterdir() if p.name.startswith("step-") and p != final)
        for old in older[:max(len(older) - (keep - 1), 0)]:
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
    return path if _has_state(path, "trainer") else None


def read_trainer_state(path) -> dict:
    """The trainer state of a checkpoint folder alone (no model needed): step, scheduler, data, history..."""
    return _load_state(Path(path), "trainer")


def load_checkpoint(path, model, optimizer, state: DistState) -> dict:
    """Restore model, optimizer and this process's RNG; returns the trainer state (step, scheduler, data...)."""
    from safetensors.torch import load_file

    path = Path(path)
    # Everything is read (and refused if unsafe) before anything is restored.
    trainer_state = _load_state(path, "trainer")
    optim_state = _load_state(path, "optimizer")
    rng_stem = f"rng-rank{state.rank}"
    rng = _load_state(path, rng_stem) if _has_state(path, rng_stem) else None
    tensors = load_file(str(path / "model.safetensors"))
    if state.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(unwrap(model), optimizer, model_state_dict=tensors, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        missing = unwrap(model).load_state_dict(tensors, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint {path} has weights this model lacks: {missing.unexpected_keys[:5]}")
        optimizer.load_state_dict(optim_state)
    if rng is not None:
        set_rng_state(rng)
    return trainer_state


# ---------------------------------------------------------------------------------- format conversion
def convert(path, *, trust: bool = False) -> list[Path]:
    """Rewrite a previous-format checkpoint folder (``*.pt``) as JSON + safetensors; returns the files written.

    Without ``trust`` the ``.pt`` files are read as :func:`load_checkpoint` reads them (weights_only, allow-list);
    ``trust=True`` unpickles them fully — only for a checkpoint you wrote yourself."""
    path = Path(path)
    olds = sorted(path.glob("*.pt"))
    if not olds:
        raise ValueError(f"{path} holds no .pt files of the previous checkpoint format")
    written = []
    for old in olds:
        obj = torch.load(old, map_location="cpu", weights_only=False) if trust else _load_legacy(old)
        if old.stem.startswith("rng-rank") and "numpy" in obj and not isinstance(obj["numpy"][1], torch.Tensor):
            name, keys, pos, has_gauss, cached = obj["numpy"]
            obj["numpy"] = (name, torch.as_tensor(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
        _save_state(obj, path, old.stem)
        old.unlink()
        written.append(path / f"{old.stem}.json")
    return written


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastalign.engine.checkpoint",
                                     description="convert checkpoints of the previous (pickle) format")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="rewrite optimizer.pt / trainer.pt / rng-rank*.pt as JSON + safetensors")
    p.add_argument("folders", nargs="+", help="checkpoint folders (checkpoints/step-NNNNNNN)")
    p.add_argument("--trust", action="store_true", help="unpickle fully (runs code a pickle holds: only for your own)")
    args = parser.parse_args(argv)
    try:
        for folder in args.folders:
            for f in convert(folder, trust=args.trust):
                print(f"wrote {f}")
    except (ValueError, OSError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
