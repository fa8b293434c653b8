"""Checkpoints execute no code when loaded: JSON + safetensors, previous-format pickles only through weights_only.

A planted pickle (an object whose ``__reduce__`` runs a command) must be refused with a message naming the
file, and its command must not run; checkpoints of the previous format that fastalign wrote still load.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from fastalign.engine import checkpoint as ckpt
from fastalign.engine.distributed import DistState
from fastalign.engine.optim import build_optimizer, build_scheduler


class _Planted:
    """Unpickling this creates ``path``: the stand-in for an arbitrary command."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Cfg:
    lr, weight_decay, adam_beta1, adam_beta2, adam_eps = 1e-2, 0.0, 0.9, 0.98, 1e-8
    warmup_steps, max_steps, min_lr_ratio = 2, 10, 0.1


def _trained(steps=3, roles=False):
    """A small module (a PPO-like ModuleDict of policy + critic when ``roles``), its optimizer and scheduler after
    ``steps`` updates."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"policy": torch.nn.Linear(4, 3), "critic": torch.nn.Linear(4, 1)}) if roles \
        else torch.nn.Linear(4, 3)
    opt = build_optimizer(model.parameters(), _Cfg)
    sched = build_scheduler(opt, _Cfg)
    for _ in range(steps):
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _trainer_state(sched):
    g = torch.Generator().manual_seed(7)
    return {"step": 3, "scheduler": sched.state_dict(), "data": {"epoch": 0, "position": 12},
            "history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan")}], "kl_coef": 0.123,
            "generator": g.get_state(), "pending": {"ids": torch.arange(6).view(2, 3), "old": None},
            "nested": (1, [2.5, {"x": torch.ones(2, dtype=torch.bfloat16)}])}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), where


def test_encode_decode_round_trips_every_kind_of_state():
    _, opt, sched = _trained()
    state = {"optimizer": opt.state_dict(), "trainer": _trainer_state(sched), "inf": float("-inf"),
             "marker_like": {"__tensor__": "not a tensor"}, 3: "int key", (1, 2): "tuple key",
             "numpy": np.float32(1.5)}
    tree, tensors = ckpt.encode_state(state)
    back = ckpt.decode_state(tree, tensors)
    state["numpy"] = 1.5  # a numpy scalar comes back as the Python number
    _assert_same(state, back)


def test_an_object_is_refused_when_saved_naming_its_path():
    with pytest.raises(TypeError, match=r"state\.trainer\.bad is a .*_Planted"):
        ckpt.encode_state({"trainer": {"bad": _Planted("/nonexistent")}})


@pytest.mark.parametrize("roles", [False, True])
def test_save_load_restores_model_optimizer_schedule_and_rng(tmp_path, roles):
    model, opt, sched = _trained(roles=roles)
    trainer_state = _trainer_state(sched)
    random.seed(5)
    folder = ckpt.save_checkpoint(tmp_path, 3, model, opt, trainer_state, DistState())
    assert sorted(p.suffix for p in folder.iterdir()) == sorted([".safetensors"] * 4 + [".json"] * 3)
    expected_random = random.random()

    fresh, fresh_opt, fresh_sched = _trained(steps=0, roles=roles)
    random.seed(99)
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh, fresh_opt, DistState())
    assert random.random() == expected_random  # the Python RNG continues where the checkpoint left it
    _assert_same(trainer_state, saved)
    _assert_same(opt.state_dict(), fresh_opt.state_dict())
    _assert_same(model.state_dict(), fresh.state_dict())
    fresh_sched.load_state_dict(saved["scheduler"])
    assert fresh_sched.get_last_lr() == sched.get_last_lr()


def _plant(path, marker):
    torch.save({"state": {}, "param_groups": [], "payload": _Planted(marker)}, path)


def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    model, opt, sched = _trained()
    folder = ckpt.save_checkpoint(tmp_path, 3, model, opt, _trainer_state(sched), DistState())
    marker = tmp_path / "pwned"
    # Beside the JSON state, a planted optimizer.pt is never read.
    _plant(folder / "optimizer.pt", marker)
    ckpt.load_checkpoint(folder, *_trained(steps=0)[:2], DistState())
    assert not marker.exists()
    # In place of it (the previous format's file name), it is refused with a message naming the file.
    (folder / "optimizer.json").unlink()
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"optimizer\.pt was refused.*could run code.*convert"):
        ckpt.load_checkpoint(folder, *_trained(steps=0)[:2], DistState())
    assert not marker.exists()
    (folder / "trainer.json").unlink()
    _plant(folder / "trainer.pt", marker)
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"trainer\.pt was refused"):
        ckpt.read_trainer_state(folder)
    assert not marker.exists()


def _legacy_checkpoint(folder, model, opt, trainer_state):
    """A checkpoint as the previous format wrote it: pickles of the optimizer, trainer and RNG states."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(trainer_state, folder / "trainer.pt")
    np.random.seed(3)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               folder / "rng-rank0.pt")
    (folder.parent / "latest").write_text(folder.name)


def test_previous_format_loads_safely_and_converts(tmp_path):
    model, opt, sched = _trained()
    trainer_state = {"step": 3, "scheduler": sched.state_dict(), "data": {"epoch": 0, "position": 4},
                     "history": [{"step": 3, "loss": 0.25}]}
    folder = tmp_path / "checkpoints" / "step-0000003"
    _legacy_checkpoint(folder, model, opt, trainer_state)
    expected = np.random.rand()
    assert ckpt.latest_checkpoint(tmp_path) == folder

    fresh, fresh_opt, _ = _trained(steps=0)
    np.random.seed(0)
    _assert_same(trainer_state, ckpt.load_checkpoint(folder, fresh, fresh_opt, DistState()))
    assert np.random.rand() == expected  # numpy's RNG state came through the allow-list
    _assert_same(opt.state_dict(), fresh_opt.state_dict())

    written = ckpt.convert(folder)
    assert sorted(p.name for p in written) == ["optimizer.json", "rng-rank0.json", "trainer.json"]
    assert not list(folder.glob("*.pt"))
    fresh, fresh_opt, _ = _trained(steps=0)
    np.random.seed(0)
    _assert_same(trainer_state, ckpt.load_checkpoint(folder, fresh, fresh_opt, DistState()))
    assert np.random.rand() == expected
    _assert_same(opt.state_dict(), fresh_opt.state_dict())


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    """A folder of an abandoned run with higher step numbers must not make the keep rule delete the new one."""
    model, opt, sched = _trained()
    for step in (30, 27):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"step": step}, DistState(), keep=2)
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"step": 5}, DistState(), keep=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-0000005", "step-0000030"]
