"""fastalign.integrations.trl: TRL's real trainers, patched vs unpatched, on a tiny model.

Each test trains the same tiny Llama (saved to a folder, loaded by path like a hub model, so TRL
builds its own reference models) for 5 steps, fp32, one thread, twice: with TRL's own fused head and
with ``patch()``. Every logged number (loss, grad norm, and each trainer's metrics: rewards, entropy,
token accuracy from is-top-1, mean logits, ...) must agree to 1e-5 relative to max(|value|, 1): the
losses and metrics are sums of O(1) terms that can cancel (an RLOO loss of 1e-8, a mean logit of 1e-3),
so below 1 the bound is 1e-5 absolute; grad norms are held to 1e-5 relative down to 1e-3.
A spy counts fastalign's calls, so a patch
that silently does nothing fails. GRPO and RLOO sample their completions, from models that agree to
~1e-7, so they draw the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import trl_support  # noqa: E402
from trl_support import BF16_TOL, PROMPTS, TOL, assert_same_logs, log_errors, lora_config, reward, training_args  # noqa: E402

import fastalign.integrations.trl as fa_trl  # noqa: E402
from fastalign import ops  # noqa: E402
from fastalign.models.tiny import build_tokenizer  # noqa: E402

tiny_dir, one_thread_unpatched = trl_support.tiny_dir, trl_support.one_thread_unpatched  # the shared fixtures

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

STEPS = 5


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of fastalign's token_logprobs (the real function runs)."""
    calls = []
    real = ops.token_logprobs

    def counted(*args, **kw):
        calls.append(kw.get("return_extras", ()))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "token_logprobs", counted)
    return calls


def train(kind, path, patched, *, bf16=False, peft=False, **overrides):
    """Train ``kind`` for STEPS steps from ``path``; returns the per-step log dicts."""
    (fa_trl.patch if patched else fa_trl.unpatch)()
    common = training_args(STEPS, bf16=bf16)
    tok = build_tokenizer()
    peft_config = lora_config(peft)
    prompts = PROMPTS * 2
    answers = [str(eval(p[:-1])) for p in prompts]
    if kind == "sft":
        ds = datasets.Dataset.from_dict({"prompt": prompts, "completion": answers})
        trainer = trl.SFTTrainer(model=path, args=trl.SFTConfig(**common, **overrides), train_dataset=ds,
                                 processing_class=tok, peft_config=peft_config)
    elif kind == "dpo":
        ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": answers,
                                         "rejected": [a + "1" for a in answers]})
        trainer = trl.DPOTrainer(model=path, args=trl.DPOConfig(**common, **overrides), train_dataset=ds,
                                 processing_class=tok, peft_config=peft_config)
    elif kind == "kto":
        ds = datasets.Dataset.from_dict({"prompt": prompts, "completion": [a if i % 2 else a + "9" for i, a in
                                                                             enumerate(answers)],
                                         "label": [bool(i % 2) for i in range(len(prompts))]})
        trainer = trl.KTOTrainer(model=path, args=trl.KTOConfig(**common, **overrides), train_dataset=ds,
                                 processing_class=tok, peft_config=peft_config)
    elif kind in ("grpo", "rloo"):
        ds = datasets.Dataset.from_dict({"prompt": prompts})
        cls, cfg = (trl.GRPOTrainer, trl.GRPOConfig) if kind == "grpo" else (trl.RLOOTrainer, trl.RLOOConfig)
        args = cfg(**{**common, "num_generations": 4, "max_completion_length": 8, **overrides})
        trainer = cls(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                      peft_config=peft_config)
    else:
        raise AssertionError(kind)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return logs


def check_parity(kind, path, spy, tol=TOL, **kw):
    want = train(kind, path, False, **kw)
    assert not spy, "fastalign ran while TRL was unpatched"
    got = train(kind, path, True, **kw)
    assert spy, "patch() did not route TRL's fused head through fastalign"
    assert_same_logs(want, got, f"{kind} {kw}", tol, "patched")
    return spy


