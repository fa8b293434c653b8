"""token_logprobs (torch and cpu backends) and the chunked primitives against float64 formulas."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign import ops
from fastalign.ops.logprobs import chunked

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not ops.backends()["cpu"].available, reason="fastalign._C not built"))]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
IGNORE = -100


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert not torch.isnan(got).any(), "NaN in the result"
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def expected(hidden, weight, bias, labels, temperature, g_logp, g_ent):
    """float64 logp, entropy and their gradients, from the (rounded) input values."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = h @ w.t()
    if b is not None:
        z = z + b
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != IGNORE
    logp = logp_all.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), torch.zeros_like(logp))
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp, ent, h.grad, w.grad, None if b is None else b.grad


def make(lead, hdim, vocab, dtype, *, ignore_frac=0.3, bias=True, scale=1.0):
    hidden = (torch.randn(*lead, hdim) * scale).to(dtype)
    weight = (torch.randn(vocab, hdim) / hdim**0.5 * 2).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    labels[torch.rand(lead) < ignore_frac] = IGNORE
    return hidden, weight, b, labels


def run(backend, hidden, weight, bias, labels, g_logp, g_ent, **kw):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    with ops.backend(backend):
        logp, ent = ops.token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **kw)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    (logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    return logp, ent, hidden.grad, weight.grad, None if bias is None else bias.grad


def check(got, want, tol, what=""):
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        err = rel_err(g, w)
        assert err < tol, f"{what} {name}: rel. error {err:.2e} >= {tol}"


SHAPES = [  # (leading shape, H, V, chunk_size)
    ((1,), 8, 1, None),             # N = 1, V = 1
    ((3, 5), 13, 97, None),         # V prime, H not a power of two
    ((37,), 19, 257, 5),            # chunk_size not dividing N
    ((2, 3, 4), 24, 50, 7),         # 3 leading dims
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,hdim,vocab,chunk_size", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, dtype, lead, hdim, vocab, chunk_size, temperature):
    hidden, weight, bias, labels = make(lead, hdim, vocab, dtype)
    g_logp, g_ent = torch.randn(lead, dtype=torch.float64), torch.randn(lead, dtype=torch.float64)
    got = run(backend, hidden, weight, bias, labels, g_logp, g_ent, temperature=temperature, chunk_size=chunk_size)
    want = expected(hidden, weight, bias, labels, temperature, g_logp, g_ent)
    check(got, want, TOL[dtype], f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_no_bias_int32_labels(backend):
    hidden, weight, _, labels = make((4, 9), 33, 71, torch.float16, bias=False)
    labels = labels.to(torch.int32)
    g_logp, g_ent = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    got = run(backend, hidden, weight, None, labels, g_logp, g_ent, temperature=1.3, chunk_size=8)
    check(got, expected(hidden, weight, None, labels, 1.3, g_logp, g_ent), TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_gradient(backend):
    """return_entropy=False: only d(logp) flows back (the entropy branch is skipped)."""
    hidden, weight, bias, labels = make((11,), 16, 40, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    g = torch.randn(11, dtype=torch.float64)
    with ops.backend(backend):
        logp = ops.token_logprobs(h, w, labels, bias=bias, chunk_size=3)
    (logp * g.float()).sum().backward()
    want = expected(hidden, weight, bias, labels, 1.0, g, torch.zeros(11, dtype=torch.float64))
    check((logp, None, h.grad, w.grad), (want[0], None, want[2], want[3]), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_logits_near_1e4(backend, shift):
    """Integer inputs make the logits exact in float32, so only the softmax math is tested."""
    n, hdim, vocab = 12, 8, 30
    hidden = torch.randint(-3, 4, (n, hdim)).float()
    weight = torch.randint(-3, 4, (vocab, hdim)).float()
    bias = torch.full((vocab,), shift) + torch.randint(-5, 6, (vocab,)).float()
    bias[::7] = -shift  # some logits 2e4 away from the rest: probability exactly 0 in float32
    labels = torch.randint(0, vocab, (n,))
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    got = run(backend, hidden, weight, bias, labels, g_logp, g_ent, chunk_size=5)
    check(got, expected(hidden, weight, bias, labels, 1.0, g_logp, g_ent), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_position_ignored(backend):
    hidden, weight, bias, labels = make((3, 4), 10, 20, torch.float32)
    labels.fill_(IGNORE)
    got = run(backend, hidden, weight, bias, labels, torch.randn(3, 4), torch.randn(3, 4))
    for t in got:
        assert not torch.isnan(t).any() and (t == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    hidden, weight, bias, labels = make((0,), 10, 20, torch.float32)
    got = run(backend, hidden, weight, bias, labels, torch.zeros(0), torch.zeros(0))
    assert got[0].shape == (0,) and got[2].shape == (0, 10)
    assert (got[3] == 0).all() and (got[4] == 0).all()


class GemmCounter(TorchDispatchMode):
    """Counts the matmul FLOPs dispatched to ATen (mm, addmm, and the in-place/out= forms)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget_rows,chunk_size,gemms", [
    (10**6, None, 3.0),   # the budget holds every chunk's logits: kept, 3 GEMMs
    (0, 4, 4.0),          # nothing fits: every chunk recomputed, 4 GEMMs
    (16, 4, 3.5),         # half the chunks kept
])
def test_keep_or_recompute(backend, budget_rows, chunk_size, gemms):
    n, hdim, vocab = 32, 12, 45
    hidden, weight, bias, labels = make((n,), hdim, vocab, torch.float32, ignore_frac=0.0)
    budget = max(1, budget_rows * vocab * 4)
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    with GemmCounter() as counter:
        got = run(backend, hidden, weight, bias, labels, g_logp, g_ent, chunk_size=chunk_size, mem_budget=budget,
                  temperature=0.9)
    assert counter.flops == pytest.approx(gemms * 2 * n * hdim * vocab)
    check(got, expected(hidden, weight, bias, labels, 0.9, g_logp, g_ent), 1e-5)


def test_padding_costs_no_gemm():
    """Ignored rows are compacted away before the GEMMs."""
    n, hdim, vocab = 40, 8, 30
    hidden, weight, bias, labels = make((n,), hdim, vocab, torch.float32, ignore_frac=0.0)
    labels[5:25] = IGNORE
    with GemmCounter() as counter:
        run("torch", hidden, weight, bias, labels, torch.randn(n), torch.randn(n), chunk_size=6, mem_budget=1)
    assert counter.flops == 4 * 2 * 20 * hdim * vocab


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not ops.backends()["cpu"].available, reason="fastalign._C not built"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_in_forward(native, dtype, monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "cpu" if native else "torch")
    n, hdim, vocab = 29, 14, 61
    hidden, weight, bias, labels = make((n,), hdim, vocab, dtype, ignore_frac=0.4)
    labels[:3] = IGNORE  # the first chunk starts with padding
    g_logp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    ranges = []

    def grad_fn(s, e, logp, ent):
        ranges.append((s, e))
        assert logp.shape == (e - s,) and ent.shape == (e - s,)
        return g_logp[s:e].float(), g_ent[s:e].float()

    got = chunked.linear_logprobs_grad_in_forward(hidden, weight, labels, grad_fn, bias=bias, temperature=0.8,
                                                  chunk_size=6)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert got[2].dtype == dtype and got[3].dtype == torch.float32 and got[4].dtype == torch.float32
    check(got, expected(hidden, weight, bias, labels, 0.8, g_logp, g_ent), TOL[dtype])

    logp, ent = chunked.linear_logprobs_no_grad(hidden, weight, labels, bias=bias, temperature=0.8, chunk_size=4)
    check((logp, ent), expected(hidden, weight, bias, labels, 0.8, g_logp, g_ent)[:2], TOL[dtype])

    _, _, _, gw, gb = chunked.linear_logprobs_grad_in_forward(
        hidden, weight, labels, lambda s, e, lp, en: (g_logp[s:e].float(), None), bias=bias,
        need_weight_grad=False, need_bias_grad=False)
    assert gw is None and gb is None


def test_grad_in_forward_all_ignored():
    hidden, weight, _, labels = make((5,), 4, 7, torch.float32)
    labels.fill_(IGNORE)
    calls = []
    out = chunked.linear_logprobs_grad_in_forward(hidden, weight, labels, lambda *a: calls.append(a))
    assert not calls and all((t == 0).all() for t in out[:4]) and out[4] is None


def test_choose_chunk_size_and_budget(monkeypatch):
    assert chunked.choose_chunk_size(4100, 32000, 4096 * 32000 * 4) == 2050  # balanced chunks
    assert chunked.choose_chunk_size(10, 32000, 1) == 1
    assert chunked.choose_chunk_size(0, 5) == 1
    monkeypatch.setenv("FASTALIGN_MEM_BUDGET", "512M")
    assert chunked.default_mem_budget() == 512 * 2**20
    assert chunked.choose_chunk_size(2**20, 2**10) == 2**17
    monkeypatch.setenv("FASTALIGN_MEM_BUDGET", "2G")
    assert chunked.default_mem_budget() == 2 * 2**30
    monkeypatch.setenv("FASTALIGN_MEM_BUDGET", "12345")
    assert chunked.default_mem_budget() == 12345
    monkeypatch.setenv("FASTALIGN_MEM_BUDGET", "lots")
    with pytest.raises(ValueError, match="FASTALIGN_MEM_BUDGET.*'lots'"):
        chunked.default_mem_budget()
    with pytest.raises(ValueError, match="mem_budget"):
        ops.token_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), mem_budget=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    hidden, weight, bias, labels = make((2, 9), 16, 33, torch.float32)

    def loss_fn(h, w, b):
        logp, ent = ops.token_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=5)
        return (logp.sum() + 0.1 * ent.sum()) * 2.0

    outs = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with ops.backend(backend):
            loss = fn(*args)
        loss.backward()
        outs.append((loss, *(a.grad for a in args)))
    for eager, compiled in zip(*outs):
        assert rel_err(compiled, eager) < 1e-6


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_whole_row_chunks_partition_the_positions_on_row_boundaries(chunk_size):
    """``row_len`` chunks: [s, e) partition [0, N) in order, every inner boundary on a row boundary, each
    chunk's valid tokens exactly those of its rows, empty leading/middle/trailing rows included."""
    from fastalign.ops.logprobs import chunked

    length = 4
    labels = torch.full((7, length), -100)
    for r, n in ((1, 3), (2, 4), (4, 1), (5, 2)):  # rows 0, 3 and 6 empty
        labels[r, :n] = 1
    flat = labels.reshape(-1)
    chunks, n_valid = chunked._row_plan(flat, -100, chunk_size, 5, 1 << 20, length)
    assert n_valid == int((flat != -100).sum())
    assert chunks[0].start == 0 and chunks[-1].end == flat.numel()
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.end == nxt.start and nxt.start % length == 0
    seen = []
    for c in chunks:
        rows = torch.arange(flat.numel())[c.rows]
        assert ((rows >= c.start) & (rows < c.end)).all() and (flat[rows] != -100).all()
        one_row = len(set((rows // length).tolist())) == 1  # a row longer than a chunk stays whole
        assert c.b - c.a == rows.numel() and (rows.numel() <= chunk_size or one_row)
        seen += rows.tolist()
    assert seen == (flat != -100).nonzero().squeeze(1).tolist()
    fits = chunked.whole_rows_fit(labels, -100, chunk_size, 5)
    assert fits == (chunk_size >= 4)
