"""The D²O, KTO, ORPO and CPO flows end to end on the tiny model, resume, and bad data naming file, row, field."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastalign import cli
from fastalign.engine.config import CPOConfig, D2OConfig, KTOConfig, ORPOConfig, load_config
from fastalign.engine.logging import read_metrics

SMALL = dict(max_steps=2, batch_size=4, num_examples=16, num_eval_examples=4, progress=False, threads=1,
             warmup_steps=1, max_length=48, dataset="pronoun")


def _cfg(cls, tmp_path, name, **over):
    return load_config(cls, overrides=dict(SMALL, output_dir=str(tmp_path), name=name, **over))


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def test_d2o_flow_end_to_end_starts_at_ln2(tmp_path):
    from fastalign.flows import d2o

    report = d2o.run(_cfg(D2OConfig, tmp_path, "d2o", num_samples=3, log_every=1, resample_every=1))
    # Policy == reference at step 1: every log-ratio is 0, so the loss is −log σ(0) = ln 2.
    assert abs(_losses(tmp_path / "d2o")[0] - math.log(2)) < 1e-5
    assert report["num_samples"] == 3 and math.isfinite(report["kl_to_start"])
    assert "pronoun/neutral_rate" in report
    assert json.loads((tmp_path / "d2o" / "eval.json").read_text()) == report


def test_d2o_sample_prefix_conditions_the_draw_not_the_score():
    from transformers import AutoTokenizer

    from fastalign.data import loading
    from fastalign.flows import d2o
    from fastalign.models.tiny import tiny_path

    tok = AutoTokenizer.from_pretrained(tiny_path())
    row = {"prompt": "The nurse fixed ___ car. ___=", "rejected": "her"}
    e = d2o.encode_negative(tok, row, "[neutral] ")
    assert e["prompt"] == loading.encode_prompt(tok, row["prompt"])
    assert e["sample_prompt"] == loading.encode_prompt(tok, "[neutral] " + row["prompt"])
    assert d2o.encode_negative(tok, row)["sample_prompt"] == e["prompt"]

    class Recorder:  # the sampler's side of ReferenceSamples: which prompt each draw follows
        def __init__(self):
            self.prompts = []

        def sample(self, prompts, **kw):
            self.prompts += prompts
            return type("Rollout", (), {"completions": lambda self: [[5]] * kw["num_samples"]})()

    rec = Recorder()
    cfg = D2OConfig(num_samples=2, max_new_tokens=4)
    rows = d2o.collate_groups([e], torch.tensor([0]), tok.pad_token_id, 48, d2o.ReferenceSamples(rec, cfg))
    assert rec.prompts == [e["sample_prompt"]]
    # every row of the group (2 samples, then the negative) is scored after the plain prompt
    for ids in rows.input_ids.tolist():
        assert ids[:len(e["prompt"])] == e["prompt"]
    # a conversation gets the prefix as its system message, as the ICL flow gives its instruction
    chat = {"prompt": [{"role": "user", "content": "hi"}], "rejected": "her"}
    assert d2o.encode_negative(tok, chat, "[neutral] ")["sample_prompt"] == loading.encode_prompt(
        tok, [{"role": "system", "content": "[neutral] "}, {"role": "user", "content": "hi"}])


def test_d2o_gradient_ascent_baseline(tmp_path):
    from fastalign.flows import d2o

    # The whole dataset each step: step 2's loss is on the same negatives, after one ascent step.
    report = d2o.run(_cfg(D2OConfig, tmp_path, "ga", objective="ga", log_every=1, lr=1e-2, warmup_steps=0,
                          batch_size=16))
    losses = _losses(tmp_path / "ga")
    assert losses[0] < 0 and losses[1] < losses[0]  # the negatives' summed log-probs are pushed down
    assert report["objective"] == "ga" and report["num_samples"] == 0


def test_d2o_resume_gives_the_uninterrupted_weights(tmp_path):
    from safetensors.torch import load_file

    from fastalign.flows import d2o

    args = dict(num_samples=2, resample_every=1, save_every=1, warmup_steps=0, min_lr_ratio=1.0, lr=1e-3)
    d2o.run(_cfg(D2OConfig, tmp_path, "straight", **dict(args, max_steps=3)))
    d2o.run(_cfg(D2OConfig, tmp_path, "resumed", **dict(args, max_steps=2)))
    d2o.run(_cfg(D2OConfig, tmp_path, "resumed", **dict(args, max_steps=3, resume=True)))
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_kto_flow_end_to_end_on_pairs_split_in_halves(tmp_path):
    from fastalign.flows import kto

    report = kto.run(_cfg(KTOConfig, tmp_path, "kto", log_every=1))
    # Policy == reference: r = 0 and z0 = 0, so every loss is λ·(1 − σ(0)) = 0.5.
    assert abs(_losses(tmp_path / "kto")[0] - 0.5) < 1e-5
    assert 0 <= report["eval_reward_accuracy"] <= 1 and math.isfinite(report["kl_to_start"])


def test_kto_flow_on_unpaired_file(tmp_path):
    from fastalign.flows import kto

    data = tmp_path / "u.jsonl"
    rows = [{"prompt": f"The nurse grabbed ___ bag {i}. ___=", "completion": "their", "label": i % 3 != 0}
            for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kto.run(_cfg(KTOConfig, tmp_path, "kto-file", dataset=str(data), desirable_weight=1.5))
    assert (tmp_path / "kto-file" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("flow,cls", [("orpo", ORPOConfig), ("cpo", CPOConfig)])
def test_orpo_and_cpo_flows_end_to_end(tmp_path, flow, cls):
    import importlib

    report = importlib.import_module(f"fastalign.flows.{flow}").run(_cfg(cls, tmp_path, flow, max_steps=1))
    assert math.isfinite(_losses(tmp_path / flow)[0]) and _losses(tmp_path / flow)[0] > 0
    assert math.isfinite(report["kl_to_start"]) and 0 <= report["eval_reward_accuracy"] <= 1


def test_bad_data_names_file_row_and_field(tmp_path, capsys):
    kto_data = tmp_path / "kto.jsonl"
    kto_data.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c"}\n')
    assert cli.main(["kto", f"--dataset={kto_data}", f"--output_dir={tmp_path}", "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert str(kto_data) in err and "row 2" in err and "'label'" in err
    kto_data.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    assert cli.main(["kto", f"--dataset={kto_data}", f"--output_dir={tmp_path}", "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert "row 1 field 'label' must be true (desirable) or false" in err
    d2o_data = tmp_path / "d2o.jsonl"
    d2o_data.write_text('{"prompt": "a", "rejected": "b"}\n{"prompt": "a", "rejected": ""}\n')
    assert cli.main(["d2o", f"--dataset={d2o_data}", f"--output_dir={tmp_path}", "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert str(d2o_data) in err and "row 2 field 'rejected' is empty" in err


@pytest.mark.parametrize("flow", ["d2o", "kto", "orpo", "cpo"])
def test_help_lists_the_flow_keys(flow, capsys):
    with pytest.raises(SystemExit):
        cli.main([flow, "--help"])
    out = capsys.readouterr().out
    assert "--beta" in out and "--init_from" in out
    if flow in ("d2o", "kto"):
        assert "--reference " in out and "--reference_offload" in out
