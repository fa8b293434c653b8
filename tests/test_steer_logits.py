"""steer_logits: every backend against a float64 formula written here, plus ties, identity and bad input.

The float64 truth states the top-p rule without sorting: token j is kept when the mass of the
tokens strictly more probable than j is below top_p, or fewer than min_tokens_to_keep tokens are
strictly more probable (so tokens tied with the last one needed are kept). Where that mass lies
within float32 rounding of top_p the decision is ambiguous; only those tokens may go either way.

The triton backend runs in Triton's CPU interpreter without CUDA (tests/conftest.py selects it
before anything imports triton).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import use_triton

from fastalign import ops
from fastalign.ops import dispatch

try:
    import triton
except ImportError:
    triton = None

# The kernels compute in float32 from inputs that are exact in float64, whatever their storage
# dtype, so float32 accuracy applies to bf16 inputs too (stricter than the bf16 tolerance).
TOL = 1e-5
# float32 softmax and sums over <= 1000 tokens stay well inside this of the float64 mass.
AMBIGUOUS_MASS = 1e-4
BACKENDS = ["torch", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Yield (backend name, device of its inputs) with the backend forced; skip when unavailable."""
    name = request.param
    if name == "triton":
        use_triton()
    status = dispatch.backends()[name]
    if not status.available:
        pytest.skip(f"{name} backend unavailable: {status.reason}")
    device = DEVICE if name == "triton" else "cpu"
    with dispatch.backend(name):
        yield name, device


# Compiles the kernel (both mask variants, bf16 and fp32 inputs) to a Hopper cubin in a process without the
# interpreter, which accepts code the compiler rejects; the divisions by T must stay correctly rounded.
_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastalign.triton_kernels import steering

