"""Triton kernels of kl_penalty, policy_loss, dpo_loss, simpo_loss and bradley_terry_loss.

Without CUDA the kernels run in Triton's CPU interpreter; with CUDA they run compiled on the GPU.
Values, metrics and gradients are checked against float64 formulas written here, with fresh
random inputs on every run.

tests/conftest.py selects the interpreter (TRITON_INTERPRET=1) before anything imports triton.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import CLIPPED_LOSS_TYPES, aggregate64, dpo64, kl64, use_triton
from conftest import TRITON_DEVICE as DEVICE

from fastalign import ops
from fastalign.ops import dispatch
from fastalign.ops.kl import KL_KINDS
from fastalign.ops.preference import DPO_LOSS_TYPES

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_backend():
    use_triton()
    yield


def rel_err(got: torch.Tensor, want: torch.Tensor, scale: float = 0.0) -> float:
    """max |got - want| / max(max |want|, scale); NaN or Inf in ``got`` where ``want`` is finite fails."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    if not torch.isfinite(got[torch.isfinite(want)]).all():
        return float("inf")
    denom = max(want.abs().max().item() if want.numel() else 0.0, scale, 1e-30)
    return (got - want).abs().max().item() / denom if want.numel() else 0.0


def triton_call(fn, *args, **kw):
    with ops.backend("triton"):
        return fn(*args, **kw)


def leaf(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(DEVICE).requires_grad_(True)


def as64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().cpu().requires_grad_(True)


# ----------------------------------------------------------------------------------- float64 truth
def policy64(lp, old, adv, mask, ref, *, beta, kl_kind, clip_low, clip_high, loss_type, max_len, num_items):
    """(loss, metrics, scale): ``scale`` is the same aggregation of |per-token loss| (conditioning)."""
    m = mask.double()
    a = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(lp - old)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
    kl = kl64(lp, ref, kl_kind) if beta > 0 else None
    if kl is not None:
        per_token = per_token + beta * kl

    def aggregate(x):
        return aggregate64(x, mask, loss_type, max_len, num_items)

    count = m.sum().clamp(min=1)
    with torch.no_grad():
        low = (ratio < 1 - clip_low) & (a < 0)
        high = (ratio > 1 + clip_high) & (a > 0)
        metrics = {"clip_ratio/low_mean": (low * m).sum() / count, "clip_ratio/high_mean": (high * m).sum() / count,
                   "clip_ratio/region_mean": ((low | high) * m).sum() / count,
                   "approx_kl": 0.5 * ((lp - old).square() * m).sum() / count}
        if kl is not None:
            metrics["kl"] = (kl * m).sum() / count
        scale = aggregate(per_token.abs()).item()
    return aggregate(per_token), metrics, scale


def simpo64(c, r, *, beta, gamma, label_smoothing):
    z = beta * (c - r) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * c.detach(), beta * r.detach()


def bt64(c, r, margin, center_coef):
    diff = c - r - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((c + r) ** 2).mean()
    return loss, {"accuracy": (c > r).double().mean(), "margin": (c - r).mean()}


# ----------------------------------------------------------------------------------- inputs
def policy_inputs(B, T, *, adv_per_token, mask_kind="bool", empty_row=False):
    lp = -torch.rand(B, T) * 3 - 0.01
    old = lp + 0.25 * torch.randn(B, T)  # ratios spread well past the clip range
    ref = lp + 0.4 * torch.randn(B, T)
    adv = torch.randn(B, T) if adv_per_token else torch.randn(B)
    adv[torch.rand(adv.shape) < 0.2] = 0.0  # GRPO groups with equal rewards: the clip terms tie
    mask = torch.rand(B, T) > 0.3
    if empty_row and B > 1:
        mask[torch.randint(B, ())] = False
    if mask_kind == "float":
        mask = mask.float()
    elif mask_kind == "int":
        mask = mask.long()
    return lp, old, ref, adv, mask


def run_policy(lp, old, ref, adv, mask, dtype, *, adv_grad=False, **kw):
    """Triton loss/metrics/grads and the float64 truth for the same (rounded) inputs."""
    lp_t = leaf(lp, dtype)
    old_t, ref_t = old.to(dtype).to(DEVICE), ref.to(dtype).to(DEVICE)
    adv_t = adv.to(dtype).to(DEVICE).requires_grad_(adv_grad)
    mask_t = mask.to(DEVICE)
    loss, metrics = triton_call(ops.policy_loss, lp_t, old_t, adv_t, mask_t, ref_logp=ref_t, **kw)
    wrt = [lp_t, adv_t] if adv_grad else [lp_t]
    grads = torch.autograd.grad(loss, wrt)

    lp64, adv64 = as64(lp_t), as64(adv_t)
    clip_high = kw.get("clip_high") if kw.get("clip_high") is not None else kw.get("clip_low", 0.2)
    loss64, metrics64, scale = policy64(
        lp64, old_t.double().cpu(), adv64, mask.cpu(), ref_t.double().cpu(), beta=kw.get("beta", 0.0),
        kl_kind=kw.get("kl_kind", "k3"), clip_low=kw.get("clip_low", 0.2), clip_high=clip_high,
        loss_type=kw.get("loss_type", "grpo"), max_len=kw.get("max_completion_length"),
        num_items=kw.get("num_items"))
    grads64 = torch.autograd.grad(loss64, [lp64, adv64] if adv_grad else [lp64])
    return (loss, metrics, grads), (loss64, metrics64, grads64, scale)


def check_policy(got, want, dtype):
    (loss, metrics, grads), (loss64, metrics64, grads64, scale) = got, want
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, loss64, scale) < tol
    assert set(metrics) == set(metrics64) | {"clip_ratio/low_min", "clip_ratio/high_max"}  # (test_policy_objectives)
    for name in metrics64:
        assert rel_err(metrics[name], metrics64[name], 1.0 if name.startswith("clip_ratio") else 0.0) < tol, name
    for g, g64 in zip(grads, grads64):
        assert g.dtype == dtype
        assert rel_err(g, g64) < tol


