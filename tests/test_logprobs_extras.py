"""TRL's head outputs from token_logprobs and logprobs_from_logits: log sum p^2, mean logit, is-top-1,
with softcap and logit scale, on every backend (torch, cpu, triton in the interpreter), against float64
formulas written here, and against TRL's own ChunkedLogProbFunction (the definitions being matched).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE, use_triton

from fastalign import ops

IGNORE = -100
EXTRAS = ("log_sum_p2", "mean_logit", "is_top1")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not ops.backends()["cpu"].available, reason="fastalign._C not built")), "triton"]


def backend_ctx(name):
    if name == "triton":
        use_triton()
    return ops.backend(name)


def device_of(name):
    return TRITON_DEVICE if name == "triton" else "cpu"


def rel(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def truth64(z, labels, temperature, softcap, scale):
    """float64 logp, entropy, log sum p^2, mean logit, is-top-1 from logits z (differentiable in z)."""
    x = z * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x / temperature
    logp_all = torch.log_softmax(x, -1)
    valid = labels != IGNORE
    safe = labels.clamp(min=0).long()
    zero = torch.zeros((), dtype=x.dtype)
    logp = torch.where(valid, logp_all.gather(-1, safe[..., None]).squeeze(-1), zero)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), zero)
    lsp2 = torch.where(valid, torch.log((2 * logp_all).exp().sum(-1)), zero)
    mean = torch.where(valid, x.mean(-1), zero)
    target = x.gather(-1, safe[..., None])
    # strict: the label's logit is the maximum and no earlier token reaches it
    before = torch.arange(x.shape[-1]) < safe[..., None]
    top1 = valid & (target >= x).all(-1) & ~((x >= target) & before).any(-1)
    return logp, ent, lsp2, mean, top1


def inputs(lead, hdim, vocab, dtype, device, ignored=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, hdim, generator=g) * 0.6).to(dtype)
    w = (torch.randn(vocab, hdim, generator=g) * 0.6).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, vocab, lead, generator=g)
    if ignored and labels.numel() > 2:
        labels.view(-1)[::3] = IGNORE
    return h.to(device), w.to(device), b.to(device), labels.to(device)


# softcap 2 bites (|logits| ~ 3), scale 0.0 is a legal constant head (TRL keeps a real 0.0)
CASES = [(None, 1.0, 1.0), (2.0, 1.0, 1.0), (None, 0.37, 0.7), (2.5, 1.8, 1.3), (None, 0.0, 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,scale,temperature", CASES)
def test_token_logprobs_extras_match_float64(backend, softcap, scale, temperature):
    dev = device_of(backend)
    # V = 37 is no multiple of any block; a 600-byte budget forces several chunks, some kept, some recomputed
    h, w, b, labels = inputs((3, 7), 16, 37, torch.float32, dev)
    top = (h @ w.t() + b).argmax(-1)
    labels = torch.where((labels != IGNORE) & (torch.arange(7, device=dev) % 2 == 0), top, labels)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    with backend_ctx(backend):
        out = ops.token_logprobs(h, w, labels, bias=b, temperature=temperature, softcap=softcap,
                                 logit_scale=scale, return_entropy=True, return_extras=EXTRAS, mem_budget=600)
    assert list(out) == ["logp", "entropy", *EXTRAS]
    assert out["is_top1"].dtype == torch.bool
    for name in EXTRAS:
        assert not out[name].requires_grad, f"{name} must be non-differentiable"
    g1, g2 = torch.randn(3, 7, device=dev), torch.randn(3, 7, device=dev)
    (out["logp"] * g1 + out["entropy"] * g2).sum().backward()

    h64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (h, w, b))
    want = truth64(h64 @ w64.t() + b64, labels.cpu(), temperature, softcap, scale)
    (want[0] * g1.double().cpu() + want[1] * g2.double().cpu()).sum().backward()
    for name, got, exp in zip(("logp", "entropy", *EXTRAS), out.values(), want):
        if name == "is_top1":
            assert torch.equal(got.cpu(), exp), "is_top1 differs from the strict argmax"
            assert bool(exp.any()) or scale == 0.0, "the case must hold some top-1 labels"
        else:
            assert rel(got, exp) < 1e-5, name
    grads = (("d hidden", h.grad, h64.grad), ("d weight", w.grad, w64.grad), ("d bias", b.grad, b64.grad))
    for name, got, exp in grads:
        assert rel(got, exp) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_only_when_asked_and_todays_returns_kept(backend):
    dev = device_of(backend)
    h, w, _, labels = inputs((2, 5), 8, 11, torch.float32, dev)
    with backend_ctx(backend):
        assert isinstance(ops.token_logprobs(h, w, labels), torch.Tensor)
        assert len(ops.token_logprobs(h, w, labels, return_entropy=True)) == 2
        assert isinstance(ops.token_logprobs(h, w, labels, softcap=3.0), torch.Tensor)
        out = ops.token_logprobs(h, w, labels, return_extras=("is_top1",))
        assert list(out) == ["logp", "is_top1"]
        out = ops.logprobs_from_logits(h @ w.t(), labels, return_extras=("mean_logit",))
        assert list(out) == ["logp", "mean_logit"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    dev = device_of(backend)
    h, w, b, labels = inputs((4, 6), 32, 50, torch.bfloat16, dev)
    with backend_ctx(backend):
        out = ops.token_logprobs(h, w, labels, bias=b, softcap=3.0, logit_scale=0.9, return_entropy=True,
                                 return_extras=EXTRAS)
    want = truth64(h.double().cpu() @ w.double().cpu().t() + b.double().cpu(), labels.cpu(), 1.0, 3.0, 0.9)
    for name, got, exp in zip(("logp", "entropy", "log_sum_p2", "mean_logit"), out.values(), want):
        assert rel(got, exp) < TOL[torch.bfloat16], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward_shapes(backend):
    dev = device_of(backend)
    with backend_ctx(backend):
        # one vocabulary entry: log p = 0, log sum p^2 = 0, every valid label is top-1
        h, w, _, labels = inputs((3,), 4, 1, torch.float32, dev, ignored=False)
        out = ops.token_logprobs(h, w, labels, return_extras=EXTRAS, softcap=1.0)
        assert torch.equal(out["is_top1"].cpu(), torch.ones(3, dtype=torch.bool))
        assert out["log_sum_p2"].abs().max().item() < 1e-6
        # every position ignored, and no position at all
        h, w, _, labels = inputs((2, 3), 4, 9, torch.float32, dev)
        labels.fill_(IGNORE)
        out = ops.token_logprobs(h, w, labels, return_extras=EXTRAS)
        assert not out["is_top1"].any() and out["mean_logit"].abs().sum().item() == 0
        out = ops.token_logprobs(h[:, :0], w, labels[:, :0], return_extras=EXTRAS)
        assert out["log_sum_p2"].shape == (2, 0)


def test_is_top1_is_the_first_maximum():
    # two tokens tie for the maximum: only the earlier one is top-1, as TRL (and argmax) define it
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]] * 3)
    labels = torch.tensor([1, 2, 0])
    for backend in ("torch", "cpu"):
        with ops.backend(backend):
            got = ops.logprobs_from_logits(logits, labels, return_extras=("is_top1",))["is_top1"]
            assert got.tolist() == [True, False, False]
            # hidden 1, weight = the logits as a column: the same ties through the GEMM
            got = ops.token_logprobs(torch.ones(3, 1), logits[0][:, None], labels,
                                     return_extras=("is_top1",))["is_top1"]
            assert got.tolist() == [True, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,scale,temperature", CASES[:2] + CASES[3:4])
def test_logprobs_from_logits_extras_match_float64(backend, softcap, scale, temperature):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(3, 5, 23, generator=g) * 3).to(dev).requires_grad_()
    labels = torch.randint(0, 23, (3, 5), generator=g).to(dev)
    labels[1, 1:3] = IGNORE
    with backend_ctx(backend):
        out = ops.logprobs_from_logits(z, labels, temperature=temperature, softcap=softcap, logit_scale=scale,
                                       return_entropy=True, return_extras=EXTRAS)
    gl, ge = torch.randn(3, 5, device=dev), torch.randn(3, 5, device=dev)
    (out["logp"] * gl + out["entropy"] * ge).sum().backward()
    z64 = z.detach().double().cpu().requires_grad_()
    want = truth64(z64, labels.cpu(), temperature, softcap, scale)
    (want[0] * gl.double().cpu() + want[1] * ge.double().cpu()).sum().backward()
    for name, got, exp in zip(("logp", "entropy", *EXTRAS), out.values(), want):
        if name == "is_top1":
            assert torch.equal(got.cpu(), exp)
        else:
            assert rel(got, exp) < 1e-5, name
    assert rel(z.grad, z64.grad) < 1e-5


def test_bad_options_name_the_argument():
    h, w, _, labels = inputs((2, 3), 4, 9, torch.float32, "cpu")
    with pytest.raises(ValueError, match="return_extras"):
        ops.token_logprobs(h, w, labels, return_extras=("top1",))
    with pytest.raises(ValueError, match="return_extras"):
        ops.token_logprobs(h, w, labels, return_extras="is_top1")
    with pytest.raises(ValueError, match="softcap"):
        ops.token_logprobs(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        ops.logprobs_from_logits(h @ w.t(), labels, logit_scale=float("nan"))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_trl_chunked_logprob_function(backend):
    """The definitions being matched: TRL 1.16's own function (torch fold on CPU), all outputs, fp32."""
    kernels = pytest.importorskip("trl.kernels")
    h, w, b, labels = inputs((20,), 16, 45, torch.float32, "cpu", ignored=False, seed=3)
    names = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for softcap, scale, temperature in CASES[:4]:
        want = kernels.ChunkedLogProbFunction.apply(h, w, b, labels, temperature, 16, softcap, scale,
                                                    ("log_probs", *names))
        with ops.backend(backend):
            out = ops.token_logprobs(h, w, labels, bias=b, temperature=temperature, softcap=softcap,
                                     logit_scale=scale, return_entropy=True, return_extras=EXTRAS)
        for got, exp in zip(out.values(), want):
            if exp.dtype == torch.bool:
                assert torch.equal(got, exp)
            else:
                assert rel(got, exp) < 1e-5
