"""Triton kernels of token_logprobs and logprobs_from_logits, in Triton's CPU interpreter.

Values and every gradient (hidden, weight, bias; logits) are checked against float64 formulas
written here, with fresh random inputs on every run, at small sizes (the interpreter is slow):
vocabularies that are not a multiple of the block, one row, ignored rows, all rows ignored,
temperature, bias, entropy gradients, several vocabulary chunks in the backward, and the error
bound of gradient filtering. bf16 inputs go through the interpreter's fp32 upcast of ``tl.dot``.

tests/conftest.py selects the interpreter (TRITON_INTERPRET=1) before anything imports triton.
On a CUDA machine tests/gpu/test_gpu_logprobs.py covers the compiled kernels; this module then
runs the same checks compiled, on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRITON_DEVICE as DEVICE
from conftest import use_triton

from fastalign import ops
from fastalign.ops import dispatch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def triton_backend():
    use_triton()
    with ops.backend("triton"):
        yield


# ------------------------------------------------------------------------------------------ helpers
def assert_close(got, want, tol, what):
    """Max abs difference relative to max |want|; NaN/Inf never passes."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    if scale == 0:
        assert err == 0, f"{what}: expected exact zeros, max |got| = {err:.3e}"
    else:
        assert err / scale < tol, f"{what}: relative error {err / scale:.3e} >= {tol:g}"


def logprobs64(z, labels, temperature, ignore_index):
    """float64 log_softmax(z / T)[label] and entropy, 0 where the label is ignored."""
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != ignore_index
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def random_labels(lead, vocab, ignore_index, ignored_fraction=0.2):
    labels = torch.randint(0, vocab, lead, device=DEVICE)
    ignored = torch.rand(lead, device=DEVICE) < ignored_fraction
    return torch.where(ignored, torch.full_like(labels, ignore_index), labels)


