"""Each flow end to end on the tiny model (a few steps), DPO loss types and reference strategies, CLI errors."""

import json
import math

import pytest
import torch
import yaml

from fastalign import cli
from fastalign.engine.config import DPOConfig, RewardConfig, SFTConfig, SimPOConfig, load_config
from fastalign.engine.logging import read_metrics
from fastalign.models.heads import ScalarHeadModel
from fastalign.models.loading import load_causal_lm

SMALL = dict(max_steps=2, batch_size=4, num_examples=16, num_eval_examples=4, progress=False, threads=1,
             warmup_steps=1, max_length=48)


def _cfg(cls, tmp_path, name, **over):
    return load_config(cls, overrides=dict(SMALL, output_dir=str(tmp_path), name=name, **over))


def _first_loss(run_dir):
    return read_metrics(run_dir / "metrics.jsonl")[0]["loss"]


def test_sft_flow_end_to_end(tmp_path):
    from fastalign.flows import sft

    report = sft.run(_cfg(SFTConfig, tmp_path, "sft", log_every=1, packing=True))
    run = tmp_path / "sft"
    for f in ("config.yaml", "metrics.jsonl", "curves.png", "eval.json", "model/config.json"):
        assert (run / f).exists(), f
    saved = json.loads((run / "eval.json").read_text())
    assert saved == report and saved["steps"] == 2
    for key in ("eval_loss", "arith/exact_match", "pronoun/neutral_rate", "pronoun/stereotype_rate"):
        assert math.isfinite(saved[key]), key
    assert math.log(100) - 1 < _first_loss(run) < math.log(100) + 1  # untrained: ~uniform over 100 tokens
    assert yaml.safe_load((run / "config.yaml").read_text())["packing"] is True
    load_causal_lm(str(run / "model"))


def test_reward_flow_end_to_end(tmp_path):
    from fastalign.flows import reward

    report = reward.run(_cfg(RewardConfig, tmp_path, "rm", center_coef=0.0))
    assert 0 <= report["eval_accuracy"] <= 1 and "pronoun/reward_accuracy" in report
    # Head initialised near zero rewards: the first Bradley-Terry loss is close to ln 2.
    assert abs(_first_loss(tmp_path / "rm") - math.log(2)) < 0.2
    model = ScalarHeadModel.load(tmp_path / "rm" / "model")
    assert model.score.weight.shape == (1, 128)


@pytest.mark.parametrize("loss_type, expected", [
    ("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2), ("robust", math.log(2))])
def test_dpo_loss_types_start_at_their_zero_margin_value(tmp_path, loss_type, expected):
    from fastalign.flows import dpo

    report = dpo.run(_cfg(DPOConfig, tmp_path, loss_type, loss_type=loss_type, max_steps=1, beta=0.1,
                          label_smoothing=0.1 if loss_type == "robust" else 0.0))
    # Policy == reference at the first step, so the margin is 0 (exactly, for every strategy).
    assert _first_loss(tmp_path / loss_type) == pytest.approx(expected, rel=1e-6)
    for key in ("eval_reward_accuracy", "kl_to_start", "pronoun/neutral_rate"):
        assert math.isfinite(report[key])


@pytest.mark.parametrize("strategy, extra", [("precomputed", {}), ("adapter", {"lora_r": 4})])
def test_reference_strategies_match_a_frozen_copy(tmp_path, strategy, extra):
    from fastalign.flows import dpo

    common = dict(max_steps=3, log_every=1, dataset="pronoun+arith", **extra)
    dpo.run(_cfg(DPOConfig, tmp_path, "copy", reference="frozen_copy", **common))
    report = dpo.run(_cfg(DPOConfig, tmp_path, strategy, reference=strategy, **common))
    copy_rows = read_metrics(tmp_path / "copy" / "metrics.jsonl")
    rows = read_metrics(tmp_path / strategy / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    # The same policy updates against the same reference give the same losses at every step.
    for a, b in zip(copy_rows, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert report["reference_extra_mib"] < 4.0  # less than the 4.1 MiB of a full copy


def test_shared_trunk_reference_equals_the_starting_model():
    from fastalign.data import loading
    from fastalign.models.heads import CausalLMLogprobs
    from fastalign.models.loading import load_tokenizer
    from fastalign.models.reference import FrozenCopy, SharedTrunk

    tok = load_tokenizer("tiny")
    policy = CausalLMLogprobs(load_causal_lm("tiny"))
    start = FrozenCopy(policy)
    k = int(torch.randint(1, 4, ()))
    shared = SharedTrunk(policy, k)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(any(f"layers.{i}." in n for i in range(4 - k, 4)) for n in trainable)
    with torch.no_grad():  # "training" moves the policy's top layers away from the reference
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rows = loading.load_rows("pronoun+arith", "preferences", n=3, seed=int(torch.randint(0, 999, ())))
    batch = loading.collate_preferences([loading.encode_preference(tok, r, 64) for r in rows], tok.pad_token_id)
    moved = policy(batch.input_ids, batch.attention_mask, batch.labels)  # the policy pass the reference reuses
    expected = start.token_logps(batch)
    got = shared.token_logps(batch)
    assert not torch.allclose(moved, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert shared.extra_bytes < start.extra_bytes


def test_simpo_flow_end_to_end(tmp_path):
    from fastalign.flows import simpo

    report = simpo.run(_cfg(SimPOConfig, tmp_path, "simpo", max_steps=1, beta=2.0, gamma=0.5))
    # Chosen and rejected completions differ, so only check the loss is the SimPO formula on real numbers.
    assert 0 < _first_loss(tmp_path / "simpo") < 10 and math.isfinite(report["kl_to_start"])
    assert (tmp_path / "simpo" / "model" / "model.safetensors").exists()


def test_cli_reports_bad_config_and_malformed_data(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nlearning_rate: 3\n")
    assert cli.main(["dpo", "--config", str(bad)]) == 1
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    assert cli.main(["dpo", f"--dataset={data}", f"--output_dir={tmp_path}", "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert str(data) in err and "row 2" in err and "'rejected'" in err


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="could not load model 'nobody-here/no-such-model'.*Offline"):
        load_causal_lm("nobody-here/no-such-model")


def test_lora_without_peft_names_the_extra(monkeypatch):
    import builtins

    from fastalign.models.loading import apply_lora

    real_import = builtins.__import__

    def no_peft(name, *a, **k):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ImportError, match=r"fastalign\[peft\]"):
        apply_lora(torch.nn.Linear(2, 2), r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
