"""fastalign.integrations.trl.DPOTrainer / GRPOTrainer: TRL's trainers with the loss from fastalign.losses.

Each test trains the same tiny Llama (saved like a hub model) for 3 steps, fp32, one thread: once with
TRL's own, unpatched trainer, once with fastalign's subclass. Every logged number (loss, grad norm, each
metric) must agree to 1e-5 relative to max(|value|, 1) (grad norms: relative down to 1e-3). A spy on the
fused loss counts its calls, so a subclass that silently ran TRL's loss fails; GRPO samples from models
that agree to ~1e-7, so both sides draw the same completions.
"""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import trl_support  # noqa: E402
from trl_support import BF16_TOL, PROMPTS, TOL, assert_same_logs, lora_config, reward, training_args  # noqa: E402

import fastalign.integrations.trl as fa_trl  # noqa: E402
from fastalign import losses  # noqa: E402
from fastalign.models.tiny import build_tokenizer  # noqa: E402

tiny_dir, one_thread_unpatched = trl_support.tiny_dir, trl_support.one_thread_unpatched  # the shared fixtures

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

STEPS = 3


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts forward calls of the two fused losses (the real modules run)."""
    calls = []
    for cls in (losses.FusedLinearDPOLoss, losses.FusedLinearGRPOLoss):
        real = cls.forward

        def counted(self, *args, _real=real, **kw):
            calls.append(type(self).__name__)
            return _real(self, *args, **kw)

        monkeypatch.setattr(cls, "forward", counted)
    return calls


def train(kind, path, cls, *, peft=False, **overrides):
    """Train with ``cls`` (TRL's trainer or fastalign's subclass) for STEPS steps; the per-step log dicts."""
    common = training_args(STEPS)
    tok = build_tokenizer()
    peft_config = lora_config(peft)
    prompts = PROMPTS * 2
    answers = [str(eval(p[:-1])) for p in prompts]
    if kind == "dpo":
        ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": [a + "1" for a in answers]})
        trainer = cls(model=path, args=trl.DPOConfig(**common, **overrides), train_dataset=ds, processing_class=tok,
                      peft_config=peft_config)
    else:
        args = trl.GRPOConfig(**{**common, "num_generations": 4, "max_completion_length": 8, **overrides})
        trainer = cls(model=path, reward_funcs=reward, args=args, train_dataset=ds_prompts(prompts),
                      processing_class=tok, peft_config=peft_config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return logs


def ds_prompts(prompts):
    return datasets.Dataset.from_dict({"prompt": prompts})


def check_parity(kind, path, calls, tol=TOL, **overrides):
    trl_cls, fa_cls = (trl.DPOTrainer, fa_trl.DPOTrainer) if kind == "dpo" else (trl.GRPOTrainer, fa_trl.GRPOTrainer)
    want = train(kind, path, trl_cls, **overrides)
    assert not calls
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back.*")  # a supported config must not fall back
        got = train(kind, path, fa_cls, **overrides)
    assert calls, f"{fa_cls.__name__} did not compute the loss with fastalign.losses"
    assert_same_logs(want, got, f"{kind} {overrides}", tol)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_subclass_matches_trl(tiny_dir, fused_calls, loss_type):
    extra = {"label_smoothing": 0.1} if loss_type in ("robust", "sigmoid") else {}
    check_parity("dpo", tiny_dir, fused_calls, loss_type=[loss_type], **extra)


@pytest.mark.parametrize("options", [
    dict(loss_type="dapo", gradient_accumulation_steps=2),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=True, num_iterations=2, gradient_accumulation_steps=2),
    dict(loss_type="dr_grpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="cispo"),
], ids=["dapo-accumulation", "grpo-sequence", "bnpo-beta-bias-corrected-2-iterations-accumulation", "dr_grpo-beta",
        "cispo"])
def test_grpo_subclass_matches_trl(tiny_dir, fused_calls, options):
    check_parity("grpo", tiny_dir, fused_calls, **options)


def test_dpo_subclass_matches_trl_with_precomputed_reference(tiny_dir, fused_calls):
    want = train("dpo", tiny_dir, trl.DPOTrainer, precompute_ref_log_probs=True)
    got = train("dpo", tiny_dir, fa_trl.DPOTrainer, precompute_ref_log_probs=True)
    assert fused_calls
    # At step 1 the policy is the reference: every reward is 0 in exact arithmetic, and the share of pairs
    # whose chosen reward is strictly larger is the sign of float32 noise between two passes (TRL's two
    # passes are bitwise equal, the precompute and the fused loss are not). Every other number is compared.
    for logs in (want, got):
        del logs[0]["rewards/accuracies"]
    assert_same_logs(want, got, "dpo precomputed reference")


def test_peft_lora_dpo_subclass_matches_trl(tiny_dir, fused_calls):
    pytest.importorskip("peft")
    check_parity("dpo", tiny_dir, fused_calls, peft=True)  # the reference is the model with its adapter off


def test_bf16_autocast_grpo_subclass_within_2e_2_of_trl(tiny_dir, fused_calls):
    # TRL rounds the logits to bf16 under autocast; the fused loss keeps them in float32
    check_parity("grpo", tiny_dir, fused_calls, tol=BF16_TOL, bf16=True, beta=0.04)


def test_unsupported_option_warns_once_naming_it_then_equals_the_patched_path(tiny_dir, fused_calls):
    with pytest.warns(UserWarning, match=r"loss_type='sapo'.*falling back") as record:
        got = train("grpo", tiny_dir, fa_trl.GRPOTrainer, loss_type="sapo")
    assert sum("falling back" in str(w.message) for w in record) == 1
    assert not fused_calls and fa_trl.is_patched()
    want = train("grpo", tiny_dir, trl.GRPOTrainer, loss_type="sapo")  # TRL, still patched
    assert_same_logs(want, got, "fallback vs patched TRL")


DDP_WORKER = textwrap.dedent('''
    import json, os, sys, tempfile
    import datasets, torch, trl
    import fastalign.integrations.trl as fa_trl
    from fastalign.models.tiny import build_tokenizer

    out, path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    prompts = PROMPTS * 2
    answers = [str(eval(p[:-1])) for p in prompts]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": [a + "1" for a in answers]})
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=3, logging_steps=1, report_to="none",
                         save_strategy="no", bf16=False, use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True,
                         activation_checkpointing=False, per_device_train_batch_size=batch,
                         ddp_backend="gloo")
    trainer = fa_trl.DPOTrainer(model=path, args=args, train_dataset=ds, processing_class=build_tokenizer())
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    if trainer.accelerator.is_main_process:
        logs = [{k: v for k, v in h.items() if isinstance(v, float)} for h in trainer.state.log_history
                if "loss" in h]
        json.dump({"logs": logs, "world": trainer.accelerator.num_processes}, open(out, "w"))
''').replace("PROMPTS", repr(PROMPTS))


def test_two_gloo_processes_of_the_dpo_subclass_equal_one_process_of_trl(tiny_dir, tmp_path):
    """DDP: the subclass calls the wrapped model, so 2 gloo processes x 2 pairs give TRL's 1 process x 4 pairs."""
    from conftest import run_two_processes

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    run_two_processes(worker, tmp_path / "two.json", tiny_dir, 2)
    two = json.loads((tmp_path / "two.json").read_text())
    one = [{k: v for k, v in h.items() if isinstance(v, float)} for h in train("dpo", tiny_dir, trl.DPOTrainer)]
    assert two["world"] == 2 and len(two["logs"]) == STEPS
    assert_same_logs(one, two["logs"], "DDP subclass vs one process TRL")
