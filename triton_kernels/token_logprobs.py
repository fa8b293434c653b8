"""Triton kernels for token_logprobs: log_softmax((hidden @ weight.T + bias) / T)[label], never N x V.

Forward (``lse_forward``): programs own (token block, vocabulary split) pairs and stream their split
in ``BLOCK_V`` tiles; each tile of logits is a ``tl.dot`` K-loop over H, folded into an online
log-sum-exp (running max ``m``, ``s = sum e^(x-m)``, ``u = sum e^(x-m) (x-m)``) together with the
label's logit. Splitting the vocabulary keeps every SM busy when N is small (64 token blocks at
N = 8192 would leave half an H100 idle); the per-split partials are O(splits x N) and merged in
``merge_splits``. Only lse and entropy per row survive the forward.

Backward, one vocabulary chunk ``[v0, v0 + Vc)`` at a time (Vc from the memory budget):
  1. ``dlogits_chunk`` recomputes the logit tiles (the one extra GEMM) and writes
     dz = d(loss)/d(logits) for the chunk, ``[N, Vc]`` in the compute dtype, and one "keep" flag
     per tile (``max |dz| >= eps``; all tiles are kept when eps = 0).
  2. ``dhidden_accumulate``: dH32 += dz @ W[chunk] (fp32 read-modify-write of dH, no atomics).
  3. ``dweight_chunk``: dW[chunk] = dz^T @ hidden and d(bias)[chunk] = sum_n dz, the reduction over
     all N tokens held in fp32 registers and cast once into the weight's dtype.
Why stage dz per vocabulary chunk instead of atomics or per-block ownership: a program that owned
dW[v-block, :] would need a [BLOCK_V, H] fp32 accumulator (2 MB at H = 4096), and atomics on dW
need a V x H fp32 buffer (2.5 GB at V = 152k, H = 4096) to keep fp32 accumulation, breaking the
memory bound. Staging dz for one chunk costs N x Vc elements (bounded by the budget), keeps the
backward at 3 GEMMs (4 in all with the forward, 1.33x the bare-GEMM floor before overheads), and
lets both gradient GEMMs skip filtered tiles.

Gradient filtering (``eps > 0``, in the style of Cut Cross-Entropy): a (token block, vocab block)
tile whose every |dz| < eps is skipped by both gradient GEMMs and by d(bias). Each skipped element
contributes |dz| < eps, so for every row n and column h:
    |error in dH[n, h]| <= eps * (#skipped elements of row n) * max_v |W[v, h]|
    |error in dW[v, h]| <= eps * (#skipped elements of column v) * max_n |hidden[n, h]|
    |error in db[v]|    <= eps * (#skipped elements of column v)
eps = 0 keeps every tile: exact.

Under ``TRITON_INTERPRET=1`` (CPU tensors) every kernel runs one small fixed configuration and
upcasts dot operands to fp32 (the interpreter's bf16 ``tl.dot`` is wrong); on a GPU block sizes are
autotuned per (H, V) and bf16/fp16 operands feed the tensor cores with fp32 accumulators.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile shape of dz shared by the dlogits kernel, the keep flags and both gradient GEMMs: the GEMMs
# skip whole flag tiles, so their token/vocabulary block sizes must equal these.
FLAG_BLOCK_N = 16 if INTERPRET else 128
FLAG_BLOCK_V = 32 if INTERPRET else 128
# Vocabulary splits of the forward are multiples of this (a multiple of every BLOCK_V tried).
SPLIT_ALIGN = 32 if INTERPRET else 256


def _configs(gpu_configs, interpret_config):
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=1, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in gpu_configs]


# 128 x 256 logit tiles spill registers on sm_90 (checked offline with triton.compile): not offered.
_FWD_CONFIGS = _configs(
    [({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, 8, 4),
     ({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, 8, 3),
     ({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, 4, 4),
     ({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, 8, 4),
     ({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_H": 64}, 8, 3)],
    {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16})

_DLOGITS_CONFIGS = _configs(
    [({"BLOCK_H": 64, "GROUP_N": 8}, 8, 4),
     ({"BLOCK_H": 64, "GROUP_N": 8}, 8, 3),
     ({"BLOCK_H": 64, "GROUP_N": 8}, 4, 4),
     ({"BLOCK_H": 32, "GROUP_N": 8}, 4, 5)],
    {"BLOCK_H": 16, "GROUP_N": 2})

# The gradient GEMMs tile the output's H dimension; their reduction blocks are the flag tiles.
_GRAD_GEMM_CONFIGS = _configs(
    [({"BLOCK_HO": 128}, 8, 4),
     ({"BLOCK_HO": 256}, 8, 3),
     ({"BLOCK_HO": 64}, 4, 4),
     ({"BLOCK_HO": 128}, 4, 3)],
    {"BLOCK_HO": 16})


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """x = (hidden[rows] @ weight[cols].T + bias[cols]) / T as an fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    offs_h = tl.arange(0, BLOCK_H)
    h_base = h_ptr + rows[:, None] * stride_hn
    w_base = w_ptr + cols[None, :] * stride_wv
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + offs_h
        hmask = hk < H
        a = tl.load(h_base + hk[None, :], mask=row_mask[:, None] & hmask[None, :], other=0.0)
        b = tl.load(w_base + hk[:, None], mask=hmask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.autotune(configs=_FWD_CONFIGS, key=["H", "V"])
@triton.jit
def _lse_forward_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_m_ptr, part_s_ptr, part_u_ptr, part_t_ptr,
                        N, V, H, stride_hn, stride_wv, inv_temp, v_per_split, num_splits,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    # Consecutive programs share a token block (its hidden rows stay in L2) and walk different
    # vocabulary splits; programs with the same split stream the same weight tiles together.
    split = pid % num_splits
    nb = pid // num_splits
    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        x = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                        HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # m is -inf only before the first tile, where s = u = 0: keep the shift finite there.
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        d = x - m_new[:, None]
        e = tl.exp(d)
        ed = e * tl.where(col_mask[None, :], d, 0.0)
        u = alpha * (u + s * shift) + tl.sum(ed, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(part_m_ptr + out, m, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    tl.store(part_u_ptr + out, u, mask=row_mask)
    tl.store(part_t_ptr + out, target, mask=row_mask)


@triton.autotune(configs=_DLOGITS_CONFIGS, key=["H", "V"])
@triton.jit
def _dlogits_chunk_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                          dz_ptr, keep_ptr, N, V, H, v0, chunk, stride_hn, stride_wv, stride_dz, stride_keep,
                          inv_temp, eps,
                          HAS_BIAS: tl.constexpr, HAS_G_ENT: tl.constexpr, FILTER: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                          GROUP_N: tl.constexpr):
    # Grouped tile order (as in Triton's matmul tutorial) for L2 reuse of hidden and weight tiles.
    pid = tl.program_id(0)
    num_nb = tl.cdiv(N, BLOCK_N)
    num_vb = tl.cdiv(chunk, BLOCK_V)
    group = pid // (GROUP_N * num_vb)
    first_nb = group * GROUP_N
    group_size = tl.minimum(num_nb - first_nb, GROUP_N)
    nb = first_nb + (pid % (GROUP_N * num_vb)) % group_size
    vb = (pid % (GROUP_N * num_vb)) // group_size

    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = (v0 + local).to(tl.int64)
    row_mask = rows < N
    col_mask = local < chunk
    x = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                    HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    logp = x - lse[:, None]
    p = tl.exp(tl.minimum(logp, 0.0))
    dx = tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if HAS_G_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
        dx -= g_ent[:, None] * p * (logp + ent[:, None])
    dz = dx * inv_temp
    tile_mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(tile_mask, dz, 0.0)
    if FILTER:
        tile_max = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
        tl.store(keep_ptr + nb * stride_keep + vb, (tile_max >= eps).to(tl.int8))
        # Skipped tiles are never read (both GEMMs and d(bias) visit kept tiles only): don't write them.
        # (broadcast before comparing: the interpreter cannot AND a tile with a 0-d reduction result)
        tile_mask = tile_mask & ((tl.zeros_like(dz) + tile_max) >= eps)
    dz_ptrs = dz_ptr + rows[:, None] * stride_dz + local[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=_GRAD_GEMM_CONFIGS, key=["H", "V"], restore_value=["dh_ptr"])
@triton.jit
def _dhidden_accumulate_kernel(dz_ptr, w_ptr, kept_ptr, count_ptr, dh_ptr, N, V, H, v0, chunk,
                               stride_dz, stride_wv, stride_dh, stride_kept,
                               FILTER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HO: tl.constexpr):
    """dh[rows, hcols] += dz[rows, :chunk] @ weight[v0 : v0 + chunk, hcols] (dh is fp32).

    With FILTER the loop visits only the kept vocabulary tiles of this token block, listed in
    ``kept[nb, :count[nb]]``: an index list (not a branch in the loop) keeps the loads pipelined.
    """
    nb = tl.program_id(0)
    hb = tl.program_id(1)
    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    row_mask = rows < N
    hmask = hcols < H
    acc = tl.zeros((BLOCK_N, BLOCK_HO), dtype=tl.float32)
    offs_v = tl.arange(0, BLOCK_V)
    if FILTER:
        steps = tl.load(count_ptr + nb)
    else:
        steps = tl.cdiv(chunk, BLOCK_V)
    for i in range(0, steps):
        if FILTER:
            vb = tl.load(kept_ptr + nb * stride_kept + i)
        else:
            vb = i
        local = vb * BLOCK_V + offs_v
        vmask = local < chunk
        a = tl.load(dz_ptr + rows[:, None] * stride_dz + local[None, :],
                    mask=row_mask[:, None] & vmask[None, :], other=0.0)
        b = tl.load(w_ptr + (v0 + local.to(tl.int64))[:, None] * stride_wv + hcols[None, :],
                    mask=vmask[:, None] & hmask[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE)
    ptrs = dh_ptr + rows[:, None] * stride_dh + hcols[None, :]
    mask = row_mask[:, None] & hmask[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.autotune(configs=_GRAD_GEMM_CONFIGS, key=["H", "V"])
@triton.jit
def _dweight_chunk_kernel(dz_ptr, h_ptr, kept_ptr, count_ptr, dw_ptr, db_ptr, N, V, H, v0, chunk,
                          stride_dz, stride_hn, stride_dw, stride_kept,
                          HAS_DW: tl.constexpr, HAS_BIAS: tl.constexpr, FILTER: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HO: tl.constexpr):
    """dw[v0 + local, hcols] = dz[:, local].T @ hidden[:, hcols], reduced over all N in fp32 registers.

    Programs with hb == 0 also reduce d(bias)[v0 + local] = sum_n dz[n, local]; with HAS_DW off
    (bias needs a gradient, weight not) the grid has one column of programs and no GEMM runs.
    With FILTER only the kept token tiles of this vocabulary block are visited (``kept[vb, :count[vb]]``).
    """
    vb = tl.program_id(0)
    hb = tl.program_id(1)
    local = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    vmask = local < chunk
    hmask = hcols < H
    acc = tl.zeros((BLOCK_V, BLOCK_HO), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if FILTER:
        steps = tl.load(count_ptr + vb)
    else:
        steps = tl.cdiv(N, BLOCK_N)
    for i in range(0, steps):
        if FILTER:
            nb = tl.load(kept_ptr + vb * stride_kept + i)
        else:
            nb = i
        rows = (nb * BLOCK_N + offs_n).to(tl.int64)
        row_mask = rows < N
        # dz^T tile [BLOCK_V, BLOCK_N], read transposed from the row-major dz chunk.
        a = tl.load(dz_ptr + rows[None, :] * stride_dz + local[:, None],
                    mask=vmask[:, None] & row_mask[None, :], other=0.0)
        if HAS_DW:
            b = tl.load(h_ptr + rows[:, None] * stride_hn + hcols[None, :],
                        mask=row_mask[:, None] & hmask[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, IEEE)
        if HAS_BIAS:
            acc_b += tl.sum(a.to(tl.float32), axis=1)
    out_rows = (v0 + local).to(tl.int64)
    if HAS_DW:
        tl.store(dw_ptr + out_rows[:, None] * stride_dw + hcols[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=vmask[:, None] & hmask[None, :])
    if HAS_BIAS:
        if hb == 0:
            tl.store(db_ptr + out_rows, acc_b, mask=vmask)


# ----------------------------------------------------------------------------------------- launchers
def _dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(UPCAST, IEEE): fp32 operands use exact IEEE dots (TF32 would miss 1e-5 parity)."""
    return INTERPRET, dtype == torch.float32


def _num_splits(n: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(num_splits, v_per_split) so that about two programs per SM are in flight."""
    if INTERPRET:
        sms = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(n, 128)
    splits = max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(vocab, 4 * SPLIT_ALIGN)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(vocab, v_per_split), v_per_split


def lse_forward(hidden, weight, bias, labels, inv_temp):
    """Per-split partials (m, s, u, target) of shape [num_splits, N], all fp32."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    splits, v_per_split = _num_splits(n, vocab, hidden.device)
    parts = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    upcast, ieee = _dot_flags(hidden.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
    _lse_forward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, parts[0], parts[1], parts[2], parts[3],
        n, vocab, h, hidden.stride(0), weight.stride(0), inv_temp, v_per_split, splits,
        HAS_BIAS=bias is not None, UPCAST=upcast, IEEE=ieee)
    return parts


def merge_splits(parts):
    """Combine per-split online-softmax partials into (lse, entropy, target logit x[label])."""
    m, s, u, target = parts[0], parts[1], parts[2], parts[3]
    m_all = m.max(dim=0).values
    live = s > 0
    shift = torch.where(live, m - m_all, torch.zeros_like(m))
    scale = torch.where(live, shift.exp(), torch.zeros_like(m))
    s_all = (scale * s).sum(0)
    u_all = (scale * (u + s * shift)).sum(0)
    log_s = s_all.log()
    return m_all + log_s, log_s - u_all / s_all, target.sum(0)


def dlogits_chunk(hidden, weight, bias, labels, lse, entropy, g_logp, g_ent, v0, chunk, dz, keep, inv_temp, eps):
    n, h = hidden.shape
    vocab = weight.shape[0]
    upcast, ieee = _dot_flags(hidden.dtype)
    grid = (triton.cdiv(n, FLAG_BLOCK_N) * triton.cdiv(chunk, FLAG_BLOCK_V),)
    _dlogits_chunk_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, lse, entropy, g_logp,
        g_ent if g_ent is not None else g_logp, dz, keep, n, vocab, h, v0, chunk,
        hidden.stride(0), weight.stride(0), dz.stride(0), keep.stride(0), inv_temp, eps,
        HAS_BIAS=bias is not None, HAS_G_ENT=g_ent is not None, FILTER=eps > 0, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=FLAG_BLOCK_N, BLOCK_V=FLAG_BLOCK_V)


def kept_tiles(keep):
    """Index lists of kept tiles from the [token blocks, vocab blocks] flags, kept ones first.

    Returns (by_token_block, count_per_token_block, by_vocab_block, count_per_vocab_block), int32.
    """
    dropped = keep == 0
    by_nb = torch.argsort(dropped.to(torch.int8), dim=1, stable=True).to(torch.int32)
    by_vb = torch.argsort(dropped.t().to(torch.int8), dim=1, stable=True).to(torch.int32)
    kept = keep != 0
    return (by_nb.contiguous(), kept.sum(1, dtype=torch.int32), by_vb.contiguous(),
            kept.sum(0, dtype=torch.int32))


def dhidden_accumulate(dz, weight, kept, count, dh, v0, chunk, filtered):
    """dh[:, :] += dz[:, :chunk] @ weight[v0 : v0 + chunk] (fp32 dh); with ``filtered`` only kept tiles."""
    n, h = dh.shape
    upcast, ieee = _dot_flags(dz.dtype)
    grid = lambda meta: (triton.cdiv(n, FLAG_BLOCK_N), triton.cdiv(h, meta["BLOCK_HO"]))
    _dhidden_accumulate_kernel[grid](
        dz, weight, kept, count, dh, n, weight.shape[0], h, v0, chunk, dz.stride(0), weight.stride(0), dh.stride(0),
        kept.stride(0), FILTER=filtered, UPCAST=upcast, IEEE=ieee, BLOCK_N=FLAG_BLOCK_N, BLOCK_V=FLAG_BLOCK_V)


def dweight_chunk(dz, hidden, kept, count, dw, db, vocab, v0, chunk, filtered):
    """dw[v0 : v0 + chunk] = dz^T @ hidden (dw may be None) and db[v0 : v0 + chunk] = sum_n dz (db may be None)."""
    n, h = hidden.shape
    upcast, ieee = _dot_flags(dz.dtype)
    has_dw = dw is not None
    grid = lambda meta: (triton.cdiv(chunk, FLAG_BLOCK_V), triton.cdiv(h, meta["BLOCK_HO"]) if has_dw else 1)
    _dweight_chunk_kernel[grid](
        dz, hidden, kept, count, dw if has_dw else dz, db if db is not None else dz, n, vocab, h, v0, chunk,
        dz.stride(0), hidden.stride(0), dw.stride(0) if has_dw else 0, kept.stride(0),
        HAS_DW=has_dw, HAS_BIAS=db is not None, FILTER=filtered, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=FLAG_BLOCK_N, BLOCK_V=FLAG_BLOCK_V)