# ----------------------------------------------------------------------------------- tests
def test_every_op_has_a_triton_backend():
    for op in ("kl_penalty", "policy_loss", "dpo_loss", "simpo_loss", "bradley_terry_loss"):
        assert "triton" in dispatch.implementations(op), op
    assert ops.backends()["triton"].available


def test_import_without_triton_still_works():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import fastalign.ops as o\n"
            "assert not o.backends()['triton'].available, o.backends()['triton']\n"
            "assert 'triton' in o.dispatch.implementations('policy_loss')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# Compiles each kernel, every optional path on, to a Hopper cubin in a process without the
# interpreter: the interpreter accepts code that the compiler rejects (types, constexpr branches).
_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastalign.triton_kernels import rl_losses as k

def compile_for_sm90(fn, pointers, floats, constexprs):
    sig = {n: ("constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32"))
           for n in fn.arg_names}
    cst = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32))

bf, f32, u8 = "*bf16", "*fp32", "*u8"
scalars = {"ratio_low", "ratio_high", "beta", "cispo_cap", "delta", "dual_clip",
           "ipo_target", "label_smoothing", "gamma", "margin_value",
           "center_coef", "norm_value"}
ptr = lambda fn, **kw: {n: kw.get(n, bf) for n in fn.arg_names if n.endswith("_ptr")}
outs = dict(out_ptr=f32, partial_ptr=f32, stats_ptr=f32, row_scale_ptr=f32, num_items_ptr=f32, grad_ptr=f32,
            grad_loss_ptr=f32, loss_ptr=f32, chosen_reward_ptr=f32, rejected_reward_ptr=f32, mask_ptr=u8)