def trl_self_drift(kind, path, **kw):
    """TRL against itself with other vocabulary tile widths (other fp32 summation orders): the float32 noise
    floor of a 5-step run, the largest over two widths (one width alone can land near 0 on some CPUs: on an
    Intel Xeon, width 16 drifted 1.7e-6 and width 64 9.7e-6 in the DiscoPOP grad norm)."""
    from trl.trainer import utils

    want = train(kind, path, False, **kw)
    floor = 0.0
    for width in (16, 64):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", width)
            got = train(kind, path, False, **kw)
        floor = max(floor, max(log_errors(want, got, "TRL vs TRL", "TRL"))[0])
    return want, floor


# ------------------------------------------------------------------------------------------- trainers
def test_sft_parity_and_token_accuracy_from_is_top1(tiny_dir, spy):
    calls = check_parity("sft", tiny_dir, spy)
    assert ("is_top1",) in calls  # SFT's mean_token_accuracy reads is-top-1 from the head


DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSSES if t != "discopop"])
def test_dpo_parity_every_loss_type(tiny_dir, spy, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
    check_parity("dpo", tiny_dir, spy, loss_type=[loss_type], **extra)


def test_dpo_parity_discopop_within_trls_own_float32_drift(tiny_dir, spy):
    # DiscoPOP's gate divides the log-ratio by tau = 0.05; with Adam at lr 1e-2 the last-bit differences of
    # fp32 sums grow to ~1e-4 in the grad norm by step 5 -- between two TRL runs that only tile the
    # vocabulary differently, too. So the bound here is that drift (measured in the test), not 1e-5.
    want, floor = trl_self_drift("dpo", tiny_dir, loss_type=["discopop"])
    assert not spy
    got = train("dpo", tiny_dir, True, loss_type=["discopop"])
    assert spy
    assert_same_logs(want, got, "dpo discopop", max(TOL, 3 * floor), "patched")


def test_dpo_parity_wpo_weighting_reads_log_sum_p2(tiny_dir, spy):
    calls = check_parity("dpo", tiny_dir, spy, use_weighting=True)
    assert any("log_sum_p2" in c for c in calls)


GRPO_LOSSES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("loss_type", GRPO_LOSSES)
def test_grpo_parity_every_loss_type(tiny_dir, spy, loss_type):
    level = "sequence" if loss_type == "luspo" else "token"
    check_parity("grpo", tiny_dir, spy, loss_type=loss_type, importance_sampling_level=level)


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(beta=0.04, use_bias_correction_kl=True),
    dict(beta=0.04, use_bias_correction_kl=False, loss_type="grpo"),
    dict(num_iterations=2, beta=0.04),
    dict(top_entropy_quantile=0.5, loss_type="bnpo"),
], ids=["sequence-level", "beta-bias-corrected", "beta-uncorrected", "two-iterations", "top-entropy"])
def test_grpo_parity_options(tiny_dir, spy, options):
    check_parity("grpo", tiny_dir, spy, **options)


def test_kto_parity(tiny_dir, spy):
    calls = check_parity("kto", tiny_dir, spy)
    assert any("mean_logit" in c for c in calls)  # KTO's logits/* metrics


def test_rloo_parity(tiny_dir, spy):
    check_parity("rloo", tiny_dir, spy, beta=0.04)


# ------------------------------------------------------------------------------ bf16, PEFT, patching
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bf16_autocast_parity(tiny_dir, spy, kind):
    # TRL rounds the logits to bf16 under autocast; fastalign keeps them in float32: within 2e-2
    check_parity(kind, tiny_dir, spy, tol=BF16_TOL, bf16=True)


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_gradient_accumulation_parity(tiny_dir, spy, kind):
    check_parity(kind, tiny_dir, spy, gradient_accumulation_steps=2)


def test_peft_lora_parity(tiny_dir, spy):
    pytest.importorskip("peft")
    check_parity("dpo", tiny_dir, spy, peft=True)


def test_unpatch_restores_trl_exactly_and_patch_is_idempotent():
    from trl.trainer import utils

    fn, use = utils._ChunkedLogProbFunction, utils._use_triton
    fa_trl.patch()
    fa_trl.patch()  # twice: harmless
    assert utils._ChunkedLogProbFunction is fa_trl.FusedLogProbFunction and fa_trl.is_patched()
    fa_trl.unpatch()
    assert utils._ChunkedLogProbFunction is fn and utils._use_triton is use
    fa_trl.unpatch()  # twice: harmless
    assert utils._ChunkedLogProbFunction is fn and not fa_trl.is_patched()
    with fa_trl.patched():
        assert utils._ChunkedLogProbFunction is fa_trl.FusedLogProbFunction
    assert utils._ChunkedLogProbFunction is fn and utils._use_triton is use


