"""Token-chunked log-probs from hidden states and an LM head: never an ``N x V`` tensor.

The tokens (rows of ``hidden [N, H]``) are cut into chunks; each chunk's logits
``h @ W.T (+ b)`` are computed in float32 by one GEMM, then ONE fused pass over the chunk gives
the log-prob of the label, the entropy and (in the backward) the gradient of the logits, written
in place into the same buffer. Only ``O(chunk x V)`` logits exist at any time, plus ``O(N)``
per-token scalars and the gradient buffers of the inputs.

Row math: the loops ask the dispatcher for the ``_logprob_rows`` of the tensors' backend (a
:class:`LogprobRows`): the fused OpenMP kernels on CPU (``logprobs/cpu.py``), the Triton row
kernels on CUDA (``logprobs/triton.py``), or plain PyTorch on small row blocks anywhere (below), so
a forced backend (``ops.backend(...)``) holds for every loss built on these loops.

Ignored positions are compacted away first (like Cut Cross-Entropy): chunk boundaries are
placed so that every chunk holds ``chunk_size`` *valid* rows, and padding costs no GEMM work.
A chunk made only of ignored rows is never computed.

Memory budget and the keep/recompute switch (``mem_budget`` bytes; default
``FASTALIGN_MEM_BUDGET``, plain bytes or a suffix ``K``/``M``/``G``, else 256 MiB):

* ``choose_chunk_size`` picks the rows per chunk so that one chunk's float32 logits fit the budget.
* :func:`token_logprobs_chunked` (the autograd op) needs the logits again in the backward. When
  the budget holds ALL valid rows' logits it keeps them: 3 GEMMs in all (forward, then d_hidden
  and d_weight). Otherwise it keeps the logits of as many of the LAST chunks as fit the budget
  and recomputes the others in the backward: 3 + (recomputed rows / N) GEMMs, 4 when none fits
  (e.g. N=4096, V=32000 at 256 MiB: 8 chunks of 512 rows, 4 kept, 3.5 GEMMs). Chunks are cut
  to a quarter of the budget (but not below 512 rows, where GEMMs lose efficiency) so that the
  kept part fills the budget closely. The backward consumes the kept chunks first and reuses
  their buffer for the recomputed ones, so the logits never take more than the budget.
* :func:`linear_logprobs_grad_in_forward` is for losses whose gradient w.r.t. each token's
  log-prob is known in the forward (GRPO/PPO, or a DPO pair): it never keeps anything and does
  the forward and backward of each chunk at once (3 GEMMs per chunk).

Numerics: float32 logits and accumulation for fp32/bf16/fp16 (and fp64) inputs; the log-sum-exp
is taken relative to the row max; weight/bias gradients accumulate in float32 buffers and are
cast once at the end.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from .. import dispatch

DEFAULT_MEM_BUDGET = 256 * 2**20
_SUFFIXES = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
             "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}
# Rows per block in the pure-PyTorch row math: bounds its temporaries to ~16 MiB whatever the chunk.
_TORCH_BLOCK_ELEMS = 2**22
# Below this many rows per chunk the GEMMs lose efficiency, so the partial-keep split stops there.
_MIN_SPLIT_ROWS = 512
_SPLIT = 4

GradFn = Callable[[int, int, Tensor, Tensor], "tuple[Tensor | None, Tensor | None]"]


# ----------------------------------------------------------------------------------- the budget
def parse_mem_budget(text: str, name: str = "FASTALIGN_MEM_BUDGET") -> int:
    """``"268435456"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` → bytes (binary units)."""
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if unit not in _SUFFIXES or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive byte count like 268435456, 512M or 2G, got {text!r}")
    return max(1, int(value * _SUFFIXES[unit]))


def default_mem_budget() -> int:
    env = os.environ.get("FASTALIGN_MEM_BUDGET", "").strip()
    return parse_mem_budget(env) if env else DEFAULT_MEM_BUDGET


def _budget(mem_budget: int | None) -> int:
    if mem_budget is None:
        return default_mem_budget()
    if isinstance(mem_budget, bool) or not isinstance(mem_budget, int) or mem_budget < 1:
        raise ValueError(f"mem_budget must be a positive int of bytes, got {mem_budget!r}")
    return mem_budget


def choose_chunk_size(n_tokens: int, vocab: int, mem_budget: int | None = None) -> int:
    """Tokens per chunk so that one chunk's float32 logits ``[chunk, vocab]`` fit ``mem_budget`` bytes.

    Chunks are balanced (``N = 4100`` with room for 4096 gives two chunks of 2050, not 4096 + 4),
    and at least 1 row even when a single row exceeds the budget.
    """
    if n_tokens < 0 or vocab < 1:
        raise ValueError(f"n_tokens must be >= 0 and vocab >= 1, got n_tokens={n_tokens}, vocab={vocab}")
    rows = max(1, _budget(mem_budget) // (4 * vocab))
    if n_tokens <= rows:
        return max(1, n_tokens)
    n_chunks = -(-n_tokens // rows)
    return -(-n_tokens // n_chunks)


# ------------------------------------------------------------------------------------- row math
@dataclass(frozen=True)
class LogprobRows:
    """One backend's fused row passes over float32 logits ``z [n, V]`` with valid labels ``[n]``.

    ``forward(z, labels, temperature, ignore_index) -> (logp, entropy, stat)``, each fp32 ``[n]``;
    ``stat`` is whatever the same backend's ``backward_`` needs (a log-sum-exp).
    ``backward_(z, labels, stat, entropy, g_logp, g_entropy, temperature, ignore_index)`` overwrites
    ``z`` with d(loss)/d(z); ``g_entropy`` may be None.
    """

    name: str
    forward: Callable
    backward_: Callable


def row_math(device: torch.device) -> LogprobRows:
    """The row passes of the backend the dispatcher picks for ``device`` (honouring a forced backend)."""
    return dispatch.select("_logprob_rows", device)[1]


def _rows_forward_torch(z: Tensor, labels: Tensor, temperature: float,
                        ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, rel_lse) of each row of float32 logits ``z`` (labels all valid).

    ``rel_lse = log sum exp(x - max x)``, the log-sum-exp relative to the row max, as the native kernel.
    """
    n = z.shape[0]
    logp, entropy, rel_lse = (z.new_empty(n) for _ in range(3))
    block = max(1, _TORCH_BLOCK_ELEMS // max(1, z.shape[1]))
    inv_t = 1.0 / temperature
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        x = z[r0:r1] * inv_t if temperature != 1.0 else z[r0:r1]
        m = x.amax(-1, keepdim=True)
        d = x - m  # relative to the row max: exact near |z| ~ 1e4, where z - lse would cancel
        e = d.exp()
        s = e.sum(-1)
        u = e.mul_(d).sum(-1)
        log_s = s.log()
        rel_lse[r0:r1] = log_s
        entropy[r0:r1] = log_s - u / s
        # A label outside [0, V) (value checks off) is never read: NaN log-prob, as the native kernels give.
        lab = labels[r0:r1]
        inside = (lab >= 0) & (lab < z.shape[1])
        picked = d.gather(-1, lab.clamp(0, z.shape[1] - 1)[:, None]).squeeze(-1)
        logp[r0:r1] = torch.where(inside, picked, float("nan")) - log_s
    return logp, entropy, rel_lse


def _rows_backward_torch_(z: Tensor, labels: Tensor, rel_lse: Tensor, entropy: Tensor, g_logp: Tensor,
                          g_entropy: Tensor | None, temperature: float, ignore_index: int = -100) -> None:
    """Overwrite float32 logits ``z`` with d(loss)/d(z), row block by row block."""
    n = z.shape[0]
    block = max(1, _TORCH_BLOCK_ELEMS // max(1, z.shape[1]))
    inv_t = 1.0 / temperature
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        zb = z[r0:r1]
        if temperature != 1.0:
            zb.mul_(inv_t)
        # log p = (x - max x) - rel_lse: exact near |x| ~ 1e4, where x - lse would lose lse's rounding.
        zb.sub_(zb.amax(-1, keepdim=True)).sub_(rel_lse[r0:r1, None])
        p = zb.exp()
        gl = g_logp[r0:r1, None]
        if g_entropy is None:
            torch.mul(p, gl, out=zb).neg_()
        else:  # dx = -p * (g_logp + g_ent * (logp + H))
            zb.add_(entropy[r0:r1, None]).mul_(g_entropy[r0:r1, None]).add_(gl).mul_(p).neg_()
        lab = labels[r0:r1]
        inside = ((lab >= 0) & (lab < zb.shape[1]))[:, None]
        zb.scatter_add_(-1, lab.clamp(0, zb.shape[1] - 1)[:, None], gl)  # + g_logp at the label
        zb.masked_fill_(~inside, 0.0)  # an out-of-range label's row (NaN log-prob) passes no gradient
        if temperature != 1.0:
            zb.mul_(inv_t)


TORCH_ROWS = LogprobRows("torch", _rows_forward_torch, _rows_backward_torch_)
dispatch.register("_logprob_rows", "torch")(TORCH_ROWS)


# ------------------------------------------------------- extra outputs and logit transforms (TRL's head)
# Kept apart from the row math: every backend's chunk loop gets them from these torch ops on the
# chunk's float32 logits, right after its GEMM, so cpu, torch and triton rows all share one definition.
EXTRAS = ("log_sum_p2", "mean_logit", "is_top1")


@dataclass(frozen=True)
class LogitTransform:
    """``z -> softcap * tanh(logit_scale * z / softcap)`` (no tanh when ``softcap`` is None), before the
    temperature, as TRL's ``ChunkedLogProbFunction`` and the models it reads them from define it."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None


IDENTITY = LogitTransform()


def transform_logits_(z: Tensor, tf: LogitTransform) -> None:
    """Apply ``tf`` in place to float32 logits ``z``."""
    if tf.scale != 1.0:
        z.mul_(tf.scale)
    if tf.softcap is not None:
        z.div_(tf.softcap).tanh_().mul_(tf.softcap)


def transform_grad_factor(z: Tensor, tf: LogitTransform) -> Tensor | None:
    """d(softcap)/d(input) per element, ``1 - tanh^2``, read from the transformed logits before the row
    backward overwrites them; None without softcap (the scale alone needs no buffer)."""
    if tf.softcap is None:
        return None
    t = z / tf.softcap
    return t.mul_(t).neg_().add_(1.0)


def transform_grad_(g: Tensor, factor: Tensor | None, tf: LogitTransform) -> None:
    """Turn d(loss)/d(transformed logits) ``g`` into d(loss)/d(GEMM output), in place."""
    if factor is not None:
        g.mul_(factor)
    if tf.scale != 1.0:
        g.mul_(tf.scale)


def row_extras(z: Tensor, labels: Tensor, temperature: float, names: tuple[str, ...]) -> list[Tensor]:
    """The requested non-differentiable extras of each row of (transformed) float32 logits ``z [n, V]``,
    in the order of ``names``, computed on ``x = z / temperature`` by row blocks:

    * ``log_sum_p2``: ``log sum_v p_v^2`` = ``logsumexp(2x) - 2 logsumexp(x)`` (fp32);
    * ``mean_logit``: the mean of ``x`` over the vocabulary (fp32);
    * ``is_top1``: the label is the first maximum of ``x`` (``argmax`` semantics: a tie with an earlier
      token does not count), bool.
    """
    n = z.shape[0]
    out = [torch.empty(n, dtype=torch.bool if k == "is_top1" else torch.float32, device=z.device) for k in names]
    block = max(1, _TORCH_BLOCK_ELEMS // max(1, z.shape[1]))
    inv_t = 1.0 / temperature
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        x = z[r0:r1] * inv_t if temperature != 1.0 else z[r0:r1]
        for k, o in zip(names, out):
            if k == "mean_logit":
                o[r0:r1] = x.mean(-1)
            elif k == "is_top1":
                o[r0:r1] = x.argmax(-1) == labels[r0:r1]
            else:  # log_sum_p2, relative to the row max like the row passes
                d = x - x.amax(-1, keepdim=True)
                o[r0:r1] = torch.logsumexp(2.0 * d, -1) - 2.0 * torch.logsumexp(d, -1)
    return out


# ------------------------------------------------------------------------------- chunk planning
@dataclass
class _Chunk:
    start: int          # original token range [start, end) this chunk answers for (ignored rows included)
    end: int
    a: int              # its valid rows are valid_idx[a:b] (a compacted range)
    b: int
    rows: object        # original positions of the valid rows: a slice when contiguous, else an index tensor

    def local(self):
        """The valid rows' positions inside [start, end)."""
        if isinstance(self.rows, slice):
            return slice(self.rows.start - self.start, self.rows.stop - self.start)
        return self.rows - self.start


def _plan(labels1d: Tensor, ignore_index: int, chunk_size: int | None, vocab: int, budget: int,
          split: bool = False) -> tuple[list[_Chunk], int]:
    """Chunks covering [0, N), each with at most ``chunk_size`` valid rows; returns (chunks, n_valid)."""
    n = labels1d.shape[0]
    if n == 0:
        return [], 0
    valid = labels1d != ignore_index
    if bool(valid.all()):
        valid_idx, n_valid = None, n
    else:
        valid_idx = valid.nonzero().squeeze(1)
        n_valid = valid_idx.numel()
    if n_valid == 0:
        return [], 0
    if chunk_size is None:
        chunk_size = choose_chunk_size(n_valid, vocab, budget)
        if split and chunk_size < n_valid:
            chunk_size = max(chunk_size // _SPLIT, min(chunk_size, _MIN_SPLIT_ROWS))
            chunk_size = -(-n_valid // -(-n_valid // chunk_size))  # balance
    starts = list(range(0, n_valid, chunk_size))
    if valid_idx is None:
        return [_Chunk(a, min(n, a + chunk_size), a, min(n, a + chunk_size), slice(a, min(n, a + chunk_size)))
                for a in starts], n_valid
    ends = [min(n_valid, a + chunk_size) for a in starts]
    firsts = valid_idx[starts].tolist()
    lasts = valid_idx[[e - 1 for e in ends]].tolist()
    chunks = []
    for k, (a, b) in enumerate(zip(starts, ends)):
        start = 0 if k == 0 else firsts[k]
        end = n if k + 1 == len(starts) else firsts[k + 1]
        contiguous = lasts[k] - firsts[k] == b - a - 1
        rows = slice(firsts[k], lasts[k] + 1) if contiguous else valid_idx[a:b]
        chunks.append(_Chunk(start, end, a, b, rows))
    return chunks, n_valid


def _rows_cap(chunk_size: int | None, vocab: int, budget: int) -> int:
    return chunk_size if chunk_size is not None else max(1, budget // (4 * vocab))


def whole_rows_fit(labels2d: Tensor, ignore_index: int, chunk_size: int | None, vocab: int,
                   mem_budget: int | None = None) -> bool:
    """Whether every row's valid tokens fit one chunk, so chunks can hold whole rows (``row_len``)."""
    longest = int((labels2d != ignore_index).sum(1).max()) if labels2d.numel() else 0
    return longest <= _rows_cap(chunk_size, vocab, _budget(mem_budget))


def _row_plan(labels1d: Tensor, ignore_index: int, chunk_size: int | None, vocab: int, budget: int,
              row_len: int) -> tuple[list[_Chunk], int]:
    """Chunks of whole rows of ``row_len`` positions (each at most ``chunk_size`` valid tokens unless one
    row alone is longer: check :func:`whole_rows_fit`), so a loss can see every token of a row at once."""
    valid = labels1d != ignore_index
    counts = valid.view(-1, row_len).sum(1).tolist()
    n_valid = sum(counts)
    if n_valid == 0:
        return [], 0
    cap = _rows_cap(chunk_size, vocab, budget)
    groups, first, held = [], 0, 0  # groups of rows [r0, r1)
    for r, c in enumerate(counts):
        if held and held + c > cap:
            groups.append((first, r))
            first, held = r, 0
        held += c
    groups.append((first, len(counts)))
    valid_idx = valid.nonzero().squeeze(1)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    chunks = []
    for r0, r1 in groups:
        a, b = cum[r0], cum[r1]
        if a == b:  # trailing rows without valid tokens: the previous chunk answers for them
            continue
        lo, hi = int(valid_idx[a]), int(valid_idx[b - 1])
        rows = slice(lo, hi + 1) if hi - lo == b - a - 1 else valid_idx[a:b]
        chunks.append(_Chunk(r0 * row_len, r1 * row_len, a, b, rows))
    chunks[0] = replace(chunks[0], start=0)
    chunks[-1] = replace(chunks[-1], end=labels1d.shape[0])
    return chunks, n_valid


def _f32(x: Tensor | None) -> Tensor | None:
    return x if x is None or x.dtype == torch.float32 else x.float()


def _gather_rows(x: Tensor, rows) -> Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _chunk_logits(h32: Tensor, w32: Tensor, b32: Tensor | None, workspace: Tensor | None = None) -> Tensor:
    """float32 ``h @ W.T (+ b)``, into ``workspace[:rows]`` when given.

    Reusing one workspace for every chunk matters on CPU: a fresh multi-MiB buffer is returned to
    the OS when freed, and touching its pages again costs as much as the row math itself.
    """
    out = None if workspace is None else workspace[:h32.shape[0]]
    if b32 is None:
        return torch.mm(h32, w32.t(), out=out)
    return torch.addmm(b32, h32, w32.t(), out=out)


def _workspace(chunks: list, vocab: int, device: torch.device) -> Tensor | None:
    if not chunks:
        return None
    rows = max(c.b - c.a for c in chunks)
    return torch.empty(rows, vocab, dtype=torch.float32, device=device)


def _labels_of(labels1d: Tensor, rows) -> Tensor:
    lab = _gather_rows(labels1d, rows)
    return lab if lab.dtype == torch.int64 and lab.is_contiguous() else lab.to(torch.int64).contiguous()


def _check_2d(hidden2d: Tensor, weight: Tensor, labels1d: Tensor, bias: Tensor | None) -> None:
    if hidden2d.dim() != 2:
        raise ValueError(f"hidden2d must be 2-D [N, H], got shape {tuple(hidden2d.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden2d.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, {hidden2d.shape[1]}] with V >= 1, got {tuple(weight.shape)}")
    if labels1d.dim() != 1 or labels1d.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"labels1d must have shape ({hidden2d.shape[0]},), got {tuple(labels1d.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


# ------------------------------------------------------------------------------ the primitives
@torch.no_grad()
def linear_logprobs_no_grad(hidden2d, weight, labels1d, *, bias=None, temperature=1.0, ignore_index=-100,
                            chunk_size=None, mem_budget=None) -> tuple[Tensor, Tensor]:
    """(logp [N], entropy [N]) float32, 0 at ignored positions; 1 GEMM per chunk, no graph (reference passes)."""
    _check_2d(hidden2d, weight, labels1d, bias)
    n, vocab = hidden2d.shape[0], weight.shape[0]
    logp = torch.zeros(n, dtype=torch.float32, device=hidden2d.device)
    entropy = torch.zeros_like(logp)
    chunks, _ = _plan(labels1d, ignore_index, chunk_size, vocab, _budget(mem_budget))
    if not chunks:
        return logp, entropy
    rows = row_math(hidden2d.device)
    w32, b32 = _f32(weight), _f32(bias)
    ws = _workspace(chunks, vocab, hidden2d.device)
    for c in chunks:
        z = _chunk_logits(_f32(_gather_rows(hidden2d, c.rows)), w32, b32, ws)
        lp, ent, _ = rows.forward(z, _labels_of(labels1d, c.rows), float(temperature), ignore_index)
        logp[c.rows] = lp
        entropy[c.rows] = ent
    return logp, entropy


def linear_logprobs_grad_in_forward(hidden2d, weight, labels1d, grad_fn: GradFn, *, bias=None, temperature=1.0,
                                    ignore_index=-100, chunk_size=None, mem_budget=None, need_weight_grad=True,
                                    need_bias_grad=True, row_len=None):
    """Forward and backward of each token chunk at once, for losses whose d(loss)/d(logp) is known per chunk.

    For each chunk ``[s, e)`` of the original token positions: logits in float32, ``logp`` and
    ``entropy`` by the fused row pass, then ``g_logp, g_entropy = grad_fn(s, e, logp[s:e],
    entropy[s:e])`` (float32 ``[e - s]`` each, values at ignored positions are 0 and their
    gradients unused; ``g_entropy`` and ``g_logp`` may be ``None``), the logits' gradient in place,
    ``grad_hidden[s:e] = G @ W``, ``grad_weight += G.T @ h``, ``grad_bias += G.sum(0)``.
    The ranges ``[s, e)`` partition ``[0, N)`` in order; ``grad_fn`` is not called at all when
    every position is ignored. Chunks hold ``chunk_size`` valid tokens (default from ``mem_budget``);
    with ``row_len`` they hold whole rows of that many positions instead (``[s, e)`` on row boundaries,
    see :func:`whole_rows_fit`), for losses whose gradient needs a whole row (GSPO).

    Returns ``(logp [N] fp32, entropy [N] fp32, grad_hidden [N, H] in hidden2d.dtype,
    grad_weight [V, H] fp32 or None, grad_bias [V] fp32 or None)``, all detached. 3 GEMMs per
    chunk, never ``N x V``.
    """
    _check_2d(hidden2d, weight, labels1d, bias)
    hidden2d, weight = hidden2d.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    n, vocab = hidden2d.shape[0], weight.shape[0]
    dev = hidden2d.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    entropy = torch.zeros_like(logp)
    if row_len is None:
        chunks, n_valid = _plan(labels1d, ignore_index, chunk_size, vocab, _budget(mem_budget))
    else:
        chunks, n_valid = _row_plan(labels1d, ignore_index, chunk_size, vocab, _budget(mem_budget), row_len)
    grads = _Grads(hidden2d, vocab, True, need_weight_grad, need_bias_grad and bias is not None, n_valid == n)
    rows = row_math(dev)
    w32, b32 = _f32(weight), _f32(bias)
    temperature = float(temperature)
    ws = _workspace(chunks, vocab, dev)
    for c in chunks:
        with torch.no_grad():
            h32 = _f32(_gather_rows(hidden2d, c.rows))
            labels = _labels_of(labels1d, c.rows)
            z = _chunk_logits(h32, w32, b32, ws)
            lp, ent, rel_lse = rows.forward(z, labels, temperature, ignore_index)
            logp[c.rows] = lp
            entropy[c.rows] = ent
        g_lp, g_ent = grad_fn(c.start, c.end, logp[c.start:c.end], entropy[c.start:c.end])
        with torch.no_grad():
            loc = c.local()
            g_lp = torch.zeros_like(lp) if g_lp is None else _f32(g_lp.detach()[loc]).contiguous()
            g_ent = None if g_ent is None else _f32(g_ent.detach()[loc]).contiguous()
            rows.backward_(z, labels, rel_lse, ent, g_lp, g_ent, temperature, ignore_index)
            grads.add(z, h32, w32, c.rows)
    return (logp, entropy, *grads.result())


class _Grads:
    """Gradient buffers of hidden, weight and bias (float32 for weight and bias), filled chunk by chunk.

    The first chunk writes d_weight and d_bias directly instead of adding to zeros: zero-filling
    ``[V, H]`` first would cost a whole extra pass over that memory. d_hidden is zero-filled only
    when some rows are ignored (no chunk writes them).
    """

    def __init__(self, hidden2d: Tensor, vocab: int, need_h: bool, need_w: bool, need_b: bool, all_rows: bool):
        n, hdim = hidden2d.shape
        dev = hidden2d.device
        self.hidden = (torch.empty if all_rows else torch.zeros)(n, hdim, dtype=hidden2d.dtype, device=dev) \
            if need_h else None
        self.weight = torch.empty(vocab, hdim, dtype=torch.float32, device=dev) if need_w else None
        self.bias = torch.empty(vocab, dtype=torch.float32, device=dev) if need_b else None
        self.fresh = True

    def add(self, g: Tensor, h32: Tensor, w32: Tensor, rows) -> None:
        """d_hidden[rows] = G @ W; d_weight += G.T @ h; d_bias += sum_rows G (G = d logits, float32)."""
        if self.hidden is not None:
            if isinstance(rows, slice) and self.hidden.dtype == torch.float32:
                torch.mm(g, w32, out=self.hidden[rows])
            else:
                self.hidden[rows] = torch.mm(g, w32).to(self.hidden.dtype)
        if self.weight is not None:
            if self.fresh:
                torch.mm(g.t(), h32, out=self.weight)
            else:
                self.weight.addmm_(g.t(), h32)
        if self.bias is not None:
            if self.fresh:
                torch.sum(g, 0, out=self.bias)
            else:
                self.bias.add_(g.sum(0))
        self.fresh = False

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.fresh:  # no chunk ran: every position ignored
            for t in (self.hidden, self.weight, self.bias):
                if t is not None:
                    t.zero_()
        return self.hidden, self.weight, self.bias


# ------------------------------------------------------------------------------- the autograd op
class _TokenLogprobs(torch.autograd.Function):
    """Chunked forward; the backward reuses the kept chunks' logits and recomputes the others."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels1d, temperature, ignore_index, chunk_size, budget, rows,
                tf=IDENTITY, extras=()):
        n, vocab = hidden2d.shape[0], weight.shape[0]
        logp = torch.zeros(n, dtype=torch.float32, device=hidden2d.device)
        entropy = torch.zeros_like(logp)
        extra_out = [torch.zeros(n, dtype=torch.bool if k == "is_top1" else torch.float32, device=hidden2d.device)
                     for k in extras]
        # All valid rows' logits within the budget: one chunk, kept. Else quarter-budget chunks, partly kept.
        chunks, n_valid = _plan(labels1d, ignore_index, chunk_size, vocab, budget, split=True)
        rows_max = max((c.b - c.a for c in chunks), default=1)
        n_keep = min(len(chunks), budget // (4 * vocab * rows_max))
        w32, b32 = _f32(weight), _f32(bias)
        kept: dict[int, Tensor] = {}
        stats = []
        ws = z = None
        for k, c in enumerate(chunks):
            labels = _labels_of(labels1d, c.rows)
            if ws is None:
                ws = _workspace(chunks, vocab, hidden2d.device)
            z = _chunk_logits(_f32(_gather_rows(hidden2d, c.rows)), w32, b32, ws)
            if not tf.identity:
                transform_logits_(z, tf)
            lp, ent, rel_lse = rows.forward(z, labels, temperature, ignore_index)
            logp[c.rows] = lp
            entropy[c.rows] = ent
            for dst, src in zip(extra_out, row_extras(z, labels, temperature, extras) if extras else ()):
                dst[c.rows] = src
            stats.append((labels, rel_lse, ent))
            if k >= len(chunks) - n_keep:  # the last chunks are kept: the buffer now belongs to them
                kept[k], ws = ws, None
        del ws, z
        ctx.save_for_backward(hidden2d, weight, bias)
        ctx.chunks, ctx.kept, ctx.stats, ctx.all_rows = chunks, kept, stats, n_valid == n
        ctx.temperature, ctx.ignore_index, ctx.rows, ctx.tf = temperature, ignore_index, rows, tf
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*extra_out)
        return (logp, entropy, *extra_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, *_extras):  # the extras are non-differentiable
        hidden2d, weight, bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        dev = hidden2d.device
        chunks, kept, stats = ctx.chunks, ctx.kept, ctx.stats
        any_grad = g_logp is not None or g_entropy is not None
        grads = _Grads(hidden2d, vocab, need_h, need_w, need_b and bias is not None, any_grad and ctx.all_rows)
        if any_grad and chunks:
            w32, b32 = _f32(weight), _f32(bias)
            g_logp = None if g_logp is None else _f32(g_logp)
            g_entropy = None if g_entropy is None else _f32(g_entropy)
            # Kept chunks first: each frees its logits, so the recomputed ones never add to the kept peak.
            order = sorted(kept, reverse=True) + [k for k in range(len(chunks)) if k not in kept]
            ws = None
            for k in order:
                c = chunks[k]
                labels, rel_lse, ent = stats[k]
                h32 = _f32(_gather_rows(hidden2d, c.rows))
                if k in kept:
                    # A used kept buffer becomes the recompute workspace: nothing new is allocated.
                    ws = kept.pop(k)
                    z = ws[:c.b - c.a]
                else:
                    if ws is None:
                        ws = _workspace(chunks, vocab, dev)
                    z = _chunk_logits(h32, w32, b32, ws)
                    if not ctx.tf.identity:
                        transform_logits_(z, ctx.tf)
                factor = transform_grad_factor(z, ctx.tf)
                gl = torch.zeros_like(rel_lse) if g_logp is None else _gather_rows(g_logp, c.rows).contiguous()
                ge = None if g_entropy is None else _gather_rows(g_entropy, c.rows).contiguous()
                ctx.rows.backward_(z, labels, rel_lse, ent, gl, ge, ctx.temperature, ctx.ignore_index)
                if not ctx.tf.identity:
                    transform_grad_(z, factor, ctx.tf)
                grads.add(z, h32, w32, c.rows)
            del ws, z
        ctx.kept, ctx.stats = {}, []
        grad_hidden, grad_weight, grad_bias = grads.result()
        if grad_weight is not None and weight.dtype != torch.float32:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None and bias.dtype != torch.float32:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def token_logprobs_chunked(hidden, weight, labels, *, rows: LogprobRows, bias=None, temperature=1.0,
                           ignore_index=-100, return_entropy=False, chunk_size=None, mem_budget=None,
                           grad_filter_eps=0.0, softcap=None, logit_scale=1.0, extras=()):
    """:func:`fastalign.ops.token_logprobs` by token chunks (inputs already validated there) with the row
    passes ``rows`` of one backend. ``grad_filter_eps`` is a GPU-only approximation and is ignored here
    (exact gradients). With ``extras`` (names from :data:`EXTRAS`) returns ``(logp, entropy, {name: tensor})``.
    """
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    tf = LogitTransform(float(logit_scale), None if softcap is None else float(softcap))
    logp, entropy, *extra_out = _TokenLogprobs.apply(hidden2d, weight, bias, labels1d, float(temperature),
                                                     ignore_index, chunk_size, _budget(mem_budget), rows, tf,
                                                     tuple(extras))
    logp = logp.reshape(lead)
    if extras:
        return logp, entropy.reshape(lead), {k: x.reshape(lead) for k, x in zip(extras, extra_out)}
    return (logp, entropy.reshape(lead)) if return_entropy else logp