cases = [
    (k._kl_fwd_kernel, dict(KL_KIND=2, BLOCK=1024)),
    (k._kl_bwd_kernel, dict(KL_KIND=3, BLOCK=1024)),
    (k._policy_tokens_kernel, dict(ADV_PER_TOKEN=False, SCALE_PER_TOKEN=False, HAS_KL=True, KL_KIND=2,
                                   NEED_ADV_GRAD=False, BLOCK_T=1024)),
    (k._policy_tokens_kernel, dict(ADV_PER_TOKEN=True, SCALE_PER_TOKEN=True, HAS_KL=True, KL_KIND=0,
                                   NEED_ADV_GRAD=True, BLOCK_T=1024)),
    (k._policy_tokens_kernel, dict(ADV_PER_TOKEN=False, SCALE_PER_TOKEN=True, HAS_KL=True, KL_KIND=2,
                                   NEED_ADV_GRAD=True, BLOCK_T=1024, EXT=True, LEVEL=1, OBJECTIVE=0, HAS_TW=True,
                                   HAS_DELTA=True, HAS_DUAL=True, KL_BIAS=True)),
    (k._policy_tokens_kernel, dict(ADV_PER_TOKEN=True, SCALE_PER_TOKEN=False, HAS_KL=False, KL_KIND=2,
                                   NEED_ADV_GRAD=True, BLOCK_T=1024, EXT=True, LEVEL=2, OBJECTIVE=1, HAS_TW=False,
                                   HAS_DELTA=False, HAS_DUAL=False, KL_BIAS=False)),
    (k._dpo_fwd_kernel, dict(LOSS=3, BLOCK=1024)),
    (k._dpo_bwd_kernel, dict(LOSS=1, NEED_CHOSEN=True, NEED_REJECTED=True, BLOCK=1024)),
    (k._simpo_fwd_kernel, dict(BLOCK=1024)),
    (k._simpo_bwd_kernel, dict(NEED_CHOSEN=True, NEED_REJECTED=True, BLOCK=1024)),
    (k._bt_fwd_kernel, dict(MARGIN_PER_PAIR=True, HAS_CENTER=True, BLOCK=1024)),
    (k._bt_bwd_kernel, dict(MARGIN_PER_PAIR=True, HAS_CENTER=True, NEED_C=True, NEED_R=True, NEED_MARGIN=True,
                            BLOCK=1024)),
]
for fn, constexprs in cases:
    types = outs if fn is not k._policy_tokens_kernel else {n: f32 for n in fn.arg_names}  # the token pass is fp32
    compile_for_sm90(fn, ptr(fn, **{n: t for n, t in types.items() if n in fn.arg_names}), scalars, constexprs)