fn = steering._steer_kernel
for dtype in ("*bf16", "*fp32"):
    for masked in (True, False):
        constexprs = {"MASKED": masked, "BLOCK_V": 4096, "SEARCH_BLOCK": 512, "NUM_CAND": 16}
        pointers = {"value_ptr": dtype, "base_ptr": dtype, "neg_ptr": dtype, "betas_ptr": "*fp32", "out_ptr": "*fp32"}
        floats = {"alpha", "temperature", "top_p"}
        sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
               for n in fn.arg_names}
        cst = {(fn.arg_names.index(n),): v for n, v in constexprs.items()}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 8})
        ptx = kernel.asm["ptx"]
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, (dtype, masked)
"""


def test_kernel_compiles_for_hopper():
    if triton is None:
        pytest.skip("triton is not installed")
    triton_backends = importlib.import_module("triton.backends")
    if "nvidia" not in getattr(triton_backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ----------------------------------------------------------------------------------- float64 truth
def steer64(value, base, negatives, *, alpha, betas, top_p, min_keep, temperature):
    """(z, keep, ambiguous, scale): float64 steered logits before masking, the kept tokens, the
    tokens whose fate float32 rounding may flip, and the size of the terms summed into z."""
    zv, zb = value.double().cpu(), base.double().cpu()
    z = (1.0 + alpha) * zv - alpha * zb
    scale = (1.0 + abs(alpha)) * zv.abs() + abs(alpha) * zb.abs()
    if negatives is not None and negatives.shape[0]:
        zn = negatives.double().cpu()
        b = torch.as_tensor(betas, dtype=torch.float64).view(-1, 1, 1)
        z = z - (b * (zn - zb)).sum(0)
        scale = scale + (b.abs() * (zn.abs() + zb.abs())).sum(0)
    z, scale = z / temperature, scale / temperature
    if top_p >= 1.0:
        return z, torch.ones_like(z, dtype=torch.bool), torch.zeros_like(z, dtype=torch.bool), scale
    p = torch.softmax(zv / temperature, dim=-1)
    ascending = p.sort(dim=-1).values
    at_most = torch.searchsorted(ascending, p.contiguous(), right=True)  # tokens with probability <= p_j
    # suffix[i] = mass of ascending[i:], so suffix[at_most_j] is the mass strictly above p_j.
    suffix = torch.cat([ascending.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(p[:, :1])], dim=-1)
    mass_above = suffix.gather(-1, at_most)
    count_above = p.shape[-1] - at_most
    keep = (mass_above < top_p) | (count_above < min_keep)
    ambiguous = (count_above >= min_keep) & ((mass_above - top_p).abs() < AMBIGUOUS_MASS)
    return z, keep, ambiguous, scale


def check(out, truth, what=""):
    z, keep, ambiguous, scale = truth
    out = out.detach().cpu()
    assert out.dtype == torch.float32 and out.shape == z.shape, (out.dtype, out.shape)
    assert not out.requires_grad
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    finite = torch.isfinite(out)
    assert (out[~finite] == float("-inf")).all(), f"{what}: +inf in the output"
    wrong = (finite != keep) & ~ambiguous
    assert not wrong.any(), (
        f"{what}: mask differs at {wrong.nonzero()[:5].tolist()} (kept {finite.sum(-1).tolist()}, "
        f"expected {keep.sum(-1).tolist()})")
    if finite.any():
        err = ((out[finite].double() - z[finite]).abs() / scale[finite].clamp(min=1e-30)).max().item()
        assert err < TOL, f"{what}: relative error {err:.3e} >= {TOL:g}"


def make_inputs(batch, vocab, num_neg, dtype, device, spread=3.0):
    value = (torch.randn(batch, vocab) * spread).to(dtype).to(device)
    base = (value.float().cpu() + torch.randn(batch, vocab)).to(dtype).to(device)
    negatives = (torch.randn(num_neg, batch, vocab) * spread).to(dtype).to(device) if num_neg else None
    return value, base, negatives


def run_case(device, batch, vocab, num_neg, dtype, top_p, *, min_keep=1, alpha=None, temperature=None,
             betas_as_tensor=False, spread=3.0):
    alpha = float(torch.empty(()).uniform_(0.5, 3.0)) if alpha is None else alpha
    temperature = float(torch.empty(()).uniform_(0.5, 1.5)) if temperature is None else temperature
    betas = [float(b) for b in torch.empty(num_neg).uniform_(0.1, 2.0)]
    value, base, negatives = make_inputs(batch, vocab, num_neg, dtype, device, spread)
    passed = torch.tensor(betas, device=device) if betas_as_tensor else (betas if num_neg else None)
    out = ops.steer_logits(value, base, negatives, alpha=alpha, betas=passed, top_p=top_p,
                           min_tokens_to_keep=min_keep, temperature=temperature)
    truth = steer64(value, base, negatives, alpha=alpha, betas=betas, top_p=top_p, min_keep=min_keep,
                    temperature=temperature)
    check(out, truth, f"B={batch} V={vocab} K={num_neg} {dtype} top_p={top_p} min_keep={min_keep}")
    return value, out


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_neg", [0, 1, 3])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 1e-6])
def test_matches_float64(backend, dtype, num_neg, top_p):
    name, device = backend
    # The interpreter is slow: triton gets one awkward shape here, the others below.
    shapes = [(3, 257)] if name == "triton" else [(3, 257), (1, 300), (5, 1000), (2, 33)]
    for batch, vocab in shapes:
        run_case(device, batch, vocab, num_neg, dtype, top_p, betas_as_tensor=num_neg == 3)


def test_one_token_and_one_row(backend):
    _, device = backend
    for top_p in (1.0, 0.9, 1e-6):
        run_case(device, 2, 1, 1, torch.float32, top_p)
        run_case(device, 1, 300, 3, torch.bfloat16, top_p)


@pytest.mark.parametrize("min_keep", [3, 400])
def test_min_tokens_to_keep(backend, min_keep):
    _, device = backend
    _, out = run_case(device, 4, 300, 1, torch.float32, 0.5, min_keep=min_keep)
    assert (torch.isfinite(out).sum(-1) >= min(min_keep, 300)).all()


def test_tiny_top_p_keeps_only_the_argmax(backend):
    _, device = backend
    value, out = run_case(device, 4, 300, 2, torch.float32, 1e-9)
    finite = torch.isfinite(out).cpu()
    assert (finite.sum(-1) == 1).all()
    assert torch.equal(finite.float().argmax(-1), value.cpu().argmax(-1))


@pytest.mark.parametrize("spread", [0.01, 30.0])
def test_flat_and_peaked_rows(backend, spread):
    """Nearly uniform rows (the whole vocabulary in one probability bucket) and very peaked ones."""
    _, device = backend
    for top_p in (0.5, 0.95):
        run_case(device, 3, 300, 1, torch.float32, top_p, spread=spread)


def test_float16_and_float64_inputs(backend):
    _, device = backend
    run_case(device, 2, 129, 1, torch.float16, 0.8)
    run_case(device, 2, 129, 1, torch.float64, 0.8)


def test_native_op_schema_and_fake():
    """The custom op's schema, fake (meta) kernel and torch.compile tracing agree with the real kernel."""
    if not dispatch.backends()["cpu"].available:
        pytest.skip(dispatch.backends()["cpu"].reason)
    op = torch.ops.fastalign.steer_logits.default
    value, base, negatives = make_inputs(3, 50, 2, torch.bfloat16, "cpu")
    torch.library.opcheck(op, (value, base, negatives, torch.ones(2), 1.5, 0.7, 0.9, 2))
    torch.library.opcheck(op, (value, base, None, torch.ones(0), 0.0, 1.0, 1.0, 1))