def run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, **kw):
    """Forward with the triton backend and backward with upstream grads; returns outputs and grads."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    logp, entropy = ops.token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
    loss = (logp * g_logp).sum() + (entropy * g_ent).sum() if g_ent is not None else (logp * g_logp).sum()
    loss.backward()
    return logp, entropy, [x.grad if x is not None else None for x in leaves]


def reference_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, temperature, ignore_index):
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = leaves[0] @ leaves[1].t()
    if bias is not None:
        z = z + leaves[2]
    logp, entropy = logprobs64(z, labels, temperature, ignore_index)
    loss = (logp * g_logp.double()).sum()
    if g_ent is not None:
        loss = loss + (entropy * g_ent.double()).sum()
    loss.backward()
    return logp, entropy, [x.grad if x is not None else None for x in leaves]


# ----------------------------------------------------------------------------------- token_logprobs
# (leading shape, H, V, temperature, bias, mem_budget): one row; V not a multiple of the block;
# several vocabulary chunks in the backward (a budget of a few columns); 3-D leading shape.
TOKEN_CASES = [
    ((1,), 16, 33, 1.0, False, None),
    ((5, 7), 24, 150, 0.7, True, None),
    ((33,), 48, 260, 1.9, True, 33 * 4 * 96),
    ((2, 3, 5), 20, 97, 1.0, False, 30 * 4 * 40),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,h,v,temperature,with_bias,mem_budget", TOKEN_CASES)
def test_token_logprobs_matches_float64(dtype, lead, h, v, temperature, with_bias, mem_budget):
    ignore_index = -100
    hidden = torch.randn(*lead, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) * 0.5).to(dtype)
    bias = torch.randn(v, device=DEVICE).to(dtype) if with_bias else None
    labels = random_labels(lead, v, ignore_index)
    g_logp = torch.randn(lead, device=DEVICE)
    g_ent = torch.randn(lead, device=DEVICE)
    logp, entropy, grads = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, temperature=temperature,
                                              ignore_index=ignore_index, mem_budget=mem_budget)
    want_logp, want_ent, want_grads = reference_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent,
                                                               temperature, ignore_index)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    tol = TOL[dtype]
    assert_close(logp, want_logp, tol, "logp")
    assert_close(entropy, want_ent, tol, "entropy")
    for name, got, want in zip(("d(hidden)", "d(weight)", "d(bias)"), grads, want_grads):
        if want is not None:
            assert got.dtype == dtype, f"{name} dtype {got.dtype} != {dtype}"
            assert_close(got, want, tol, name)


def test_token_logprobs_fp16_and_noncontiguous_weight():
    lead, h, v = (9,), 32, 70
    hidden = torch.randn(*lead, h, device=DEVICE).half()
    weight = (torch.randn(h, v, device=DEVICE) * 0.5).half().t()  # a transposed view: [V, H], not contiguous
    labels = random_labels(lead, v, -1)
    g_logp, g_ent = torch.randn(lead, device=DEVICE), torch.randn(lead, device=DEVICE)
    logp, entropy, grads = run_token_logprobs(hidden, weight, None, labels, g_logp, g_ent, ignore_index=-1)
    want_logp, want_ent, want_grads = reference_token_logprobs(hidden, weight, None, labels, g_logp, g_ent, 1.0, -1)
    assert_close(logp, want_logp, TOL[torch.float16], "logp")
    assert_close(entropy, want_ent, TOL[torch.float16], "entropy")
    assert_close(grads[0], want_grads[0], TOL[torch.float16], "d(hidden)")
    assert_close(grads[1], want_grads[1], TOL[torch.float16], "d(weight)")


def test_token_logprobs_logp_only_and_entropy_only_gradients():
    lead, h, v = (12,), 16, 45
    hidden = torch.randn(*lead, h, device=DEVICE)
    weight = torch.randn(v, h, device=DEVICE)
    labels = random_labels(lead, v, -100)
    g = torch.randn(lead, device=DEVICE)
    # logp only, without asking for the entropy at all.
    x = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (ops.token_logprobs(x, w, labels) * g).sum().backward()
    _, _, want = reference_token_logprobs(hidden, weight, None, labels, g, None, 1.0, -100)
    assert_close(x.grad, want[0], TOL[torch.float32], "d(hidden) from logp")
    assert_close(w.grad, want[1], TOL[torch.float32], "d(weight) from logp")
    # entropy only: d(entropy)/dz_j = -p_j (logp_j + entropy) / T.
    x = hidden.clone().requires_grad_()
    _, entropy = ops.token_logprobs(x, weight, labels, return_entropy=True, temperature=1.5)
    (entropy * g).sum().backward()
    x64 = hidden.double().requires_grad_()
    _, ent64 = logprobs64(x64 @ weight.double().t(), labels, 1.5, -100)
    (ent64 * g.double()).sum().backward()
    assert_close(x.grad, x64.grad, TOL[torch.float32], "d(hidden) from entropy")


def test_token_logprobs_all_ignored_gives_zeros():
    hidden = torch.randn(4, 6, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    labels = torch.full((4, 6), -100, device=DEVICE)
    logp, entropy = ops.token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    assert logp.shape == (4, 6) and torch.equal(logp, torch.zeros_like(logp))
    assert torch.equal(entropy, torch.zeros_like(entropy))
    (logp.sum() + entropy.sum()).backward()
    for name, g in (("hidden", hidden.grad), ("weight", weight.grad), ("bias", bias.grad)):
        assert g is not None and torch.equal(g, torch.zeros_like(g)), f"d({name}) must be exactly 0"


def _filter_setup(n, h, v, dtype):
    """Peaked softmax: the first vocabulary tile carries the labels and nearly all the mass."""
    hidden = torch.randn(n, h, device=DEVICE).to(dtype)
    weight = (torch.randn(v, h, device=DEVICE) * 0.1).to(dtype)
    bias = torch.full((v,), -6.0, device=DEVICE)
    bias[:8] = 6.0
    bias = bias.to(dtype)
    labels = torch.randint(0, 8, (n,), device=DEVICE)
    return hidden, weight, bias, labels


def _unscaled_softmax_grad(hidden, weight, bias, labels, with_entropy):
    """float64 max(|onehot - p|, |p (log p + H)|) per element: what the filter compares with eps."""
    z = hidden.double() @ weight.double().t() + bias.double()
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    u = (torch.nn.functional.one_hot(labels, z.shape[1]).double() - p).abs()
    if with_entropy:
        ent = -(p * logp_all).sum(-1, keepdim=True)
        u = torch.maximum(u, (p * (logp_all + ent)).abs())
    return u


def _assert_filter_bound(hidden, weight, bias, labels, g_logp, g_ent, eps, exact, approx):
    """The documented bound (triton_kernels/token_logprobs.py) from the tiles a kernel may skip."""
    from fastalign.triton_kernels import token_logprobs as tl_kernels

    n, v = labels.shape[0], weight.shape[0]
    u = _unscaled_softmax_grad(hidden, weight, bias, labels, g_ent is not None)
    # The kernels tile the vocabulary in the order the backend sorts it (by average logit).
    order = tl_kernels.vocab_order(hidden, weight, bias, True)
    order = torch.arange(v, device=u.device) if order is None else order.long()
    bn, bv = tl_kernels.FLAG_BLOCK_N, tl_kernels.FLAG_BLOCK_V
    padded = torch.nn.functional.pad(u[:, order], (0, -v % bv, 0, -n % bn))
    tile_max = padded.reshape(-(-n // bn), bn, -(-v // bv), bv).amax(dim=(1, 3))
    # A margin for fp32 rounding of p in the kernel: tiles within it of eps may go either way.
    skippable_sorted = (tile_max < eps * (1 + 1e-3)).repeat_interleave(bn, 0).repeat_interleave(bv, 1)[:n, :v]
    skippable = torch.empty_like(skippable_sorted)
    skippable[:, order] = skippable_sorted
    assert skippable.any() and not skippable.all(), "the setup must let some tiles be skipped"
    g = g_logp.double().abs() + (g_ent.double().abs() if g_ent is not None else 0.0)  # G_n
    per_row = skippable.sum(1, dtype=torch.float64)
    col_weight = (skippable.double() * g[:, None])  # G_n on the skipped elements
    bound_h = eps * (g * per_row)[:, None] * weight.double().abs().amax(0)[None, :]
    bound_w = eps * col_weight.t() @ hidden.double().abs()
    bound_b = eps * col_weight.sum(0)
    slack = 1e-5  # fp32 rounding of the exact path itself
    for name, got, want, bound in (("d(hidden)", approx[0], exact[0], bound_h),
                                   ("d(weight)", approx[1], exact[1], bound_w),
                                   ("d(bias)", approx[2], exact[2], bound_b)):
        err = (got.double() - want.double()).abs()
        assert torch.isfinite(got).all(), name
        assert (err <= bound + slack * want.double().abs().max()).all(), (
            f"{name}: error {err.max().item():.3e} beyond the bound {bound.max().item():.3e}")


@pytest.mark.parametrize("sort", ["1", "0"])
def test_grad_filtering_error_within_bound(sort, monkeypatch):
    monkeypatch.setenv("FASTALIGN_FILTER_SORT", sort)
    n, h, v, eps = 48, 32, 290, 1e-4
    hidden, weight, bias, labels = _filter_setup(n, h, v, torch.float32)
    g_logp, g_ent = torch.rand(n, device=DEVICE) + 0.5, torch.rand(n, device=DEVICE) * 0.1
    _, _, exact = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, grad_filter_eps=0.0)
    _, _, approx = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, grad_filter_eps=eps)
    _assert_filter_bound(hidden, weight, bias, labels, g_logp, g_ent, eps, exact, approx)
    # The filter really skipped work: d(weight) rows of the low-probability columns changed.
    assert (approx[1] - exact[1]).abs().max() > 0


@pytest.mark.parametrize("with_entropy", [False, True])
def test_grad_filtering_at_mean_loss_scale(with_entropy):
    """A mean over the bench shape's 8192 tokens: upstream gradient 1/8192, below the 2^-12 threshold.

    Filtering the scaled gradient would drop every tile (d(hidden), d(weight) ~ 0); the unscaled
    test keeps the label tiles and the gradient stays within the documented bound of the exact one.
    """
    n, h, v, eps = 40, 16, 200, 2.0 ** -12
    hidden, weight, bias, labels = _filter_setup(n, h, v, torch.float32)
    g_logp = torch.full((n,), 1.0 / 8192, device=DEVICE)
    g_ent = torch.full((n,), 0.01 / 8192, device=DEVICE) if with_entropy else None
    _, _, exact = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, grad_filter_eps=0.0)
    _, _, approx = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, grad_filter_eps=eps)
    _assert_filter_bound(hidden, weight, bias, labels, g_logp, g_ent, eps, exact, approx)
    for name, got, want in zip(("d(hidden)", "d(weight)", "d(bias)"), approx, exact):
        assert_close(got, want, 1e-3, f"filtered {name} vs exact")
    assert (approx[1] - exact[1]).abs().max() > 0, "some tiles must have been skipped"


def test_grad_filtering_with_eps_zero_is_exact_and_bf16_filtered_is_close():
    n, h, v = 40, 16, 200
    hidden, weight, bias, labels = _filter_setup(n, h, v, torch.bfloat16)
    g_logp = torch.randn(n, device=DEVICE)
    _, _, exact = run_token_logprobs(hidden, weight, bias, labels, g_logp, None)
    _, _, again = run_token_logprobs(hidden, weight, bias, labels, g_logp, None, grad_filter_eps=0.0)
    for a, b in zip(exact, again):
        assert torch.equal(a, b)
    # A bf16-sized threshold (2^-12, as Cut Cross-Entropy uses) stays within bf16 tolerance.
    _, _, approx = run_token_logprobs(hidden, weight, bias, labels, g_logp, None, grad_filter_eps=2.0 ** -12)
    _, _, want = reference_token_logprobs(hidden, weight, bias, labels, g_logp, None, 1.0, -100)
    for name, got, ref in zip(("d(hidden)", "d(weight)", "d(bias)"), approx, want):
        assert_close(got, ref, TOL[torch.bfloat16], name)


def test_backend_is_triton_in_this_module():
    status = dispatch.backends()["triton"]
    assert status.available, status.reason
    name, _ = dispatch.select("token_logprobs", torch.device(DEVICE))
    assert name == "triton"
    name, _ = dispatch.select("logprobs_from_logits", torch.device(DEVICE))
    assert name == "triton"


# ----------------------------------------------------------------------------- logprobs_from_logits
# (leading shape, V): one row; V below, above and not a multiple of the block; 3-D leading shape.
ROW_CASES = [((1,), 7), ((6, 5), 150), ((17,), 300), ((2, 2, 3), 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,v", ROW_CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_from_logits_matches_float64(dtype, lead, v, inplace):
    temperature = 0.8
    z = (torch.randn(*lead, v, device=DEVICE) * 3).to(dtype)
    labels = random_labels(lead, v, -100)
    g_logp, g_ent = torch.randn(lead, device=DEVICE), torch.randn(lead, device=DEVICE)
    leaf = z.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf buffer: with inplace_backward the gradient lands in it
    logp, entropy = ops.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True,
                                             inplace_backward=inplace)
    ((logp * g_logp).sum() + (entropy * g_ent).sum()).backward()

    z64 = z.double().requires_grad_()
    want_logp, want_ent = logprobs64(z64, labels, temperature, -100)
    ((want_logp * g_logp.double()).sum() + (want_ent * g_ent.double()).sum()).backward()
    tol = TOL[dtype]
    assert_close(logp, want_logp, tol, "logp")
    assert_close(entropy, want_ent, tol, "entropy")
    assert leaf.grad.dtype == dtype
    assert_close(leaf.grad, z64.grad, tol, "d(logits)")
    ignored = labels == -100
    assert torch.equal(leaf.grad[ignored], torch.zeros_like(leaf.grad[ignored]))
    if inplace:
        assert torch.equal(logits.detach(), leaf.grad), "inplace_backward must write d(logits) into the buffer"
    else:
        assert torch.equal(logits.detach(), z), "without inplace_backward the logits stay untouched"


def test_logprobs_from_logits_large_logits_and_all_ignored():
    z = torch.randn(3, 50, device=DEVICE) * 5 + 1e4  # a shift of 1e4 must not lose the entropy
    labels = torch.tensor([0, 49, -100], device=DEVICE)
    logp, entropy = ops.logprobs_from_logits(z, labels, return_entropy=True)
    want_logp, want_ent = logprobs64(z.double(), labels, 1.0, -100)
    assert_close(logp, want_logp, 1e-3, "logp at 1e4")  # fp32 inputs near 1e4 carry ~1e-3 absolute error
    assert_close(entropy, want_ent, 1e-3, "entropy at 1e4")
    z = torch.randn(2, 3, 20, device=DEVICE, requires_grad=True)
    labels = torch.full((2, 3), -7, device=DEVICE)
    logp, entropy = ops.logprobs_from_logits(z, labels, ignore_index=-7, return_entropy=True)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(entropy, torch.zeros_like(entropy))
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# --------------------------------------------------------------------------- robustness and launch plans
def test_out_of_range_labels_give_nan_and_no_gradient(monkeypatch):
    """With the value checks off, labels outside [0, V) are never an address: NaN log-prob, zero gradient."""
    monkeypatch.setenv("FASTALIGN_CHECK_VALUES", "0")
    n, h, v = 12, 16, 70
    hidden = torch.randn(n, h, device=DEVICE)
    weight = torch.randn(v, h, device=DEVICE) * 0.5
    bias = torch.randn(v, device=DEVICE)
    labels = torch.randint(0, v, (n,), device=DEVICE)
    bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    for row, label in ((1, 2 ** 40), (4, -7), (7, v), (10, -2 ** 40)):
        labels[row] = label
        bad[row] = True
    labels[5] = -100  # ignored: 0 as usual
    g_logp, g_ent = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    for impl in ("cublas", "triton"):
        monkeypatch.setenv("FASTALIGN_GRAD_GEMM", impl)
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        logp, entropy = ops.token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True)
        assert torch.isnan(logp[bad]).all(), f"{impl}: out-of-range labels must give NaN, got {logp[bad]}"
        grads = torch.autograd.grad((logp, entropy), leaves, (g_logp, g_ent))
        # The reference: the bad rows contribute nothing, as if ignored; their entropy is still defined.
        fixed = torch.where(bad, torch.full_like(labels, -100), labels)
        want_logp, _, want_grads = reference_token_logprobs(hidden, weight, bias, fixed, g_logp, g_ent, 1.0, -100)
        _, want_ent = logprobs64(hidden.double() @ weight.double().t() + bias.double(), torch.where(bad, 0, labels),
                                 1.0, -100)
        assert_close(logp[~bad], want_logp[~bad], TOL[torch.float32], f"{impl}: logp of the valid rows")
        assert_close(entropy, want_ent.where(labels != -100, 0.0), TOL[torch.float32], f"{impl}: entropy")
        for name, got, want in zip(("d(hidden)", "d(weight)", "d(bias)"), grads, want_grads):
            assert_close(got, want, TOL[torch.float32], f"{impl}: {name}")
        assert torch.equal(grads[0][bad], torch.zeros_like(grads[0][bad]))


def test_mixed_bf16_fp32_inputs_raise_naming_both():
    hidden = torch.randn(4, 16, device=DEVICE).bfloat16()
    weight = torch.randn(40, 16, device=DEVICE)
    labels = torch.randint(0, 40, (4,), device=DEVICE)
    with pytest.raises(TypeError, match=r"hidden torch.bfloat16 and weight torch.float32"):
        ops.token_logprobs(hidden, weight, labels)
    with pytest.raises(TypeError, match=r"hidden torch.float32 and weight torch.float16"):
        ops.token_logprobs(hidden.float(), weight.half(), labels)


@pytest.mark.parametrize("impl", ["cublas", "triton"])
def test_gradient_gemm_paths_match_float64(impl, monkeypatch):
    """Both ways of computing d(hidden)/d(weight) from the staged chunk, across several chunks, bf16 and fp32."""
    monkeypatch.setenv("FASTALIGN_GRAD_GEMM", impl)
    for dtype in (torch.float32, torch.bfloat16):
        lead, h, v = (37,), 40, 230
        hidden = torch.randn(*lead, h, device=DEVICE).to(dtype)
        weight = (torch.randn(v, h, device=DEVICE) * 0.5).to(dtype)
        bias = torch.randn(v, device=DEVICE).to(dtype)
        labels = random_labels(lead, v, -100)
        g_logp, g_ent = torch.randn(lead, device=DEVICE), torch.randn(lead, device=DEVICE)
        _, _, grads = run_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, mem_budget=37 * 4 * 64)
        _, _, want = reference_token_logprobs(hidden, weight, bias, labels, g_logp, g_ent, 1.0, -100)
        for name, got, ref in zip(("d(hidden)", "d(weight)", "d(bias)"), grads, want):
            assert got.dtype == dtype
            assert_close(got, ref, TOL[dtype], f"{impl} {dtype} {name}")


def test_forcing_cublas_with_filtering_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTALIGN_GRAD_GEMM", "cublas")
    hidden, weight, bias, labels = _filter_setup(16, 8, 40, torch.float32)
    with pytest.raises(ValueError, match="FASTALIGN_GRAD_GEMM=cublas cannot skip filtered tiles"):
        run_token_logprobs(hidden, weight, bias, labels, torch.ones(16, device=DEVICE), None, grad_filter_eps=1e-3)
    monkeypatch.setenv("FASTALIGN_GRAD_GEMM", "fast")
    with pytest.raises(ValueError, match=r"FASTALIGN_GRAD_GEMM must be one of .*got 'fast'"):
        run_token_logprobs(hidden, weight, bias, labels, torch.ones(16, device=DEVICE), None)


def test_forward_split_count_fills_the_last_wave():
    from fastalign.triton_kernels.token_logprobs import MIN_WAVE_FILL, SPLIT_ALIGN, split_count

    # The shape on an H100/H200 (132 SMs): 64 token blocks; 5 splits were 2.4 waves.
    splits, per_split = split_count(8192, 151936, 132)
    assert splits == 2 and 64 * splits / 132 >= MIN_WAVE_FILL
    for n, vocab, sms in ((8192, 151936, 132), (2048, 32000, 132), (100, 151936, 108), (65536, 128256, 132),
                          (1, 50, 132), (4096, 151936, 2)):
        splits, per_split = split_count(n, vocab, sms)
        assert per_split % SPLIT_ALIGN == 0
        assert (splits - 1) * per_split < vocab <= splits * per_split, (n, vocab, sms)


def test_autotune_configs_pruned_by_shared_memory(monkeypatch):
    import triton
    from fastalign.triton_kernels.launch import prune_by_shared_memory

    # The gradient GEMM's configs on an H100 in bf16: (BLOCK_HO, BLOCK_K, stages) with 128-row tiles.
    configs = [triton.Config({"BLOCK_HO": ho, "BLOCK_K": k}, num_warps=8, num_stages=st)
               for ho, k, st in ((128, 64, 4), (256, 128, 3), (256, 64, 3), (64, 64, 4))]
    smem = lambda c: c.num_stages * (128 + c.kwargs["BLOCK_HO"]) * c.kwargs["BLOCK_K"] * 2
    limit = 227 * 1024
    monkeypatch.setenv("FASTALIGN_AUTOTUNE", "1")
    kept = prune_by_shared_memory(configs, smem, limit)
    assert kept == [configs[0], configs[2], configs[3]]  # 256 x 128 x 3 stages needs 288 KiB: never compiled
    monkeypatch.setenv("FASTALIGN_AUTOTUNE", "0")
    assert prune_by_shared_memory(configs, smem, limit) == [configs[0]]
    assert prune_by_shared_memory(configs, smem, 1024) == [configs[3]]  # none fits: the smallest, not nothing


def _grouped_order_kernel():
    """A kernel that writes each program's (outer, inner) block as outer * num_inner + inner."""
    import triton
    import triton.language as tl
    from fastalign.triton_kernels import token_logprobs as kernels

    @triton.jit
    def order(out_ptr, num_outer, num_inner, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        outer, inner = grouped(pid, num_outer, num_inner, GROUP)  # noqa: F821 (set below)
        tl.store(out_ptr + pid, outer * num_inner + inner)

    order.fn.__globals__["grouped"] = kernels._grouped  # the interpreter resolves names in fn's globals
    return order


def test_grouped_program_order_is_a_permutation():
    order = _grouped_order_kernel()
    for outer, inner, group in ((5, 3, 2), (8, 4, 8), (1, 7, 8), (9, 1, 4)):
        out = torch.full((outer * inner,), -1, dtype=torch.int32, device=DEVICE)
        order[(outer * inner,)](out, outer, inner, GROUP=group)
        assert sorted(out.tolist()) == list(range(outer * inner)), (outer, inner, group)
        # Consecutive programs stay within one group of `group` outer blocks.
        first = (out[: min(group, outer) * inner] // inner).unique().numel()
        assert first == min(group, outer)


def test_vocabulary_sorting_lets_filtering_skip_scattered_likely_tokens(monkeypatch):
    """Likely tokens spread over every vocabulary tile: unsorted, no tile can be skipped; sorted, most can."""
    n, h, v, eps = 32, 16, 256, 2.0 ** -12
    hidden = torch.randn(n, h, device=DEVICE)
    weight = torch.randn(v, h, device=DEVICE) * 0.1
    bias = torch.full((v,), -8.0, device=DEVICE)
    likely = torch.arange(0, v, 32, device=DEVICE) + 5  # one per 32-column tile
    bias[likely] = 6.0
    labels = likely[torch.randint(0, likely.numel(), (n,), device=DEVICE)]
    g_logp = torch.full((n,), 1.0 / n, device=DEVICE)
    _, _, exact = run_token_logprobs(hidden, weight, bias, labels, g_logp, None)
    monkeypatch.setenv("FASTALIGN_FILTER_SORT", "0")
    _, _, unsorted = run_token_logprobs(hidden, weight, bias, labels, g_logp, None, grad_filter_eps=eps)
    monkeypatch.setenv("FASTALIGN_FILTER_SORT", "1")
    _, _, sorted_ = run_token_logprobs(hidden, weight, bias, labels, g_logp, None, grad_filter_eps=eps)
    # Unsorted every tile holds a likely token: nothing skipped, the result is the exact one.
    for got, want in zip(unsorted, exact):
        assert_close(got, want, 1e-6, "unsorted filtering skips nothing here")
    _assert_filter_bound(hidden, weight, bias, labels, g_logp, None, eps, exact, sorted_)
    assert (sorted_[1] - exact[1]).abs().max() > 0, "sorted, the unlikely tiles must be skipped"
    for name, got, want in zip(("d(hidden)", "d(weight)", "d(bias)"), sorted_, exact):
        assert_close(got, want, 1e-3, f"sorted filtered {name} vs exact")
