"""Bad input to every public op raises ValueError/TypeError naming the argument, the expected and the received.

Each case changes one argument of an otherwise valid call. Device mismatches use the "meta"
device (the only other device on a CPU-only machine). The validation runs before any backend, so
these tests hold on every backend; they run on the default one.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastalign import ops
from fastalign.ops import validation as v

B, T, V, H = 3, 5, 11, 4


def _f(*shape, device="cpu"):
    return torch.randn(*shape, device=device)


def _labels(*shape, device="cpu"):
    return torch.randint(0, V, shape, device=device)


def _mask(*shape):
    return torch.ones(*shape, dtype=torch.bool)


META = "meta"


def _logits(**kw):
    args = {"logits": _f(B, T, V), "labels": _labels(B, T)}
    args.update(kw)
    return lambda: ops.logprobs_from_logits(args.pop("logits"), args.pop("labels"), **args)


def _token(**kw):
    args = {"hidden": _f(B, T, H), "weight": _f(V, H), "labels": _labels(B, T)}
    args.update(kw)
    return lambda: ops.token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def _seq(**kw):
    args = {"token_logp": _f(B, T), "mask": _mask(B, T)}
    args.update(kw)
    return lambda: ops.sequence_logprobs(args.pop("token_logp"), args.pop("mask"), **args)


def _kl(**kw):
    args = {"logp": _f(B, T), "ref_logp": _f(B, T)}
    args.update(kw)
    return lambda: ops.kl_penalty(args.pop("logp"), args.pop("ref_logp"), **args)


def _group(**kw):
    args = {"rewards": _f(8), "group_size": 4}
    args.update(kw)
    return lambda: ops.group_advantages(args.pop("rewards"), args.pop("group_size"), **args)


def _rloo(**kw):
    args = {"rewards": _f(8), "group_size": 4}
    args.update(kw)
    return lambda: ops.rloo_advantages(args.pop("rewards"), args.pop("group_size"))


def _gae(**kw):
    args = {"rewards": _f(B, T), "values": _f(B, T), "mask": _mask(B, T)}
    args.update(kw)
    return lambda: ops.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def _whiten(**kw):
    args = {"x": _f(B, T), "mask": _mask(B, T)}
    args.update(kw)
    return lambda: ops.whiten(args.pop("x"), args.pop("mask"), **args)


def _policy(**kw):
    args = {"logp": _f(B, T), "old_logp": _f(B, T), "advantages": _f(B), "mask": _mask(B, T)}
    args.update(kw)
    return lambda: ops.policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"), args.pop("mask"),
                                   **args)


def _value(**kw):
    args = {"values": _f(B, T), "old_values": _f(B, T), "returns": _f(B, T), "mask": _mask(B, T)}
    args.update(kw)
    return lambda: ops.value_loss(args.pop("values"), args.pop("old_values"), args.pop("returns"), args.pop("mask"),
                                  **args)


def _dpo(**kw):
    args = {"policy_chosen_logps": _f(B), "policy_rejected_logps": _f(B), "ref_chosen_logps": _f(B),
            "ref_rejected_logps": _f(B)}
    args.update(kw)
    return lambda: ops.dpo_loss(args.pop("policy_chosen_logps"), args.pop("policy_rejected_logps"),
                                args.pop("ref_chosen_logps"), args.pop("ref_rejected_logps"), **args)


def _simpo(**kw):
    args = {"chosen_logps": _f(B), "rejected_logps": _f(B)}
    args.update(kw)
    return lambda: ops.simpo_loss(args.pop("chosen_logps"), args.pop("rejected_logps"), **args)


def _bt(**kw):
    args = {"chosen_rewards": _f(B), "rejected_rewards": _f(B)}
    args.update(kw)
    return lambda: ops.bradley_terry_loss(args.pop("chosen_rewards"), args.pop("rejected_rewards"), **args)


# (id, call, exception, argument named in the message)
CASES = [
    # logprobs_from_logits
    ("logits-not-tensor", _logits(logits=[[1.0, 2.0]]), TypeError, "logits"),
    ("logits-int", _logits(logits=torch.zeros(B, T, V, dtype=torch.int64)), TypeError, "logits"),
    ("logits-0d", _logits(logits=torch.tensor(1.0), labels=torch.tensor(0)), ValueError, "logits"),
    ("logits-empty-vocab", _logits(logits=_f(B, 0)), ValueError, "logits"),
    ("labels-float", _logits(labels=_f(B, T)), TypeError, "labels"),
    ("labels-shape", _logits(labels=_labels(B, T + 1)), ValueError, "labels"),
    ("labels-device", _logits(labels=_labels(B, T, device=META)), ValueError, "labels"),
    ("labels-too-big", _logits(labels=torch.full((B, T), V)), ValueError, "labels"),
    ("labels-negative", _logits(labels=torch.full((B, T), -1)), ValueError, "labels"),
    ("labels-other-ignore", _logits(labels=torch.full((B, T), -100), ignore_index=-1), ValueError, "labels"),
    ("temperature-zero", _logits(temperature=0.0), ValueError, "temperature"),
    ("temperature-negative", _logits(temperature=-1.0), ValueError, "temperature"),
    ("temperature-nan", _logits(temperature=math.nan), ValueError, "temperature"),
    ("temperature-inf", _logits(temperature=math.inf), ValueError, "temperature"),
    ("temperature-str", _logits(temperature="1"), TypeError, "temperature"),
    ("ignore-index-float", _logits(ignore_index=-100.0), TypeError, "ignore_index"),
    # token_logprobs
    ("hidden-int", _token(hidden=torch.zeros(B, T, H, dtype=torch.int32)), TypeError, "hidden"),
    ("weight-1d", _token(weight=_f(V)), ValueError, "weight"),
    ("weight-hidden-size", _token(weight=_f(V, H + 1)), ValueError, "weight"),
    ("weight-no-rows", _token(weight=_f(0, H)), ValueError, "weight"),
    ("weight-device", _token(weight=_f(V, H, device=META)), ValueError, "weight"),
    ("token-labels-shape", _token(labels=_labels(B, T, 1)), ValueError, "labels"),
    ("token-labels-range", _token(labels=torch.full((B, T), V)), ValueError, "labels"),
    ("token-labels-device", _token(labels=_labels(B, T, device=META)), ValueError, "labels"),
    ("bias-shape", _token(bias=_f(V + 1)), ValueError, "bias"),
    ("bias-dtype", _token(bias=torch.zeros(V, dtype=torch.int64)), TypeError, "bias"),
    ("bias-device", _token(bias=_f(V, device=META)), ValueError, "bias"),
    ("chunk-size-zero", _token(chunk_size=0), ValueError, "chunk_size"),
    ("chunk-size-float", _token(chunk_size=2.5), TypeError, "chunk_size"),
    ("mem-budget-zero", _token(mem_budget=0), ValueError, "mem_budget"),
    ("grad-filter-eps", _token(grad_filter_eps=2.0), ValueError, "grad_filter_eps"),
    ("token-temperature", _token(temperature=0), ValueError, "temperature"),
    # sequence_logprobs
    ("token-logp-1d", _seq(token_logp=_f(T)), ValueError, "token_logp"),
    ("seq-mask-shape", _seq(mask=_mask(B, T + 1)), ValueError, "mask"),
    ("seq-mask-complex", _seq(mask=torch.ones(B, T, dtype=torch.complex64)), TypeError, "mask"),
    ("seq-mask-device", _seq(mask=torch.ones(B, T, device=META)), ValueError, "mask"),
    ("seq-average-empty-row", _seq(mask=torch.tensor([[1, 0, 0, 0, 0], [0] * 5, [1] * 5]), average=True),
     ValueError, "mask"),
    # kl_penalty
    ("kl-kind", _kl(kind="k4"), ValueError, "kind"),
    ("kl-logp-int", _kl(logp=torch.zeros(B, T, dtype=torch.int64)), TypeError, "logp"),
    ("kl-ref-shape", _kl(ref_logp=_f(B, T + 1)), ValueError, "ref_logp"),
    ("kl-ref-device", _kl(ref_logp=_f(B, T, device=META)), ValueError, "ref_logp"),
    # group_advantages / rloo_advantages
    ("rewards-2d", _group(rewards=_f(2, 4)), ValueError, "rewards"),
    ("rewards-int", _group(rewards=torch.zeros(8, dtype=torch.int64)), TypeError, "rewards"),
    ("group-size-zero", _group(group_size=0), ValueError, "group_size"),
    ("group-size-not-dividing", _group(group_size=3), ValueError, "group_size"),
    ("group-size-float", _group(group_size=4.0), TypeError, "group_size"),
    ("group-size-bool", _group(group_size=True), TypeError, "group_size"),
    ("scale-unknown", _group(scale="std"), ValueError, "scale"),
    ("eps-negative", _group(eps=-1e-4), ValueError, "eps"),
    ("rloo-group-size-one", _rloo(group_size=1), ValueError, "group_size"),
    ("rloo-not-dividing", _rloo(group_size=3), ValueError, "group_size"),
    # gae / whiten
    ("gae-rewards-1d", _gae(rewards=_f(T)), ValueError, "rewards"),
    ("gae-values-shape", _gae(values=_f(B, T + 1)), ValueError, "values"),
    ("gae-values-device", _gae(values=_f(B, T, device=META)), ValueError, "values"),
    ("gae-mask-shape", _gae(mask=_mask(B + 1, T)), ValueError, "mask"),
    ("gae-gamma", _gae(gamma=1.5), ValueError, "gamma"),
    ("gae-lam", _gae(lam=-0.1), ValueError, "lam"),
    ("whiten-x-int", _whiten(x=torch.zeros(B, T, dtype=torch.int64)), TypeError, "x"),
    ("whiten-mask-shape", _whiten(mask=_mask(T)), ValueError, "mask"),
    ("whiten-mask-empty", _whiten(mask=torch.zeros(B, T, dtype=torch.bool)), ValueError, "mask"),
    ("whiten-eps", _whiten(eps=-1.0), ValueError, "eps"),
    # policy_loss / value_loss
    ("policy-logp-1d", _policy(logp=_f(T)), ValueError, "logp"),
    ("policy-old-shape", _policy(old_logp=_f(B, T + 1)), ValueError, "old_logp"),
    ("policy-old-device", _policy(old_logp=_f(B, T, device=META)), ValueError, "old_logp"),
    ("policy-adv-shape", _policy(advantages=_f(B + 1)), ValueError, "advantages"),
    ("policy-adv-2d-shape", _policy(advantages=_f(B, T + 1)), ValueError, "advantages"),
    ("policy-adv-device", _policy(advantages=_f(B, device=META)), ValueError, "advantages"),
    ("policy-mask-shape", _policy(mask=_mask(B, T - 1)), ValueError, "mask"),
    ("policy-beta-no-ref", _policy(beta=0.1), ValueError, "ref_logp"),
    ("policy-ref-shape", _policy(beta=0.1, ref_logp=_f(B)), ValueError, "ref_logp"),
    ("policy-ref-device", _policy(beta=0.1, ref_logp=_f(B, T, device=META)), ValueError, "ref_logp"),
    ("policy-beta-negative", _policy(beta=-0.1), ValueError, "beta"),
    ("policy-kl-kind", _policy(kl_kind="k5"), ValueError, "kl_kind"),
    ("policy-clip-low", _policy(clip_low=1.0), ValueError, "clip_low"),
    ("policy-clip-high", _policy(clip_high=-0.1), ValueError, "clip_high"),
    ("policy-loss-type", _policy(loss_type="ppo"), ValueError, "loss_type"),
    ("policy-max-len", _policy(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    ("policy-num-items-zero", _policy(loss_type="dapo", num_items=0), ValueError, "num_items"),
    ("policy-num-items-vector", _policy(loss_type="dapo", num_items=torch.ones(2)), ValueError, "num_items"),
    ("value-old-shape", _value(old_values=_f(B, T + 1)), ValueError, "old_values"),
    ("value-returns-device", _value(returns=_f(B, T, device=META)), ValueError, "returns"),
    ("value-returns-int", _value(returns=torch.zeros(B, T, dtype=torch.int64)), TypeError, "returns"),
    ("value-mask-shape", _value(mask=_mask(B)), ValueError, "mask"),
    ("value-clip", _value(clip=0.0), ValueError, "clip"),
    # preference losses
    ("dpo-2d", _dpo(policy_chosen_logps=_f(B, 1)), ValueError, "policy_chosen_logps"),
    ("dpo-shape", _dpo(policy_rejected_logps=_f(B + 1)), ValueError, "policy_rejected_logps"),
    ("dpo-ref-device", _dpo(ref_rejected_logps=_f(B, device=META)), ValueError, "ref_rejected_logps"),
    ("dpo-ref-dtype", _dpo(ref_chosen_logps=torch.zeros(B, dtype=torch.int64)), TypeError, "ref_chosen_logps"),
    ("dpo-beta", _dpo(beta=0.0), ValueError, "beta"),
    ("dpo-loss-type", _dpo(loss_type="kto"), ValueError, "loss_type"),
    ("dpo-label-smoothing", _dpo(label_smoothing=0.5), ValueError, "label_smoothing"),
    ("simpo-beta", _simpo(beta=-2.0), ValueError, "beta"),
    ("simpo-gamma", _simpo(gamma="0.5"), TypeError, "gamma"),
    ("simpo-shape", _simpo(rejected_logps=_f(B + 2)), ValueError, "rejected_logps"),
    ("simpo-label-smoothing", _simpo(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ("bt-empty", _bt(chosen_rewards=_f(0), rejected_rewards=_f(0)), ValueError, "chosen_rewards"),
    ("bt-shape", _bt(rejected_rewards=_f(B + 1)), ValueError, "rejected_rewards"),
    ("bt-device", _bt(rejected_rewards=_f(B, device=META)), ValueError, "rejected_rewards"),
    ("bt-margin-shape", _bt(margin=_f(B + 1)), ValueError, "margin"),
    ("bt-margin-type", _bt(margin="1"), TypeError, "margin"),
    ("bt-center-coef", _bt(center_coef=-0.01), ValueError, "center_coef"),
]


@pytest.mark.parametrize("call,exc,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"^{name} ") as info:
        call()
    # The message says what was received, after what was expected.
    assert " got " in str(info.value) or str(info.value).endswith("got None"), str(info.value)


def test_valid_calls_pass():
    """The base call of every case above is valid: each failure comes from the one changed argument."""
    for builder in (_logits, _token, _seq, _kl, _group, _rloo, _gae, _whiten, _policy, _value, _dpo, _simpo, _bt):
        builder()()
    _logits(labels=torch.full((B, T), -100))()  # all positions ignored is valid
    _logits(labels=torch.full((B, T), -1), ignore_index=-1)()
    _policy(beta=0.1, ref_logp=_f(B, T), advantages=_f(B, T))()
    _policy(loss_type="dapo", num_items=torch.tensor(12.0))()
    _bt(margin=0.5)()
    _bt(margin=_f(B))()


def test_messages_state_expected_and_received():
    dtypes = r"\(float32, bfloat16, float16, float64\)"
    with pytest.raises(TypeError, match=rf"logits must have dtype in {dtypes}, got int64"):
        _logits(logits=torch.zeros(B, T, V, dtype=torch.int64))()
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or ignore_index=-100, got {V}"):
        _logits(labels=torch.full((B, T), V))()
    with pytest.raises(ValueError, match=r"group_size must divide the number of rewards: got group_size=3 for 8"):
        _group(group_size=3)()
    with pytest.raises(ValueError, match=r"labels must be on cpu like logits, got meta"):
        _logits(labels=_labels(B, T, device=META))()
    with pytest.raises(ValueError, match=r"scale must be one of 'group', 'batch', 'none', got 'std'"):
        _group(scale="std")()
    expected_shape = r"\(3, 5\) \(the shape of logits without its last dim\)"
    with pytest.raises(ValueError, match=rf"labels must have shape {expected_shape}, got \(3, 6\)"):
        _logits(labels=_labels(B, T + 1))()


def test_value_checks_can_be_switched_off(monkeypatch):
    # FASTALIGN_CHECK_VALUES=0 skips the checks that need a device sync; shape checks stay on.
    bad_labels = torch.full((4,), 99)
    empty_rows = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="labels"):
        v.labels_in_range(bad_labels, 10, -100)
    with pytest.raises(ValueError, match="mask"):
        v.nonempty_rows("mask", empty_rows)
    monkeypatch.setenv("FASTALIGN_CHECK_VALUES", "0")
    v.labels_in_range(bad_labels, 10, -100)
    v.nonempty_rows("mask", empty_rows)
    with pytest.raises(ValueError, match="labels"):
        _logits(labels=_labels(B, T + 1))()