def test_identity_without_steering(backend):
    """alpha = 0, no negatives, top_p = 1: exactly value / T, so greedy decoding is unchanged."""
    _, device = backend
    for dtype in (torch.float32, torch.bfloat16):
        for temperature in (1.0, 0.7):
            value, base, _ = make_inputs(3, 257, 0, dtype, device)
            out = ops.steer_logits(value, base, alpha=0.0, temperature=temperature)
            assert torch.equal(out.cpu(), value.float().cpu() / temperature), (dtype, temperature)


def test_ties_at_the_boundary_are_all_kept(backend):
    _, device = backend
    # p ~ [0.678, 0.092, 0.092, 0.092, 0.034, 0.012]: top_p = 0.75 needs one of the tied tokens, so
    # all three are kept (a sort-then-cut rule would keep an arbitrary one of them).
    row = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        value = row.to(dtype).to(device)
        for top_p, min_keep, expected in [(0.75, 1, 4), (0.5, 1, 1), (1e-6, 2, 4), (0.97, 1, 5), (0.9999, 1, 6)]:
            out = ops.steer_logits(value, value, top_p=top_p, min_tokens_to_keep=min_keep)
            kept = torch.isfinite(out).cpu()[0]
            assert kept.sum().item() == expected, (dtype, top_p, min_keep, kept.tolist())
            assert kept[:expected].all()
    # A tied level filling a row of awkward length (remainders after every SIMD width): top_p needs two
    # of its 193 tokens, so all of them stay. A kernel whose exp differs by an ulp between its vector
    # body and its scalar remainder keeps only the remainder's copies.
    value = torch.tensor([[4.0] * 10 + [3.0] * 193], device=device)
    for dtype in (torch.float32, torch.bfloat16):
        kept = torch.isfinite(ops.steer_logits(value.to(dtype), value.to(dtype), top_p=0.13)).cpu()[0]
        assert kept.all(), (dtype, kept.sum().item())
    # Two tied maxima and a tiny top_p: both stay.
    value = torch.tensor([[0.0, 2.0, -1.0, 2.0]], device=device)
    kept = torch.isfinite(ops.steer_logits(value, value, top_p=1e-9)).cpu()[0]
    assert kept.tolist() == [False, True, False, True]


def test_bf16_ties_everywhere(backend):
    """Coarse bf16 logits tie often; the tie rule must agree with the float64 truth exactly."""
    _, device = backend
    # V = 203 leaves a remainder after every SIMD width: equal logits there must still tie exactly.
    value = torch.randint(-4, 5, (6, 203)).to(torch.bfloat16).to(device)
    base = torch.randint(-4, 5, (6, 203)).to(torch.bfloat16).to(device)
    for top_p in (0.3, 0.7, 0.95):
        out = ops.steer_logits(value, base, alpha=1.5, top_p=top_p)
        check(out, steer64(value, base, None, alpha=1.5, betas=[], top_p=top_p, min_keep=1, temperature=1.0))


def test_strided_rows(backend):
    """Last-position slices of [B, T, V] outputs and a strided [K, B, V] view are read in place."""
    _, device = backend
    batch, steps, vocab, num_neg = 3, 4, 130, 2
    branches = torch.randn((num_neg + 2) * batch, steps, vocab, device=device) * 3
    last = branches[:, -1, :]
    value, base = last[:batch], last[batch:2 * batch]
    negatives = last[2 * batch:].view(num_neg, batch, vocab)
    assert not value.is_contiguous() and not negatives.is_contiguous()
    out = ops.steer_logits(value, base, negatives, alpha=2.0, betas=[0.5, 1.0], top_p=0.9, temperature=0.8)
    check(out, steer64(value, base, negatives, alpha=2.0, betas=[0.5, 1.0], top_p=0.9, min_keep=1,
                       temperature=0.8))
    # Columns with a stride are copied first.
    wide = torch.randn(batch, 2 * vocab, device=device)
    out = ops.steer_logits(wide[:, ::2], base, top_p=0.8)
    check(out, steer64(wide[:, ::2], base, None, alpha=1.0, betas=[], top_p=0.8, min_keep=1, temperature=1.0))


