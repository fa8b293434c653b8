"""The fused losses run on the backend that is forced, everywhere: no silent fallback.

With ``ops.backend("triton")`` (the interpreter on CPU) every fused loss must execute the Triton
kernels — counted on their launchers — and match the torch backend; with ``ops.backend("torch")``
no compiled (``torch.ops.fastalign``) or Triton code may run at all.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import TOL, rel_err

from fastalign import losses, ops
from fastalign.ops import dispatch

V, H, T = 37, 8, 6  # V is not a multiple of any block


def _common(seed, sequences):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sequences, T, H, generator=g)
    weight = 0.5 * torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (sequences, T), generator=g)
    labels[:, :2] = -100  # prompt tokens
    labels[0, -1] = -100  # padding
    return g, hidden, weight, labels


def _grpo_case(loss_cls):
    def run():
        g, hidden, weight, labels = _common(0, 4)
        adv = torch.randn(4, generator=g) if loss_cls is losses.FusedLinearGRPOLoss else torch.randn(4, T, generator=g)
        old = -torch.rand(4, T, generator=g) * 3
        ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g)
        h, w = hidden.requires_grad_(), weight.requires_grad_()
        loss, metrics = loss_cls(beta=0.04, epsilon_high=0.28, entropy_coef=0.01)(
            h, w, labels, advantages=adv, old_logps=old, ref_hidden=ref_hidden)
        loss.backward()
        return loss, metrics, (h.grad, w.grad)
    return run


def _pair_case(name):
    def run():
        g, hidden, weight, labels = _common(1, 4)
        h, w = hidden.requires_grad_(), weight.requires_grad_()
        if name == "dpo":
            ref_hidden = hidden.detach() + 0.1 * torch.randn(hidden.shape, generator=g)
            loss, metrics = losses.FusedLinearDPOLoss(beta=0.1)(h, w, labels, ref_hidden=ref_hidden)
        else:
            loss, metrics = losses.FusedLinearSimPOLoss(beta=2.0, gamma=0.5)(h, w, labels)
        loss.backward()
        return loss, metrics, (h.grad, w.grad)
    return run


CASES = {
    "grpo": (_grpo_case(losses.FusedLinearGRPOLoss), ("row_forward", "row_backward", "policy_tokens")),
    "ppo": (_grpo_case(losses.FusedLinearPPOLoss), ("row_forward", "row_backward", "policy_tokens")),
    "dpo": (_pair_case("dpo"), ("row_forward", "row_backward", "dpo_forward", "dpo_backward")),
    "simpo": (_pair_case("simpo"), ("row_forward", "row_backward", "simpo_forward", "simpo_backward")),
}
LAUNCHERS = {"logprobs_rows": ("row_forward", "row_backward"),
             "rl_losses": ("policy_tokens", "dpo_forward", "dpo_backward", "simpo_forward", "simpo_backward")}


def _triton_modules():
    from fastalign.triton_kernels import logprobs_rows, rl_losses

    return {"logprobs_rows": logprobs_rows, "rl_losses": rl_losses}


@pytest.fixture
def triton_calls(monkeypatch):
    if not dispatch.backends()["triton"].available:
        pytest.skip("triton is not available (no CUDA and no interpreter)")
    calls = Counter()

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for module_name, module in _triton_modules().items():
        for name in LAUNCHERS[module_name]:
            monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_triton_runs_the_triton_kernels_and_matches_torch(name, triton_calls):
    run, launchers = CASES[name]
    with ops.backend("torch"):
        want_loss, want_metrics, want_grads = run()
    with ops.backend("triton"):
        loss, metrics, grads = run()
    for launcher in launchers:
        assert triton_calls[launcher] > 0, f"{name} under the triton backend never called {launcher}"
    assert rel_err(loss, want_loss) < TOL[torch.float32]
    assert set(metrics) == set(want_metrics)
    for key in metrics:
        assert rel_err(metrics[key], want_metrics[key], 1.0) < TOL[torch.float32], key
    for g, want in zip(grads, want_grads):
        assert rel_err(g, want) < TOL[torch.float32]


class _Forbidden:
    """Any attribute access (an op of torch.ops.fastalign) or call (a Triton launcher) fails the test."""

    def __init__(self, what):
        self.what = what

    def __getattr__(self, name):
        raise AssertionError(f"{self.what}.{name} ran under ops.backend('torch')")

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.what} ran under ops.backend('torch')")


@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_torch_runs_no_compiled_or_triton_code(name, monkeypatch):
    run, _ = CASES[name]
    with ops.backend("cpu" if dispatch.backends()["cpu"].available else "torch"):
        want = run()
    monkeypatch.setattr(torch.ops, "fastalign", _Forbidden("torch.ops.fastalign"))
    if dispatch.backends()["triton"].available:
        for module_name, module in _triton_modules().items():
            for launcher in LAUNCHERS[module_name]:
                monkeypatch.setattr(module, launcher, _Forbidden(f"{module_name}.{launcher}"))
    with ops.backend("torch"):
        loss, metrics, grads = run()
    assert rel_err(loss, want[0]) < TOL[torch.float32]
    for g, w in zip(grads, want[2]):
        assert rel_err(g, w) < TOL[torch.float32]
