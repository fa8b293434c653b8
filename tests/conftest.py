"""Shared helpers for the tests: tolerances, relative-error checks, backend switching.

Parity checks compare against a float64 computation written in the test itself. The relative
error is ``max|actual - expected| / max|expected|`` (so entries near zero do not blow it up),
NaN or Inf in the actual value always fails, and an all-zero expectation is compared exactly.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

# Triton decorates its own library functions (tl.sum, ...) when it is first imported, so the CPU
# interpreter must be chosen before anything imports triton: here, before any test module loads.
# Without CUDA every Triton kernel then runs in the interpreter on CPU tensors, in this process.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if TRITON_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from fastalign.ops import dispatch  # noqa: E402

# Relative-error tolerances against float64 (DESIGN.md, "Numerics").
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """``max|actual - expected| / max(max|expected|, scale)``; the plain max difference when both are 0."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    denom = max(e.abs().max().item(), scale)
    diff = (a - e).abs().max().item()
    return diff / denom if denom > 0 else diff


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "value",
               scale: float = 0.0) -> None:
    """``actual`` is finite where ``expected`` is, and within ``tol`` relative error of it.

    ``scale`` is the size of the terms that cancel into ``expected`` where it is the small
    difference of large terms (the gradient of a normalization): float32 rounding is relative
    to those terms, not to their difference.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    assert torch.isfinite(a[finite]).all(), f"{what}: non-finite entries {a[finite & ~torch.isfinite(a)][:5]}"
    err = rel_err(a, e, scale)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:g}"


# ------------------------------------------------------------------- float64 truths, one per kind
# Written here from the formulas (ANCHORS.md), independently of the specs, and shared by every
# backend's tests: a new kind adds one branch here and is then tested on every backend, since the
# tests parametrize over the kind lists the ops declare (fastalign.ops.*.spec).
def kl64(logp, ref, kind):
    """KL(policy || ref) estimators from d = ref - logp, in float64 (differentiable in logp)."""
    d = ref - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(d) - d
    if kind == "abs":
        return d.abs()
    raise AssertionError(f"no float64 formula for KL kind {kind!r}: add it to tests/conftest.py")


# The loss types of the clipped surrogate; cispo is another objective (an absolute weight cap), tested against
# TRL's formula in tests/test_policy_objectives.py.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def aggregate64(x, mask, loss_type, max_len=None, num_items=None):
    """The policy loss's aggregation of per-token terms ``x [B, T]`` under ``mask`` (float64)."""
    m = mask.double()
    x = x * m
    batch, length = m.shape
    if loss_type == "grpo":
        return (x.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return x.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return x.sum() / (batch * (length if max_len is None else max_len))
    if loss_type in ("dapo", "cispo"):
        count = m.sum() if num_items is None else torch.tensor(float(num_items), dtype=torch.float64)
        return x.sum() / count.clamp(min=1)
    raise AssertionError(f"no float64 formula for loss type {loss_type!r}: add it to tests/conftest.py")


def dpo64(pc, pr, rc, rr, *, beta, loss_type, label_smoothing):
    """DPO-family losses per pair, and the rewards beta·(policy − ref) (float64)."""
    logsig = torch.nn.functional.logsigmoid
    delta = (pc - rc) - (pr - rr)
    z, eps = beta * delta, label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * logsig(z) - eps * logsig(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    else:
        raise AssertionError(f"no float64 formula for DPO loss type {loss_type!r}: add it to tests/conftest.py")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.fixture
def torch_backend():
    """Run the test body on the pure-PyTorch reference backend."""
    with dispatch.backend("torch"):
        yield


def run_two_processes(script, *args) -> None:
    """``script args`` under ``torchrun --nproc_per_node 2`` (gloo, one thread each, tests/ importable)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def one_and_two_processes(script_text, tmp_path, seed):
    """Run a worker script (``argv: out_file seed``) under 2 gloo processes and in this process (world size 1,
    the reference); returns what each saved: ``(one, two)``."""
    import torch

    worker = tmp_path / "worker.py"
    worker.write_text(script_text)
    run_two_processes(worker, tmp_path / "two.pt", seed)
    argv = sys.argv
    try:
        sys.argv = ["worker", str(tmp_path / "one.pt"), str(seed)]
        exec(compile(script_text, "worker", "exec"), {"__name__": "worker"})
    finally:
        sys.argv = argv
    return torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")


def use_triton() -> None:
    """Skip unless the triton backend runs here (compiled on CUDA, else in the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    dispatch._triton_status.cache_clear()  # cached, maybe while a test had TRITON_INTERPRET unset
    status = dispatch.backends()["triton"]
    if not status.available:
        pytest.skip(f"triton backend unavailable: {status.reason}")
    if TRITON_DEVICE == "cpu":
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        # A kernel decorated outside the interpreter would be launched as GPU code: fail, don't skip.
        assert isinstance(triton.language.sum, InterpretedFunction), \
            "triton was imported before tests/conftest.py set TRITON_INTERPRET=1"


@pytest.fixture
def cpu_backend():
    """Run the test body on the native C++ backend (skipped when fastalign._C is not built)."""
    status = dispatch.backends()["cpu"]
    if not status.available:
        pytest.skip(f"cpu backend unavailable: {status.reason}")
    with dispatch.backend("cpu"):
        yield


def logprobs64(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """float64 log-prob of each label and entropy, written out (shifted log-sum-exp); 0 on ignored rows."""
    z = logits.detach().to(torch.float64) / temperature
    top = z.max(dim=-1, keepdim=True).values
    lse = top + (z - top).exp().sum(-1, keepdim=True).log()
    p = (z - lse).exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)
    entropy = lse.squeeze(-1) - (p * z).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def logprobs_grad64(logits: torch.Tensor, labels: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor,
                    temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """Analytic d(logits) of sum(grad_logp * logp + grad_entropy * entropy), in float64.

    d logp / dz = onehot(label) - p and d entropy / dz = -p * (z - E_p[z]), each divided by the
    temperature; ignored rows get no gradient.
    """
    z = logits.detach().to(torch.float64) / temperature
    p = torch.softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    onehot = torch.zeros_like(z).scatter_(-1, safe.unsqueeze(-1), 1.0)
    mean_z = (p * z).sum(-1, keepdim=True)
    g_lp = grad_logp.to(torch.float64).unsqueeze(-1)
    g_ent = grad_entropy.to(torch.float64).unsqueeze(-1)
    dz = g_lp * (onehot - p) - g_ent * p * (z - mean_z)
    return torch.where(valid.unsqueeze(-1), dz, torch.zeros_like(dz)) / temperature


def std64(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Unbiased std written out; a single sample has std 0, and so has its slope where it is 0."""
    n = x.numel() if dim is None else x.shape[dim]
    mean = x.mean() if dim is None else x.mean(dim, keepdim=True)
    if n < 2:
        return torch.zeros_like(mean)
    sq = ((x - mean) ** 2).sum() if dim is None else ((x - mean) ** 2).sum(dim, keepdim=True)
    var = sq / (n - 1)
    return torch.where(var > 0, var.clamp(min=1e-300).sqrt(), torch.zeros_like(var))


def group_adv64(r: torch.Tensor, group: int, scale: str, eps: float) -> torch.Tensor:
    """GRPO advantages (r - group mean) / (std + eps), std per group, over the batch or none."""
    g = r.view(-1, group)
    adv = g - g.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (std64(g, dim=1) + eps)
    elif scale == "batch":
        adv = adv / (std64(r) + eps)
    return adv.reshape(-1)


def gae64(rewards, values, mask, gamma, lam):
    """GAE on the compacted sequence of unmasked positions of each row, scattered back."""
    r, v = rewards.double(), values.double()
    adv_rows = []
    for b in range(r.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        row = [torch.zeros((), dtype=torch.float64)] * r.shape[1]
        running = torch.zeros((), dtype=torch.float64)
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = v[b, idx[k + 1]] if k + 1 < len(idx) else 0.0
            running = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * running
            row[t] = running
        adv_rows.append(torch.stack(row))
    adv = torch.stack(adv_rows)
    returns = torch.where(mask.bool(), adv + v, torch.zeros_like(adv))
    return adv, returns
