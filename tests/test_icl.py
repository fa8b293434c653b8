"""The in-context alignment flow: steered decoding against independent references, the judge's failure
reports, the reflection search, PICLe's selection, and every mode end to end on the tiny model."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from fastalign import ops
from fastalign.data import loading, tasks
from fastalign.engine.config import ICLConfig, load_config
from fastalign.engine.generation import generate
from fastalign.flows import icl
from fastalign.icl import picle, prompts
from fastalign.icl.judge import Judge, resolve_judge
from fastalign.icl.reflect import reflect_search
from fastalign.icl.steering import steered_generate
from fastalign.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm("tiny").eval()


def _random_prompts(n, lo=3, hi=14, vocab=(4, 99)):
    """Fresh random prompts of awkward, different lengths (BOS first)."""
    return [[1] + [random.randint(*vocab) for _ in range(random.randint(lo, hi))] for _ in range(n)]


def _prefixed(prompts_, lo=1, hi=9):
    return [[1] + [random.randint(4, 99) for _ in range(random.randint(lo, hi))] + p[1:] for p in prompts_]


# --- steered decoding ------------------------------------------------------------------------------
def test_alpha_zero_without_negatives_equals_plain_greedy_decoding(lm, tok):
    value = _random_prompts(7)
    base = [[1] + p[1 + random.randint(0, 2):] for p in value]  # other lengths: other padding in the shared batch
    expected = generate(lm, tok, value, max_new_tokens=9)
    got = steered_generate(lm, [value, base], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=9,
                           alpha=0.0, top_p=1.0, batch_size=4)
    assert got == expected


def test_zero_weight_negatives_leave_greedy_decoding_unchanged(lm, tok):
    value = _random_prompts(5)
    expected = generate(lm, tok, value, max_new_tokens=7)
    branches = [value, _prefixed(value), _prefixed(value, 5, 12), _random_prompts(5)]
    got = steered_generate(lm, branches, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=7,
                           alpha=0.0, betas=[0.0, 0.0], top_p=1.0)
    assert got == expected


def test_steered_decoding_equals_per_branch_full_recompute():
    """Batched branches with their own caches give the tokens of an unbatched, uncached recompute of every
    branch followed by the same combination (float64 weights: no near-tie can flip an argmax)."""
    lm64 = load_causal_lm("tiny").double().eval()
    with torch.no_grad():  # sharpen the random model so the steered choice is not uniform noise
        lm64.lm_head.weight.mul_(20.0)
    value = _random_prompts(3)
    branches = [value, _prefixed(value), _prefixed(value, 3, 8)]
    alpha, betas, top_p, steps = 1.5, [0.7], 0.8, 6
    got = steered_generate(lm64, branches, pad_id=0, eos_id=None, max_new_tokens=steps, alpha=alpha, betas=betas,
                           top_p=top_p, batch_size=2)
    for i in range(len(value)):
        seqs = [list(b[i]) for b in branches]
        out = []
        for _ in range(steps):
            with torch.no_grad():
                z = [lm64(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs]
            with ops.backend("torch"):
                scores = ops.steer_logits(z[0][None], z[1][None], z[2][None, None], alpha=alpha, betas=betas,
                                          top_p=top_p)
            token = int(scores.argmax(-1))
            out.append(token)
            seqs = [s + [token] for s in seqs]
        assert got[i] == out, f"prompt {i}"


def test_all_branches_share_one_forward_per_step(lm, tok):
    calls = []
    handle = lm.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompts_ = _random_prompts(6)
        steered_generate(lm, [prompts_, _prefixed(prompts_), _prefixed(prompts_)], pad_id=0, eos_id=None,
                         max_new_tokens=5, alpha=1.0, top_p=0.9, batch_size=64)
    finally:
        handle.remove()
    assert len(calls) == 5  # one prefill + 4 decode steps, for all 3 branches together


def test_steered_generate_rejects_bad_branches(lm):
    with pytest.raises(ValueError, match="branch_prompts\\[1\\] must hold one prompt per prompt of branch 0"):
        steered_generate(lm, [[[1, 5]], [[1, 5], [1, 6]]], pad_id=0, eos_id=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        steered_generate(lm, [[[1, 5]]], pad_id=0, eos_id=2, max_new_tokens=0)
    with pytest.raises(ValueError, match="branch_prompts\\[0\\]\\[0\\] must be a non-empty list"):
        steered_generate(lm, [[[]]], pad_id=0, eos_id=2, max_new_tokens=2)


# --- the judge -------------------------------------------------------------------------------------
JUDGE_MODULE = '''
import math

def score(prompts, completions, occupation=None, **columns):
    out = []
    for p, o in zip(prompts, occupation):
        if o == "nurse":
            raise RuntimeError("judge backend down for nurses")
        out.append(math.nan if o == "pilot" else 1.0)
    return out
'''


@pytest.fixture
def failing_judge_module(tmp_path, monkeypatch):
    (tmp_path / "icl_test_judge.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "icl_test_judge:score"
    sys.modules.pop("icl_test_judge", None)


def test_judge_reports_each_failing_prompt(failing_judge_module):
    judge = resolve_judge(failing_judge_module, "pronoun")
    rows = tasks.get_task("pronoun").prompts(40, seed=random.randint(0, 999), split="eval")
    scores = judge.score(rows, ["their"] * len(rows))
    bad = {i for i, r in enumerate(rows) if r["occupation"] in ("nurse", "pilot")}
    assert bad, "the sample must hold a failing occupation"
    assert {f["index"] for f in scores.failures} == bad
    for f in scores.failures:
        assert f["prompt"] == rows[f["index"]]["prompt"]
        expected = "RuntimeError: judge backend down" if rows[f["index"]]["occupation"] == "nurse" else "nan"
        assert expected in f["error"]
    assert [r is None for r in scores.rewards] == [i in bad for i in range(len(rows))]
    assert scores.mean() == 1.0


def test_a_failing_judge_does_not_crash_the_sweep(tmp_path, failing_judge_module):
    cfg = _cfg(tmp_path, "judge", mode="instruct", judge=failing_judge_module, num_eval_examples=30)
    result = icl.run(cfg)["instruct"]
    saved = json.loads((tmp_path / "judge" / "instruct.json").read_text())
    occupations = [r["occupation"] for r in tasks.get_task("pronoun").prompts(30, seed=0, split="eval")]
    n_bad = sum(o in ("nurse", "pilot") for o in occupations)
    for condition in ("no instruction", "value instruction"):
        assert result["rows"][condition]["judge_failures"] == n_bad
        details = saved["judge_failure_details"][f"instruct/{condition}"]
        assert sorted(d["index"] for d in details) == [i for i, o in enumerate(occupations) if o in ("nurse", "pilot")]
        assert result["rows"][condition]["reward"] == 1.0


def test_judge_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="could not import 'nope' from module 'math'"):
        resolve_judge("math:nope", "pronoun")
    with pytest.raises(ValueError, match="not a built-in task"):
        resolve_judge("", "data.jsonl")
    with pytest.raises(TypeError, match="judge must be a string"):
        resolve_judge(3, "pronoun")
    judge = Judge("words", lambda p, c, r: ["good" if x == "y" else 0.5 for x in c])
    scores = judge.score([{"prompt": "a"}, {"prompt": "b"}], ["x", "y"])
    assert scores.rewards == [0.5, None]
    assert scores.failures[0]["index"] == 1 and "returned str 'good', expected a number" in scores.failures[0]["error"]


# --- reflection search and PICLe selection -----------------------------------------------------------
def test_reflect_search_keeps_the_best_text_and_prefers_short_ones():
    target = "abc "

    def align(texts):  # how many of the target's characters the text holds, in order, as a fraction
        return [sum(c in t for c in target) / len(target) for t in texts]

    rng = random.Random()
    sample = lambda prefixes: ["".join(rng.choice("abcxyz ") for _ in range(6)) for _ in prefixes]  # noqa: E731
    result = reflect_search(align_fn=align, sample_fn=sample, length_fn=len, pool=["xx a", "b c yy zz "], rounds=4,
                            num_generated=6, num_mutations=6, keep=3, length_penalty=0.01, seed=rng.randint(0, 99))
    objectives = [r["best_objective"] for r in result.rounds]
    assert objectives == sorted(objectives), "the best kept objective never drops"
    best = result.scored[result.best_text]
    assert best["objective"] == pytest.approx(best["alignment"] - 0.01 * len(result.best_text))
    assert all(s["objective"] is None or s["objective"] <= best["objective"] + 1e-12 for s in result.scored.values())


def test_likelihood_ratio_and_similarity_selection():
    target = torch.tensor([-1.0, -5.0, -2.0, -3.0, -0.5])
    base = torch.tensor([-2.0, -1.0, -2.0, -9.0, -0.5])
    assert picle.likelihood_ratio_top_k(target, base, 2) == [3, 0]
    pool = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    assert picle.similar_top_k(pool[[4, 1]], pool, 1) == [[4], [1]]
    assert all(len(set(s)) == 3 for s in picle.random_k(5, 6, 3, seed=1))


def test_picle_target_model_ranks_target_statements_first(lm, tok):
    """After tuning on "their" sentences, the likelihood ratio ranks unseen sentences of that kind above candidates
    of another kind (arith lines), whatever their base likelihood; the base model itself gets no adapter."""
    task = tasks.get_task("pronoun")
    statements = [r["prompt"] + "their" for r in task.prompts(24, seed=random.randint(0, 99), split="train")]
    sentences = [r["prompt"] + "their" for r in task.prompts(3, seed=random.randint(100, 199), split="eval")]
    arith = [r["prompt"] + r["completion"] for r in tasks.get_task("arith").sft(3, seed=random.randint(0, 99))]
    texts = arith[:1] + sentences + arith[1:]
    target, losses = picle.lora_tune(lm, tok, statements, r=8, alpha=16, lr=1e-2, steps=12, batch_size=8, seed=0)
    assert losses[-1] < losses[0]
    picked = picle.likelihood_ratio_top_k(picle.text_logprobs(target, tok, texts), picle.text_logprobs(lm, tok, texts),
                                          3)
    assert sorted(picked) == [1, 2, 3]
    assert not any("lora" in n for n, _ in lm.named_parameters())


def test_text_logprobs_match_a_materialized_computation(lm, tok):
    texts = ["The nurse grabbed ___ bag. ___=their", "12+3=15", "x"]
    got = picle.text_logprobs(lm, tok, texts)
    for text, value in zip(texts, got.tolist()):
        ids = torch.tensor([loading.encode_prompt(tok, text)])
        with torch.no_grad():
            logp = lm(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
        expected = logp.gather(-1, ids[0, 1:, None]).sum().item()
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_conditioned_prompts():
    assert prompts.render_text("Q=", instruction="[v] ", history=[("a=", "1"), ("b=", "2")]) == "[v] a=1\nb=2\nQ="
    msgs = prompts.messages("Q=", instruction="be kind", history=[("a=", "1")])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


# --- every mode end to end on the tiny model -------------------------------------------------------
def _cfg(tmp_path, name, **over):
    values = dict(model="tiny", output_dir=str(tmp_path), name=name, num_eval_examples=12, progress=False,
                  timing_batch_sizes=[], num_turns=3, alphas=["0", "1"], alpha=1.0, picle_steps=3,
                  picle_pool_size=10, picle_num_statements=8, picle_batch_size=4, reflect_rounds=1,
                  reflect_generated=2, reflect_mutations=2, reflect_probes=4, reflect_max_tokens=4)
    values.update(over)
    return load_config(ICLConfig, overrides=values)


@pytest.mark.parametrize("mode,conditions", [
    ("instruct", ["no instruction", "value instruction"]),
    ("forgetting", [f"turn {t}: {c}" for t in (1, 2, 3) for c in ("instruction at turn 1", "no instruction")]),
    ("steer", ["no instruction", "value instruction", "steer alpha=0", "steer alpha=1"]),
    ("picle", ["no demos", "random demos", "similar demos", "PICLe demos"]),
    ("reflect", ["no instruction", "best text of round 0", "best reflection"]),
])
def test_each_mode_writes_its_table_and_plot(tmp_path, mode, conditions):
    extra = {"timing_batch_sizes": ["4"], "timing_prompts": 4, "timing_new_tokens": 3,
             "timing_repeats": 1} if mode == "steer" else {}
    result = icl.run(_cfg(tmp_path, mode, mode=mode, **extra))[mode]
    run_dir = tmp_path / mode
    for suffix in ("md", "json", "png"):
        assert (run_dir / f"{mode}.{suffix}").stat().st_size > 0
    assert list(result["rows"]) == conditions
    for metrics in result["rows"].values():
        for key in ("behaviour_rate", "pronoun/neutral_rate", "pronoun/stereotype_rate"):
            assert 0.0 <= metrics[key] <= 1.0, key
    table = (run_dir / f"{mode}.md").read_text()
    assert all(f"| {c} |" in table for c in conditions)
    if mode == "steer":
        assert [t["branches"] for t in result["timing"]] == [3, 3] and all(t["plain_s"] > 0 for t in result["timing"])
    if mode == "reflect":
        assert result["best_text"] and len(result["rounds"]) == 2
    assert json.loads((run_dir / "eval.json").read_text())["modes"][mode]["rows"]


def test_pipeline_rows_use_the_pipeline_keys(tmp_path):
    rows = icl.pipeline_rows("tiny", n=6, seed=0, run_dir=tmp_path, picle_steps=2, picle_pool_size=8,
                             picle_num_statements=4, picle_batch_size=4, reflect_rounds=1, reflect_generated=2,
                             reflect_mutations=2, reflect_probes=3, reflect_max_tokens=3, alphas=["0", "1"],
                             timing_batch_sizes=[], progress=False)
    assert list(rows) == ["base", "instruct", "steer", "picle", "reflect"]
    for metrics in rows.values():
        assert {"pronoun/neutral_rate", "pronoun/stereotype_rate", "arith/exact_match"} <= set(metrics)
    assert (tmp_path / "steer.md").exists() and (tmp_path / "reflect.png").exists()
    # The resolved config is written, as every flow's run folder has it: the given keys, the rest ICLConfig's.
    written = load_config(ICLConfig, str(tmp_path / "config.yaml"))
    assert (written.picle_steps, written.num_eval_examples, written.mode) == (2, 6, "all")
    assert written.reflect_keep == ICLConfig().reflect_keep


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'betas' must hold one value or one per contrary instruction"):
        _cfg(tmp_path, "x", contrary_instructions=["a", "b", "c"], betas=["1", "2"])
    with pytest.raises(ValueError, match="'alphas' must hold finite numbers"):
        _cfg(tmp_path, "x", alphas=["1", "nan"])
    with pytest.raises(ValueError, match="'mode' must be one of"):
        _cfg(tmp_path, "x", mode="finetune")


def test_example_config_holds_the_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "icl.yaml"
    cfg = load_config(ICLConfig, str(path))
    defaults = ICLConfig()
    for key in ("instruction", "contrary_instructions", "betas", "alphas", "alpha", "top_p", "reflect_pool",
                "separator", "filler_dataset", "picle_steps", "reflect_rounds", "num_turns"):
        assert getattr(cfg, key) == getattr(defaults, key), key
    assert cfg.name == "icl-tiny" and cfg.model == "tiny"


def test_cli_runs_a_mode_and_reports_bad_overrides(tmp_path, capsys):
    from fastalign import cli

    common = ["--output_dir", str(tmp_path), "--num_eval_examples", "5", "--progress", "false"]
    assert cli.main(["icl", "--mode", "instruct", "--name", "c", *common]) == 0
    assert (tmp_path / "c" / "instruct.md").exists()
    assert cli.main(["icl", "--mode", "finetune", *common]) == 1
    assert "config key 'mode' must be one of" in capsys.readouterr().err