def test_version_outside_tested_range_raises_with_the_range():
    with pytest.raises(RuntimeError, match=r"trl>=1\.16\.0,<1\.17\.0.*found trl 1\.15\.2"):
        fa_trl.check_version("1.15.2")
    with pytest.raises(RuntimeError, match="found trl 1.17.0"):
        fa_trl.check_version("1.17.0")
    fa_trl.check_version("1.16.0")


def test_the_extras_pin_the_tested_range():
    """CI installs the dev extra: it must pin the TRL range patch() accepts, and so must the trl extra."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = re.findall(r'"trl([<>=!~][^"]*)"', text)
    assert pins and all(p == fa_trl.SUPPORTED[3:] for p in pins), (pins, fa_trl.SUPPORTED)


def test_options_fastalign_cannot_honour_raise_naming_them():
    h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="outputs.*'logits'"):
        fa_trl.FusedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs", "logits"))
    w.ds_id = 3  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        fa_trl.FusedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs",))


def test_function_matches_trl_function_directly_with_gradients():
    """The swapped function against TRL's, all outputs and every gradient, with softcap and scale."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    h0, w0, b0 = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    y = torch.randint(0, 50, (30,), generator=g)
    outs, grads = [], []
    for fn in (ChunkedLogProbFunction, fa_trl.FusedLogProbFunction):
        h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
        out = fn.apply(h, w, b, y, 0.8, 16, 3.0, 0.6, fa_trl.OUTPUTS)
        (out[0].sum() + 0.3 * out[1].sum()).backward()
        outs.append(out)
        grads.append((h.grad, w.grad, b.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


DDP_WORKER = textwrap.dedent('''
    import json, os, sys, tempfile
    import datasets, torch, trl
    import fastalign.integrations.trl as fa_trl
    from fastalign.models.tiny import build_tokenizer

    out, path, patched, batch = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    if patched:
        fa_trl.patch()
    prompts = PROMPTS * 2
    answers = [str(eval(p[:-1])) for p in prompts]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": [a + "1" for a in answers]})
    distributed = "WORLD_SIZE" in os.environ
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=3, logging_steps=1, report_to="none",
                         save_strategy="no", bf16=False, use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True,
                         activation_checkpointing=False, per_device_train_batch_size=batch,
                         ddp_backend="gloo" if distributed else None)
    trainer = trl.DPOTrainer(model=path, args=args, train_dataset=ds, processing_class=build_tokenizer())
    trainer.train()
    if trainer.accelerator.is_main_process:
        logs = [{k: v for k, v in h.items() if isinstance(v, float)} for h in trainer.state.log_history
                if "loss" in h]
        json.dump({"logs": logs, "world": trainer.accelerator.num_processes}, open(out, "w"))
''').replace("PROMPTS", repr(PROMPTS))


def test_two_gloo_processes_patched_equal_one_process_of_trl(tiny_dir, tmp_path):
    """DDP: 2 gloo processes x 2 pairs, patched, give TRL's unpatched 1 process x 4 pairs (3 DPO steps)."""
    from conftest import run_two_processes

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    run_two_processes(worker, tmp_path / "two.json", tiny_dir, 1, 2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(worker), str(tmp_path / "one.json"), tiny_dir, "0", "4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert len(one["logs"]) == len(two["logs"]) == 3
    assert_same_logs(one["logs"], two["logs"], "DDP patched vs one process TRL", TOL, "patched")


def test_all_masked_microbatch_gives_a_differentiable_zero():
    """TRL compacts away ignored positions; a microbatch with none left must still backpropagate (zeros)."""
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    out = fa_trl.FusedLogProbFunction.apply(h, w, None, torch.zeros(0, dtype=torch.long), 1.0, 32768, None, 1.0,
                                            fa_trl.OUTPUTS)
    assert out[0].requires_grad and out[1].requires_grad
    mask = torch.zeros(2, 3, dtype=torch.bool)
    (out[0].new_zeros(mask.shape).masked_scatter(mask, out[0]).sum()).backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0
