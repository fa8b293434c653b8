"""Engine: configs, LR schedule, batch order, checkpoints (atomic, exact resume), divergence stop."""

import math
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastalign.data import loading
from fastalign.engine import checkpoint as ckpt
from fastalign.engine.config import DPOConfig, SFTConfig, load_config, parse_overrides, save_config
from fastalign.engine.distributed import DistState
from fastalign.engine.optim import build_optimizer, build_scheduler, lr_factor
from fastalign.engine.trainer import BatchStream, TrainingDiverged, train
from fastalign.models.heads import CausalLMLogprobs
from fastalign.models.loading import load_causal_lm, load_tokenizer


def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 0.01, "beta": 0.2, "loss-type": "ipo", "packing": True}))
    cfg = load_config(DPOConfig, str(path), ["--beta", "0.3", "--max_steps=7", "--resume"])
    got = (cfg.lr, cfg.beta, cfg.loss_type, cfg.packing, cfg.max_steps, cfg.resume)
    assert got == (0.01, 0.3, "ipo", True, 7, "true")  # resume: "" (off), "true" or "auto"
    save_config(cfg, tmp_path, echo=False)
    again = load_config(DPOConfig, str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("values, words", [
    ({"lrr": 1}, ["'lrr'", "did you mean 'lr'"]),
    ({"max_steps": "many"}, ["'max_steps'", "int", "'many'"]),
    ({"max_steps": 0}, ["'max_steps'", ">= 1", "0"]),
    ({"loss_type": "square"}, ["'loss_type'", "sigmoid", "'square'"]),
    ({"packing": "maybe"}, ["'packing'", "bool"]),
    ({"lr": float("nan")}, ["'lr'", "finite"]),
    ({"dataset": [1, 2]}, ["'dataset'", "str"]),
])
def test_bad_config_values_name_the_key(tmp_path, values, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError) as e:
        load_config(DPOConfig, str(path))
    for w in words:
        assert w in str(e.value)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ValueError, match="expected an override"):
        parse_overrides(["lr", "1"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(SFTConfig, "/nonexistent/cfg.yaml")
    with pytest.raises(ValueError, match="unknown config key 'beta'"):
        load_config(SFTConfig, overrides=["--beta", "1"])  # a DPO key is not an SFT key
    with pytest.raises(TypeError, match="cls must be a config class such as SFTConfig, got an instance of SFTConfig"):
        load_config(SFTConfig(), overrides={"lr": 1e-3})
    with pytest.raises(TypeError, match="got 'sft'"):
        load_config("sft")


def test_lr_schedule_warmup_then_cosine_to_floor():
    assert lr_factor(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    cfg = SFTConfig(lr=0.5, warmup_steps=2, max_steps=10)
    opt = build_optimizer(torch.nn.Linear(2, 2).parameters(), cfg)
    sched = build_scheduler(opt, cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_batch_stream_splits_global_batch_across_ranks_and_restores_position():
    data = list(range(23))
    collate = lambda ex, idx: list(ex)
    one = BatchStream(data, collate, batch_size=8, micro_batch_size=2, state=DistState(), seed=5)
    ranks = [BatchStream(data, collate, batch_size=8, micro_batch_size=2, state=DistState(rank=r, world_size=2),
                         seed=5) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (23 rows, 8 per batch)
        whole = [x for mb in one.next() for x in mb]
        split = [x for s in ranks for mb in s.next() for x in mb]
        assert whole == split and len(set(whole)) == 8
    saved = one.state_dict()
    expected = one.next()
    fresh = BatchStream(data, collate, batch_size=8, micro_batch_size=2, state=DistState(), seed=5)
    fresh.load_state_dict(saved)
    assert fresh.next() == expected
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchStream(data, collate, batch_size=8, micro_batch_size=3, state=DistState())


def _sft_setup(tmp_path, **over):
    cfg = load_config(SFTConfig, overrides=dict(dict(output_dir=str(tmp_path), name="r", max_steps=5, batch_size=4,
                                                     progress=False, warmup_steps=1), **over))
    tok = load_tokenizer("tiny")
    model = CausalLMLogprobs(load_causal_lm("tiny"))
    ex = [loading.encode_sft(tok, r, 64) for r in loading.load_rows("arith", "sft", n=40)]
    stream = BatchStream(ex, lambda e, i: loading.collate(e, tok.pad_token_id), batch_size=4, state=DistState())
    opt = build_optimizer(model.parameters(), cfg)
    return cfg, model, stream, opt, build_scheduler(opt, cfg)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg, model, stream, opt, sched = _sft_setup(tmp_path, save_every=2, max_steps=6)
    calls = {"n": 0}
    bad_step = int(torch.randint(3, 6, ()))

    def loss_fn(m, b):  # a real loss that turns into NaN at a chosen step (as a blown-up run would)
        calls["n"] += 1
        loss = -m(b.input_ids, b.attention_mask, b.labels).sum()
        return (loss * float("nan") if calls["n"] == bad_step else loss), {}

    with pytest.raises(TrainingDiverged) as e:
        train(cfg=cfg, run_dir=tmp_path / "r", model=model, optimizer=opt, scheduler=sched, stream=stream,
              loss_fn=loss_fn, weight_fn=lambda b: b.num_target_tokens(), state=DistState())
    good = (bad_step - 1) // 2 * 2
    assert f"at step {bad_step}" in str(e.value) and f"step-{good:07d}" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path / "r").name == f"step-{good:07d}"


def test_checkpoint_is_atomic_and_restores_model_optimizer_rng(tmp_path):
    cfg, model, stream, opt, sched = _sft_setup(tmp_path)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, DistState())
    after = torch.rand(3)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000003"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    _, model2, _, opt2, _ = _sft_setup(tmp_path / "other")
    assert ckpt.load_checkpoint(path, model2, opt2, DistState())["step"] == 3
    assert torch.equal(torch.rand(3), after)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    # A crash mid-write leaves only a temporary folder: the latest complete checkpoint is unchanged.
    (tmp_path / "checkpoints" / ".tmp-step-0000004").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000003"


def _final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_kill_and_resume_gives_the_uninterrupted_weights(tmp_path):
    from fastalign.flows import sft

    args = dict(output_dir=str(tmp_path), max_steps=8, batch_size=8, micro_batch_size=4, num_examples=200,
                num_eval_examples=4, save_every=1, threads=1, progress=False, warmup_steps=2)
    sft.run(load_config(SFTConfig, overrides=dict(args, name="straight")))

    cmd = [sys.executable, "-m", "fastalign.cli", "sft", *[f"--{k}={v}" for k, v in args.items()], "--name=killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 300
    while ckpt.latest_checkpoint(run_dir) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = ckpt.latest_checkpoint(run_dir)
    assert killed_at is not None and int(killed_at.name.split("-")[1]) < 8, "the run was not interrupted mid-way"
    assert not (run_dir / "model").exists()
    sft.run(load_config(SFTConfig, overrides=dict(args, name="killed", resume=True)))

    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(run_dir)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    steps = [r["step"] for r in map(yaml.safe_load, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps)) and steps[-1] == 8


@pytest.mark.parametrize("flow", ["sft", "reward", "dpo", "simpo"])
def test_example_configs_load(flow):
    from pathlib import Path

    from fastalign.engine import config as C

    cls = {"sft": C.SFTConfig, "reward": C.RewardConfig, "dpo": C.DPOConfig, "simpo": C.SimPOConfig}[flow]
    path = Path(__file__).resolve().parents[1] / "configs" / f"{flow}.yaml"
    cfg = load_config(cls, str(path))
    assert cfg.name == f"{flow}-tiny" and cfg.model == "tiny"
