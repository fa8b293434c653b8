"""What the TRL integration tests share: the tiny hub-style model, TRL's training arguments, the reward,
and the comparison of two runs' logs. Imported by tests/test_integrations_trl*.py (not collected)."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
import transformers

import fastalign.integrations.trl as fa_trl
from fastalign.models.tiny import build_tokenizer

TOL = 1e-5
BF16_TOL = 2e-2
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
PROMPTS = ["1+2=", "3+4=", "5+5=", "9+1=", "2+7=", "8+8=", "6+3=", "4+4="]


@pytest.fixture(scope="module")
def tiny_dir():
    """A 1-layer Llama (hidden 32) with fastalign's character tokenizer, saved like a hub model."""
    tok = build_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    path = tempfile.mkdtemp(prefix="fa-trl-tiny-")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_thread_unpatched():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fa_trl.unpatch()
    yield
    fa_trl.unpatch()
    torch.set_num_threads(threads)


def reward(completions, **kw):
    # shaped, so groups are not all equal: length and the count of "1"
    return [len(c) / 8 + c.count("1") for c in completions]


def training_args(steps: int, *, bf16: bool = False) -> dict:
    """The arguments every trainer of these tests shares: ``steps`` logged steps, fp32 (or bf16) on CPU."""
    return dict(output_dir=tempfile.mkdtemp(prefix="fa-trl-run-"), max_steps=steps, logging_steps=1,
                report_to="none", save_strategy="no", bf16=bf16, use_cpu=True, seed=0, learning_rate=1e-2,
                disable_tqdm=True, activation_checkpointing=False, per_device_train_batch_size=4)


def lora_config(peft: bool):
    if not peft:
        return None
    import peft as peft_lib

    return peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def log_errors(want, got, what, name="fastalign"):
    """[(scaled error, description)] over every step and logged number: relative to max(|x|, 1) (grad
    norms down to 1e-3), timings skipped."""
    errors = []
    for step, (a, b) in enumerate(zip(want, got), 1):
        assert set(a) == set(b), f"{what} step {step}: logged keys differ: {sorted(set(a) ^ set(b))}"
        for key, x in a.items():
            if key in TIMING or not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            y = b[key]
            assert math.isfinite(y) == math.isfinite(x), f"{what} step {step} {key}: {y} vs {x}"
            if math.isfinite(x):
                scale = max(abs(x), abs(y), 1e-3 if key == "grad_norm" else 1.0)
                errors.append((abs(x - y) / scale, f"{what} step {step} {key}: {name} {y!r} vs TRL {x!r}"))
    return errors


def assert_same_logs(want, got, what, tol=TOL, name="fastalign"):
    worst = max(log_errors(want, got, what, name), default=(0.0, ""))
    assert worst[0] <= tol, f"{worst[1]} (scaled error {worst[0]:.2e} > {tol:g})"