def test_backends_agree_with_the_reference(backend):
    name, device = backend
    value, base, negatives = make_inputs(4, 300, 2, torch.float32, device)
    kw = dict(alpha=2.5, betas=[1.0, 0.3], top_p=0.8, min_tokens_to_keep=2, temperature=0.9)
    out = ops.steer_logits(value, base, negatives, **kw).cpu()
    with dispatch.backend("torch"):
        expected = ops.steer_logits(value.cpu(), base.cpu(), negatives.cpu(), **kw)
    truth = steer64(value, base, negatives, alpha=2.5, betas=[1.0, 0.3], top_p=0.8, min_keep=2, temperature=0.9)
    sure = ~truth[2]
    assert torch.equal(torch.isfinite(out)[sure], torch.isfinite(expected)[sure]), name
    both = torch.isfinite(out) & torch.isfinite(expected)
    assert ((out[both] - expected[both]).abs() <= 1e-5 * truth[3][both].float()).all(), name


def test_empty_batch_and_requires_grad(backend):
    _, device = backend
    value = torch.randn(0, 7, device=device)
    assert ops.steer_logits(value, value, top_p=0.5).shape == (0, 7)
    value = torch.randn(2, 7, device=device, requires_grad=True)
    out = ops.steer_logits(value, value.detach() + 1.0, top_p=0.5)
    assert not out.requires_grad and out.grad_fn is None


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    v = torch.randn(2, 5)
    n = torch.randn(2, 2, 5)
    cases = [
        (TypeError, "value_logits", lambda: ops.steer_logits([[1.0]], v)),
        (ValueError, "value_logits", lambda: ops.steer_logits(torch.randn(5), torch.randn(5))),
        (ValueError, "value_logits", lambda: ops.steer_logits(torch.randn(2, 0), torch.randn(2, 0))),
        (TypeError, "value_logits", lambda: ops.steer_logits(torch.ones(2, 5, dtype=torch.int64), v)),
        (ValueError, "base_logits", lambda: ops.steer_logits(v, torch.randn(2, 6))),
        (TypeError, "base_logits", lambda: ops.steer_logits(v, v.bfloat16())),
        (ValueError, "base_logits", lambda: ops.steer_logits(v, torch.randn(2, 5, device="meta"))),
        (ValueError, "negative_logits", lambda: ops.steer_logits(v, v, torch.randn(2, 5))),
        (ValueError, "negative_logits", lambda: ops.steer_logits(v, v, torch.randn(2, 3, 5))),
        (TypeError, "negative_logits", lambda: ops.steer_logits(v, v, n.half())),
        (ValueError, "betas", lambda: ops.steer_logits(v, v, n, betas=[1.0])),
        (ValueError, "betas", lambda: ops.steer_logits(v, v, betas=[1.0])),
        (ValueError, "betas", lambda: ops.steer_logits(v, v, n, betas=torch.ones(3))),
        (ValueError, "betas", lambda: ops.steer_logits(v, v, n, betas=[1.0, float("nan")])),
        (ValueError, "betas", lambda: ops.steer_logits(v, v, n, betas=torch.tensor([1.0, float("inf")]))),
        (TypeError, "betas", lambda: ops.steer_logits(v, v, n, betas="ab")),
        (TypeError, "betas", lambda: ops.steer_logits(v, v, n, betas=[1.0, None])),
        (TypeError, "alpha", lambda: ops.steer_logits(v, v, alpha=None)),
        (ValueError, "alpha", lambda: ops.steer_logits(v, v, alpha=float("inf"))),
        (ValueError, "top_p", lambda: ops.steer_logits(v, v, top_p=0.0)),
        (ValueError, "top_p", lambda: ops.steer_logits(v, v, top_p=1.5)),
        (TypeError, "top_p", lambda: ops.steer_logits(v, v, top_p="0.9")),
        (ValueError, "min_tokens_to_keep", lambda: ops.steer_logits(v, v, min_tokens_to_keep=0)),
        (TypeError, "min_tokens_to_keep", lambda: ops.steer_logits(v, v, min_tokens_to_keep=1.5)),
        (ValueError, "temperature", lambda: ops.steer_logits(v, v, temperature=0.0)),
        (ValueError, "temperature", lambda: ops.steer_logits(v, v, temperature=float("nan"))),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