"""


def test_kernels_compile_for_hopper():
    triton_backends = importlib.import_module("triton.backends")
    if "nvidia" not in getattr(triton_backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty(kind, dtype):
    for shape in [(1,), (1, 1), (3, 37), (2, 3, 700)]:
        lp = leaf(-torch.rand(shape) * 3, dtype)
        ref = (lp.detach().float() + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype)
        out = triton_call(ops.kl_penalty, lp, ref, kind=kind)
        assert out.dtype == torch.float32 and out.shape == lp.shape
        upstream = torch.randn(shape, device=DEVICE)
        (grad,) = torch.autograd.grad(out, lp, upstream)
        lp64 = as64(lp)
        out64 = kl64(lp64, ref.double().cpu(), kind)
        (grad64,) = torch.autograd.grad(out64, lp64, upstream.double().cpu())
        assert rel_err(out, out64) < TOL[dtype], shape
        assert grad.dtype == dtype and rel_err(grad, grad64) < TOL[dtype], shape


def test_kl_penalty_non_contiguous_and_small_d():
    base = -torch.rand(6, 40, device=DEVICE)
    lp = base.t().detach().requires_grad_(True)  # a transposed, non-contiguous view
    ref = lp.detach() + 1e-3 * torch.randn_like(lp)  # k3's cancellation region
    out = triton_call(ops.kl_penalty, lp, ref, kind="k3")
    (grad,) = torch.autograd.grad(out.sum(), lp)
    lp64 = as64(lp)
    out64 = kl64(lp64, ref.double().cpu(), "k3")
    (grad64,) = torch.autograd.grad(out64.sum(), lp64)
    assert rel_err(out, out64) < 1e-5 and rel_err(grad, grad64) < 1e-5


# Every loss type with every KL kind in fp32; bf16 with k3 (the kind TRL uses) is enough there.
POLICY_CASES = [(kind, lt, torch.float32) for kind in KL_KINDS for lt in CLIPPED_LOSS_TYPES]
POLICY_CASES += [("k3", lt, torch.bfloat16) for lt in CLIPPED_LOSS_TYPES]


@pytest.mark.parametrize("kl_kind,loss_type,dtype", POLICY_CASES, ids=str)
def test_policy_loss(kl_kind, loss_type, dtype):
    cases = [  # (B, T, advantages per token, mask dtype)
        (1, 1, False, "bool"),
        (3, 37, True, "float"),
        (4, 13, False, "int"),
        (5, 1, True, "bool"),
    ]
    if kl_kind == "k3":
        cases.append((2, 1100, False, "bool"))  # several token blocks per row
    for B, T, per_token, mask_kind in cases:
        lp, old, ref, adv, mask = policy_inputs(B, T, adv_per_token=per_token, mask_kind=mask_kind,
                                                empty_row=True)
        got, want = run_policy(lp, old, ref, adv, mask, dtype, beta=0.04, kl_kind=kl_kind, loss_type=loss_type,
                               clip_low=0.2, clip_high=0.28)
        check_policy(got, want, dtype)


@pytest.mark.parametrize("loss_type", CLIPPED_LOSS_TYPES)
def test_policy_loss_without_kl_and_symmetric_clip(loss_type):
    lp, old, ref, adv, mask = policy_inputs(6, 29, adv_per_token=False)
    got, want = run_policy(lp, old, ref, adv, mask, torch.float32, beta=0.0, loss_type=loss_type, clip_low=0.1)
    assert "kl" not in got[1]
    check_policy(got, want, torch.float32)


def test_policy_loss_normalizers():
    lp, old, ref, adv, mask = policy_inputs(3, 21, adv_per_token=False)
    for kw in [{"loss_type": "dr_grpo", "max_completion_length": 64},
               {"loss_type": "dapo", "num_items": 97},
               {"loss_type": "dapo", "num_items": torch.tensor(41)},
               {"loss_type": "dapo", "num_items": 0.5}]:  # clamped to 1 like the reference
        got, want = run_policy(lp, old, ref, adv, mask, torch.float32, beta=0.1, **kw)
        check_policy(got, want, torch.float32)


@pytest.mark.parametrize("per_token", [False, True])
def test_policy_loss_advantage_gradient(per_token):
    for loss_type in ("grpo", "dapo"):
        lp, old, ref, adv, mask = policy_inputs(4, 1030, adv_per_token=per_token)
        got, want = run_policy(lp, old, ref, adv, mask, torch.float32, adv_grad=True, beta=0.02,
                               loss_type=loss_type)
        check_policy(got, want, torch.float32)


def test_policy_loss_ties_at_the_clip_boundary():
    # ratio exactly 1 (logp == old_logp) sits inside the clip range: torch.minimum splits the tie.
    lp, _, ref, adv, mask = policy_inputs(3, 17, adv_per_token=True)
    old = lp.clone()
    got, want = run_policy(lp, old, ref, adv, mask, torch.float32, beta=0.0)
    check_policy(got, want, torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter computes inf - inf
def test_policy_loss_ignores_padding_garbage():
    lp, old, ref, adv, mask = policy_inputs(3, 40, adv_per_token=False)
    mask[:, 30:] = False
    lp_bad, old_bad, ref_bad = lp.clone(), old.clone(), ref.clone()
    lp_bad[:, 30:] = float("-inf")
    old_bad[:, 30:] = float("nan")
    ref_bad[:, 30:] = float("inf")
    got, _ = run_policy(lp_bad, old_bad, ref_bad, adv, mask, torch.float32, beta=0.1)
    _, want = run_policy(lp, old, ref, adv, mask, torch.float32, beta=0.1)
    check_policy(got, want, torch.float32)


def test_policy_loss_is_deterministic():
    lp, old, ref, adv, mask = policy_inputs(4, 2100, adv_per_token=False)
    runs = [run_policy(lp, old, ref, adv, mask, torch.float32, beta=0.1, loss_type="bnpo")[0] for _ in range(2)]
    (l1, m1, g1), (l2, m2, g2) = runs
    assert torch.equal(l1, l2) and torch.equal(g1[0], g2[0])
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss(loss_type, dtype):
    for B, smoothing in [(1, 0.0), (7, 0.1), (1500, 0.0)]:
        pc, pr = leaf(-torch.rand(B) * 50, dtype), leaf(-torch.rand(B) * 50, dtype)
        # strided views for the reference log-probs
        rc = (pc.detach().float() + torch.randn(B, device=DEVICE) * 5).to(dtype)
        rr = (-torch.rand(2 * B, device=DEVICE) * 50).to(dtype)[::2]
        beta = 0.1 if loss_type != "ipo" else 0.5
        losses, cr, rjr = triton_call(ops.dpo_loss, pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                      label_smoothing=smoothing)
        upstream = torch.rand(B, device=DEVICE)
        gc, gr = torch.autograd.grad((losses * upstream).sum(), [pc, pr])
        pc64, pr64 = as64(pc), as64(pr)
        losses64, cr64, rr64 = dpo64(pc64, pr64, rc.double().cpu(), rr.double().cpu(), beta=beta,
                                     loss_type=loss_type, label_smoothing=smoothing)
        gc64, gr64 = torch.autograd.grad((losses64 * upstream.double().cpu()).sum(), [pc64, pr64])
        tol = TOL[dtype]
        assert losses.dtype == torch.float32 and not cr.requires_grad and not rjr.requires_grad
        assert rel_err(losses, losses64) < tol and rel_err(cr, cr64) < tol and rel_err(rjr, rr64) < tol
        assert gc.dtype == dtype and rel_err(gc, gc64) < tol and rel_err(gr, gr64) < tol


def test_dpo_loss_mean_backward_and_one_sided_grad():
    B = 9
    pc = leaf(-torch.rand(B) * 20, torch.float32)
    pr = -torch.rand(B, device=DEVICE) * 20  # no grad wanted here
    rc, rr = -torch.rand(B, device=DEVICE) * 20, -torch.rand(B, device=DEVICE) * 20
    losses, _, _ = triton_call(ops.dpo_loss, pc, pr, rc, rr, beta=0.1)
    (gc,) = torch.autograd.grad(losses.mean(), pc)  # a stride-0 upstream gradient
    pc64 = as64(pc)
    losses64, _, _ = dpo64(pc64, pr.double().cpu(), rc.double().cpu(), rr.double().cpu(), beta=0.1,
                           loss_type="sigmoid", label_smoothing=0.0)
    (gc64,) = torch.autograd.grad(losses64.mean(), pc64)
    assert rel_err(gc, gc64) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simpo_loss(dtype):
    for B, smoothing, gamma in [(1, 0.0, 0.5), (11, 0.2, -1.0), (1300, 0.0, 0.5)]:
        c, r = leaf(-torch.rand(B) * 2, dtype), leaf(-torch.rand(B) * 2, dtype)
        losses, cr, rjr = triton_call(ops.simpo_loss, c, r, beta=2.0, gamma=gamma, label_smoothing=smoothing)
        upstream = torch.rand(B, device=DEVICE)
        gc, gr = torch.autograd.grad((losses * upstream).sum(), [c, r])
        c64, r64 = as64(c), as64(r)
        losses64, cr64, rr64 = simpo64(c64, r64, beta=2.0, gamma=gamma, label_smoothing=smoothing)
        gc64, gr64 = torch.autograd.grad((losses64 * upstream.double().cpu()).sum(), [c64, r64])
        tol = TOL[dtype]
        assert rel_err(losses, losses64) < tol and rel_err(cr, cr64) < tol and rel_err(rjr, rr64) < tol
        assert gc.dtype == dtype and rel_err(gc, gc64) < tol and rel_err(gr, gr64) < tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin_kind", ["none", "number", "tensor"])
def test_bradley_terry_loss(margin_kind, dtype):
    for B, center_coef in [(1, 0.0), (6, 0.01), (2500, 0.01)]:
        c, r = leaf(torch.randn(B) * 2, dtype), leaf(torch.randn(B) * 2, dtype)
        margin = {"none": None, "number": 0.3, "tensor": leaf(torch.rand(B), dtype)}[margin_kind]
        loss, metrics = triton_call(ops.bradley_terry_loss, c, r, margin=margin, center_coef=center_coef)
        wrt = [c, r] + ([margin] if margin_kind == "tensor" else [])
        grads = torch.autograd.grad(loss, wrt)
        c64, r64 = as64(c), as64(r)
        m64 = as64(margin) if margin_kind == "tensor" else margin
        loss64, metrics64 = bt64(c64, r64, m64, center_coef)
        grads64 = torch.autograd.grad(loss64, [c64, r64] + ([m64] if margin_kind == "tensor" else []))
        tol = TOL[dtype]
        assert loss.dtype == torch.float32 and rel_err(loss, loss64) < tol
        assert rel_err(metrics["accuracy"], metrics64["accuracy"], 1.0) < tol
        scale = (c64 - r64).abs().mean().item()  # the mean margin can cancel to ~0
        assert rel_err(metrics["margin"], metrics64["margin"], scale) < tol
        for g, g64 in zip(grads, grads64):
            assert g.dtype == dtype and rel_err(g, g64) < tol
