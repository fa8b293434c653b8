"""Compiled Triton kernels of the RL/preference ops on a CUDA device (skipped without one).

Production sizes and awkward ones, fp32 and bf16, against float64 formulas computed on the CPU;
plus what only a GPU shows: deterministic bits across runs and capture in a CUDA graph (which
fails on any host synchronization inside the op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLIPPED_LOSS_TYPES, aggregate64, kl64

from fastalign import ops
from fastalign.ops.kl import KL_KINDS
from fastalign.ops.preference import DPO_LOSS_TYPES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def triton_only():
    status = ops.backends()["triton"]
    if not status.available:
        pytest.skip(f"triton backend unavailable: {status.reason}")
    with ops.backend("triton"):
        yield


def rel_err(got, want, scale=0.0):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got[torch.isfinite(want)]).all(), "non-finite result"
    return (got - want).abs().max().item() / max(want.abs().max().item(), scale, 1e-30)


def policy64(lp, old, adv, mask, ref, beta, kl_kind, loss_type, clip_low=0.2, clip_high=0.28):
    kl = kl64(lp, ref, kl_kind)
    m = mask.double()
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(lp - old)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a) + beta * kl

    def aggregate(x):
        return aggregate64(x, mask, loss_type)

    return aggregate(per_token), aggregate(per_token.abs()).item(), (kl * m).sum() / m.sum().clamp(min=1)


def policy_inputs(B, T, dtype, per_token=False):
    lp = -torch.rand(B, T, device="cuda") * 3
    old = lp + 0.25 * torch.randn_like(lp)
    ref = lp + 0.4 * torch.randn_like(lp)
    adv = torch.randn(B, T, device="cuda") if per_token else torch.randn(B, device="cuda")
    mask = torch.rand(B, T, device="cuda") > 0.2
    mask[0, T // 2:] = False
    return lp.to(dtype), old.to(dtype), ref.to(dtype), adv.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", CLIPPED_LOSS_TYPES)
@pytest.mark.parametrize("B,T,per_token", [(64, 4096, False), (7, 3001, True), (1, 1, False)])
def test_policy_loss(B, T, per_token, loss_type, dtype):
    lp, old, ref, adv, mask = policy_inputs(B, T, dtype, per_token)
    for kl_kind in KL_KINDS:
        x = lp.clone().requires_grad_(True)
        loss, metrics = ops.policy_loss(x, old, adv, mask, ref_logp=ref, beta=0.04, kl_kind=kl_kind,
                                        clip_high=0.28, loss_type=loss_type)
        (grad,) = torch.autograd.grad(loss, x)
        x64 = x.detach().double().cpu().requires_grad_(True)
        loss64, scale, kl_mean64 = policy64(x64, old.double().cpu(), adv.double().cpu(), mask.cpu(),
                                            ref.double().cpu(), 0.04, kl_kind, loss_type)
        (grad64,) = torch.autograd.grad(loss64, x64)
        assert rel_err(loss, loss64, scale) < TOL[dtype], kl_kind
        assert rel_err(metrics["kl"], kl_mean64) < TOL[dtype], kl_kind
        assert grad.dtype == dtype and rel_err(grad, grad64) < TOL[dtype], kl_kind


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty(kind):
    lp = (-torch.rand(64, 4097, device="cuda") * 3).requires_grad_(True)
    ref = lp.detach() + 0.3 * torch.randn_like(lp)
    out = ops.kl_penalty(lp, ref, kind=kind)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, lp, upstream)
    lp64 = lp.detach().double().cpu().requires_grad_(True)
    d = ref.double().cpu() - lp64
    out64 = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.expm1(d) - d, "abs": d.abs()}[kind]
    (grad64,) = torch.autograd.grad(out64, lp64, upstream.double().cpu())
    assert rel_err(out, out64) < 1e-5 and rel_err(grad, grad64) < 1e-5


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_simpo_bradley_terry(loss_type):
    B = 4099
    pc, pr, rc, rr = (-torch.rand(B, device="cuda") * 50 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = ops.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    gc, gr = torch.autograd.grad(losses.mean(), [pc, pr])
    pc64, pr64 = (t.detach().double().cpu().requires_grad_(True) for t in (pc, pr))
    z = 0.1 * ((pc64 - rc.double().cpu()) - (pr64 - rr.double().cpu()))
    losses64 = {
        "sigmoid": -0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z),
        "hinge": torch.relu(1 - z),
        "ipo": (z / 0.1 - 5.0) ** 2,
        "robust": (-0.9 * F.logsigmoid(z) + 0.1 * F.logsigmoid(-z)) / 0.8,
    }[loss_type]
    gc64, gr64 = torch.autograd.grad(losses64.mean(), [pc64, pr64])
    assert rel_err(losses, losses64) < 1e-5 and rel_err(gc, gc64) < 1e-5 and rel_err(gr, gr64) < 1e-5

    c, r = (torch.randn(B, device="cuda").requires_grad_(True) for _ in range(2))
    loss, metrics = ops.bradley_terry_loss(c, r, margin=0.5, center_coef=0.01)
    gc, gr = torch.autograd.grad(loss, [c, r])
    c64, r64 = (t.detach().double().cpu().requires_grad_(True) for t in (c, r))
    loss64 = -F.logsigmoid(c64 - r64 - 0.5).mean() + 0.01 * ((c64 + r64) ** 2).mean()
    gc64, gr64 = torch.autograd.grad(loss64, [c64, r64])
    assert rel_err(loss, loss64) < 1e-5 and rel_err(gc, gc64) < 1e-5 and rel_err(gr, gr64) < 1e-5

    losses, _, _ = ops.simpo_loss(c, r, beta=2.0, gamma=0.5)
    (gc,) = torch.autograd.grad(losses.sum(), c)
    z64 = 2.0 * (c64 - r64) - 0.5
    (gc64,) = torch.autograd.grad(-F.logsigmoid(z64).sum(), c64)
    assert rel_err(gc, gc64) < 1e-5


def test_policy_loss_is_deterministic_and_graph_capturable():
    lp, old, ref, adv, mask = policy_inputs(64, 4096, torch.bfloat16)
    x = lp.clone().requires_grad_(True)

    def step():
        loss, metrics = ops.policy_loss(x, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="dapo")
        (grad,) = torch.autograd.grad(loss, x)
        return loss, metrics["clip_ratio/region_mean"], grad

    eager = [step() for _ in range(3)]
    for run in eager[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, eager[0]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as CUDA graph capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, eager[0]))
