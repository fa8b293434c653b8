"""Triton kernels for token_logprobs: log_softmax((hidden @ weight.T + bias) / T)[label], never N x V.

Forward (``lse_forward``): programs own (token block, vocabulary split) pairs and stream their split
in ``BLOCK_V`` tiles; each tile of logits is a ``tl.dot`` K-loop over H, folded into an online
log-sum-exp (running max ``m``, ``s = sum e^(x-m)``, ``u = sum e^(x-m) (x-m)``) together with the
label's logit. The split count comes from the SM count (``_num_splits``: the fewest splits whose
programs fill >= 90 % of their last wave), so N = 8192 on 132 SMs runs 2 splits x 64 token blocks
= 128 programs in one wave instead of 5 splits in 2.4 waves; the per-split partials are
O(splits x N) and merged in ``merge_splits``. Only lse and entropy per row survive the forward.

Backward, one vocabulary chunk ``[v0, v0 + Vc)`` at a time (Vc from the memory budget):
  1. ``dlogits_chunk`` recomputes the logit tiles (the one extra GEMM) and writes
     dz = d(loss)/d(logits) for the chunk, ``[N, Vc]`` in the compute dtype, and one "keep" flag
     per (FLAG_BLOCK_N x FLAG_BLOCK_V) tile when filtering.
  2. d(hidden) += dz @ W[chunk] into an fp32 buffer, and
  3. d(weight)[chunk] = dz^T @ hidden (fp32 accumulation, one cast), d(bias)[chunk] = sum_n dz,
  each either by cuBLAS on the staged chunk or by the Triton kernels below (``grad_gemm_impl``:
  ``FASTALIGN_GRAD_GEMM=auto|cublas|triton``; auto = cuBLAS unless filtering, which only the
  Triton kernels can exploit). The Triton gradient GEMMs run on grouped (swizzled) 1-D grids: the
  programs in flight share GROUP token (resp. vocabulary) blocks and sweep the H blocks, so a
  staged dz tile is read from HBM about once and re-read from L2, instead of once per H block
  (16-32x at H = 4096 on a plain 2-D grid). Their reduction step BLOCK_K is a config of its own,
  a divisor of the flag tile, so the filter's granularity does not dictate the GEMM's pipeline.
Why stage dz per vocabulary chunk instead of atomics or per-block ownership: a program that owned
dW[v-block, :] would need a [BLOCK_V, H] fp32 accumulator (2 MB at H = 4096), and atomics on dW
need a V x H fp32 buffer (2.5 GB at V = 152k, H = 4096) to keep fp32 accumulation, breaking the
memory bound. Staging dz for one chunk costs N x Vc elements (bounded by the budget), keeps the
backward at 3 GEMMs (4 in all with the forward), and lets both Triton gradient GEMMs skip tiles.

Gradient filtering (``eps > 0``, in the style of Cut Cross-Entropy) tests the *unscaled* softmax
gradient, before the upstream gradient and 1/T multiply it: u = |onehot - p| for the log-prob and,
when an entropy gradient flows, also |p (log p + H)|. A (token block, vocab block) tile whose every
u < eps is skipped by both gradient GEMMs and by d(bias). (Testing the scaled dz instead drops every
tile of a mean loss over 8192 tokens: the upstream gradient 1/8192 is already below 2^-12.) With
G_n = |g_logp[n]| + |g_entropy[n]| a skipped element has |dz[n, v]| < eps G_n / T, so for every
row n and column h:
    |error in dH[n, h]| <= (eps / T) G_n (#skipped elements of row n) max_v |W[v, h]|
    |error in dW[v, h]| <= (eps / T) sum_{n skipped in column v} G_n |hidden[n, h]|
    |error in db[v]|    <= (eps / T) sum_{n skipped in column v} G_n
and for the log-prob term alone the skipped elements of a row carry at most the probability mass
they hold (sum of p <= 1), whatever V is. eps = 0 keeps every tile: exact. A filtered backward
walks the vocabulary sorted by average logit (``vocab_order``, as Cut Cross-Entropy does): in
vocabulary order nearly every 128 x 128 tile of a real model holds some likely token and nothing
could be skipped; sorted, the likely tokens share a few tiles. The kernels read the weight rows and
write the d(weight) rows through the order, so nothing is permuted in memory. Filtering stays off
by default: no GPU measurement has shown it paying yet.

Labels outside [0, V) (that are not ignore_index, which the launcher drops) are never used as an
address: the label's logit is found by comparing column indices. Such a row gets a NaN log-prob
(its entropy is still computed) and contributes no gradient, so skipping the value checks
(``FASTALIGN_CHECK_VALUES=0``) cannot make a kernel read out of bounds.

Under ``TRITON_INTERPRET=1`` (CPU tensors) every kernel runs one small fixed configuration and
upcasts dot operands to fp32 (the interpreter's bf16 ``tl.dot`` is wrong); on a GPU block sizes are
autotuned per (H, V, dtypes), configs that cannot fit the device's shared memory are pruned before
anything compiles, results are cached on disk, and ``FASTALIGN_AUTOTUNE=0`` runs the first
fitting config of each list (see ``launch.py``). bf16/fp16 operands feed the tensor cores with
fp32 accumulators.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device, prune_by_shared_memory, shared_memory_limit

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile shape of dz shared by the dlogits kernel, the keep flags and both Triton gradient GEMMs: the
# GEMMs skip whole flag tiles, so their token (dH) / vocabulary (dW) output blocks equal these, and
# their reduction step BLOCK_K divides them.
FLAG_BLOCK_N = 16 if INTERPRET else 128
FLAG_BLOCK_V = 32 if INTERPRET else 128
# Vocabulary splits of the forward are multiples of this (a multiple of every BLOCK_V tried).
SPLIT_ALIGN = 32 if INTERPRET else 256
# The forward's split count aims at programs that fill at least this fraction of their last wave.
MIN_WAVE_FILL = 0.9


def _itemsize(named_args, name):
    return named_args[name].element_size()


def _pruner(smem_per_stage, tensor_arg):
    """early_config_prune for triton.autotune: drop configs whose pipelined tiles overflow shared memory."""

    def prune(configs, named_args, **kwargs):
        t = named_args[tensor_arg]
        limit = shared_memory_limit(t.device.index if t.device.index is not None else torch.cuda.current_device())
        item = t.element_size()
        return prune_by_shared_memory(configs, lambda c: c.num_stages * smem_per_stage(c.kwargs) * item, limit)

    return {"early_config_prune": prune}


def _configs(gpu_configs, interpret_config):
    """The first GPU config is the known-good default (FASTALIGN_AUTOTUNE=0 runs it alone)."""
    if INTERPRET:
        return [triton.Config(interpret_config, num_warps=1, num_stages=1)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in gpu_configs]


# Register spills as ptxas reports them for sm_90a (tests/triton_offline_compile.py --all-configs,
# Triton 3.9's ptxas 13.4, bf16): 128 x 256 / 256 x 128 logit tiles and the 4-warp variants of the
# logit kernels spill 1.6-4 KB per thread and are not offered; the configs below spill <= 0.6 KB
# (the masked loads' predicates), which the GPU run has to weigh by time.
_FWD_CONFIGS = _configs(
    [({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, 8, 4),
     ({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, 8, 3),
     ({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32}, 8, 5),
     ({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, 8, 4)],
    {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16})

_DLOGITS_CONFIGS = _configs(
    [({"BLOCK_H": 64, "GROUP_N": 8}, 8, 4),
     ({"BLOCK_H": 64, "GROUP_N": 8}, 8, 3),
     ({"BLOCK_H": 32, "GROUP_N": 8}, 8, 5)],
    {"BLOCK_H": 16, "GROUP_N": 2})

# The Triton gradient GEMMs: BLOCK_HO tiles the output's H dimension, BLOCK_K is the reduction step
# (a divisor of the flag tile), GROUP the number of token/vocabulary blocks that share the L2.
# 256-wide output tiles spill 1.0-1.7 KB in d(hidden) (0.6 KB in d(weight)): d(weight) only.
_DH_CONFIGS = _configs(
    [({"BLOCK_HO": 128, "BLOCK_K": 64, "GROUP": 8}, 8, 4),
     ({"BLOCK_HO": 128, "BLOCK_K": 128, "GROUP": 8}, 8, 3),
     ({"BLOCK_HO": 64, "BLOCK_K": 64, "GROUP": 16}, 4, 4)],
    {"BLOCK_HO": 16, "BLOCK_K": 8, "GROUP": 2})
_DW_CONFIGS = _configs(
    [({"BLOCK_HO": 128, "BLOCK_K": 64, "GROUP": 8}, 8, 4),
     ({"BLOCK_HO": 128, "BLOCK_K": 128, "GROUP": 8}, 8, 3),
     ({"BLOCK_HO": 256, "BLOCK_K": 64, "GROUP": 8}, 8, 3),
     ({"BLOCK_HO": 64, "BLOCK_K": 64, "GROUP": 16}, 4, 4)],
    {"BLOCK_HO": 16, "BLOCK_K": 8, "GROUP": 2})

# Shared memory per pipeline stage, in elements (x the operand's item size): the two operand tiles.
_FWD_PRUNE = _pruner(lambda k: (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_H"], "h_ptr")
_DLOGITS_PRUNE = _pruner(lambda k: (FLAG_BLOCK_N + FLAG_BLOCK_V) * k["BLOCK_H"], "h_ptr")
_DH_PRUNE = _pruner(lambda k: (FLAG_BLOCK_N + k["BLOCK_HO"]) * k["BLOCK_K"], "dz_ptr")
_DW_PRUNE = _pruner(lambda k: (FLAG_BLOCK_V + k["BLOCK_HO"]) * k["BLOCK_K"], "dz_ptr")


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _grouped(pid, num_outer, num_inner, GROUP: tl.constexpr):
    """(outer, inner) block of program ``pid`` in groups of GROUP outer blocks (Triton's matmul swizzle).

    Consecutive programs step through the outer blocks of one group first, then the inner ones, so
    the programs in flight share a few outer blocks' operand rows (reused from L2).
    """
    per_group = GROUP * num_inner
    first = (pid // per_group) * GROUP
    size = tl.minimum(num_outer - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _vocab_ids(order_ptr, v0, local, mask, SORTED: tl.constexpr):
    """Vocabulary ids of the chunk positions ``v0 + local``: entries of the sorted order, or the positions."""
    if SORTED:
        return tl.load(order_ptr + v0 + local, mask=mask, other=0).to(tl.int64)
    return (v0 + local).to(tl.int64)


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


@triton.autotune(configs=_FWD_CONFIGS, key=["H", "V"], prune_configs_by=_FWD_PRUNE, cache_results=True)
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
    # A label outside [0, V) matched no column: its log-prob is undefined, say so with NaN.
    target = tl.where((labels >= 0) & (labels < V), target, float("nan"))
    out = split * N + rows
    tl.store(part_m_ptr + out, m, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    tl.store(part_u_ptr + out, u, mask=row_mask)
    tl.store(part_t_ptr + out, target, mask=row_mask)


@triton.autotune(configs=_DLOGITS_CONFIGS, key=["H", "V", "HAS_G_ENT", "FILTER", "SORTED"],
                 prune_configs_by=_DLOGITS_PRUNE, cache_results=True)
@triton.jit
def _dlogits_chunk_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
                          dz_ptr, keep_ptr, order_ptr, N, V, H, v0, chunk, stride_hn, stride_wv, stride_dz,
                          stride_keep, inv_temp, eps,
                          HAS_BIAS: tl.constexpr, HAS_G_ENT: tl.constexpr, FILTER: tl.constexpr,
                          SORTED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                          GROUP_N: tl.constexpr):
    # Grouped tile order (as in Triton's matmul tutorial) for L2 reuse of hidden and weight tiles.
    nb, vb = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(chunk, BLOCK_V), GROUP_N)
    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    local = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = local < chunk
    cols = _vocab_ids(order_ptr, v0, local, col_mask, SORTED)
    x = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                    HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    # A row whose label is outside [0, V) has a NaN log-prob and gets no gradient at all.
    label_ok = (labels >= 0) & (labels < V)
    g_logp = tl.where(label_ok, tl.load(g_logp_ptr + rows, mask=row_mask, other=0.0), 0.0)
    logp = x - lse[:, None]
    p = tl.exp(tl.minimum(logp, 0.0))
    # Unscaled gradients of the log-prob and the entropy w.r.t. x: the filter tests these.
    d_logp = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - p
    dx = g_logp[:, None] * d_logp
    magnitude = tl.abs(d_logp)
    if HAS_G_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.where(label_ok, tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0), 0.0)
        d_ent = -p * (logp + ent[:, None])
        dx += g_ent[:, None] * d_ent
        magnitude = tl.maximum(magnitude, tl.abs(d_ent))
    dz = dx * inv_temp
    tile_mask = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(tile_mask, dz, 0.0)
    if FILTER:
        tile_max = tl.max(tl.max(tl.where(tile_mask, magnitude, 0.0), axis=1), axis=0)
        tl.store(keep_ptr + nb.to(tl.int64) * stride_keep + vb, (tile_max >= eps).to(tl.int8))
        # Skipped tiles are never read (both GEMMs and d(bias) visit kept tiles only): don't write them.
        # (broadcast before comparing: the interpreter cannot AND a tile with a 0-d reduction result)
        tile_mask = tile_mask & ((tl.zeros_like(dz) + tile_max) >= eps)
    dz_ptrs = dz_ptr + rows[:, None] * stride_dz + local[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=_DH_CONFIGS, key=["H", "V", "FILTER", "SORTED"], restore_value=["dh_ptr"],
                 prune_configs_by=_DH_PRUNE, cache_results=True)
@triton.jit
def _dhidden_accumulate_kernel(dz_ptr, w_ptr, kept_ptr, count_ptr, order_ptr, dh_ptr, N, V, H, v0, chunk,
                               stride_dz, stride_wv, stride_dh, stride_kept,
                               FILTER: tl.constexpr, SORTED: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HO: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """dh[rows, hcols] += dz[rows, :chunk] @ weight[v0 : v0 + chunk, hcols] (dh is fp32).

    With FILTER the loop visits only the kept vocabulary tiles of this token block, listed in
    ``kept[nb, :count[nb]]``: an index list (not a branch in the loop) keeps the loads pipelined.
    Each flag tile is reduced in BLOCK_V / BLOCK_K steps of one flat loop.
    """
    nb, hb = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(H, BLOCK_HO), GROUP)
    rows = (nb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    row_mask = rows < N
    hmask = hcols < H
    acc = tl.zeros((BLOCK_N, BLOCK_HO), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    SUB = BLOCK_V // BLOCK_K  # constexpr: flag tile / reduction step
    if FILTER:
        tiles = tl.load(count_ptr + nb)
    else:
        tiles = tl.cdiv(chunk, BLOCK_V)
    for i in range(0, tiles * SUB):
        if FILTER:
            vb = tl.load(kept_ptr + nb.to(tl.int64) * stride_kept + i // SUB)
        else:
            vb = i // SUB
        local = vb * BLOCK_V + (i % SUB) * BLOCK_K + offs_k
        vmask = local < chunk
        a = tl.load(dz_ptr + rows[:, None] * stride_dz + local[None, :],
                    mask=row_mask[:, None] & vmask[None, :], other=0.0)
        vocab_ids = _vocab_ids(order_ptr, v0, local, vmask, SORTED)
        b = tl.load(w_ptr + vocab_ids[:, None] * stride_wv + hcols[None, :],
                    mask=vmask[:, None] & hmask[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE)
    ptrs = dh_ptr + rows[:, None] * stride_dh + hcols[None, :]
    mask = row_mask[:, None] & hmask[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.autotune(configs=_DW_CONFIGS, key=["H", "V", "FILTER", "SORTED", "HAS_DW"], prune_configs_by=_DW_PRUNE,
                 cache_results=True)
@triton.jit
def _dweight_chunk_kernel(dz_ptr, h_ptr, kept_ptr, count_ptr, order_ptr, dw_ptr, db_ptr, N, V, H, v0, chunk,
                          stride_dz, stride_hn, stride_dw, stride_kept,
                          HAS_DW: tl.constexpr, HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, SORTED: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_HO: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """dw[v0 + local, hcols] = dz[:, local].T @ hidden[:, hcols], reduced over all N in fp32 registers.

    Programs with hb == 0 also reduce d(bias)[v0 + local] = sum_n dz[n, local]; with HAS_DW off
    (bias needs a gradient, weight not) there is one H block per vocabulary block and no GEMM runs.
    With FILTER only the kept token tiles of this vocabulary block are visited (``kept[vb, :count[vb]]``).
    """
    if HAS_DW:
        num_hb = tl.cdiv(H, BLOCK_HO)
    else:
        num_hb = 1
    vb, hb = _grouped(tl.program_id(0), tl.cdiv(chunk, BLOCK_V), num_hb, GROUP)
    local = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    hcols = hb * BLOCK_HO + tl.arange(0, BLOCK_HO)
    vmask = local < chunk
    hmask = hcols < H
    acc = tl.zeros((BLOCK_V, BLOCK_HO), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    SUB = BLOCK_N // BLOCK_K  # constexpr: flag tile / reduction step
    if FILTER:
        tiles = tl.load(count_ptr + vb)
    else:
        tiles = tl.cdiv(N, BLOCK_N)
    for i in range(0, tiles * SUB):
        if FILTER:
            nb = tl.load(kept_ptr + vb.to(tl.int64) * stride_kept + i // SUB)
        else:
            nb = i // SUB
        rows = (nb * BLOCK_N + (i % SUB) * BLOCK_K + offs_k).to(tl.int64)
        row_mask = rows < N
        # dz^T tile [BLOCK_V, BLOCK_K], read transposed from the row-major dz chunk.
        a = tl.load(dz_ptr + rows[None, :] * stride_dz + local[:, None],
                    mask=vmask[:, None] & row_mask[None, :], other=0.0)
        if HAS_DW:
            b = tl.load(h_ptr + rows[:, None] * stride_hn + hcols[None, :],
                        mask=row_mask[:, None] & hmask[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST, IEEE)
        if HAS_BIAS:
            acc_b += tl.sum(a.to(tl.float32), axis=1)
    out_rows = _vocab_ids(order_ptr, v0, local, vmask, SORTED)
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


def _sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n: int, vocab: int, sms: int, block_n: int = 128) -> tuple[int, int]:
    """(num_splits, v_per_split) of the forward for N tokens on ``sms`` SMs.

    Each program (a token block x a vocabulary split) is long and holds one SM, so the last wave
    of ``row_blocks x splits`` programs is what idles: take the fewest splits whose programs fill
    at least MIN_WAVE_FILL of their last wave (fewer splits = longer programs, fewer partials),
    else the best fill. A split holds at least 4 x SPLIT_ALIGN vocabulary entries.
    """
    row_blocks = triton.cdiv(n, block_n)
    max_splits = max(1, triton.cdiv(vocab, 4 * SPLIT_ALIGN))
    best = None
    for want in range(1, min(max_splits, 64) + 1):
        v_per_split = triton.cdiv(triton.cdiv(vocab, want), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = triton.cdiv(vocab, v_per_split)
        programs = row_blocks * splits
        fill = programs / (triton.cdiv(programs, sms) * sms)
        if best is None or fill > best[0] + 1e-9:
            best = (fill, splits, v_per_split)
        if fill >= MIN_WAVE_FILL:
            return splits, v_per_split
    return best[1], best[2]


@on_tensor_device
def lse_forward(hidden, weight, bias, labels, inv_temp):
    """Per-split partials (m, s, u, target) of shape [num_splits, N], all fp32."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    # 128 = the token block of the default configs (a 64-row config just doubles the programs).
    splits, v_per_split = split_count(n, vocab, _sm_count(hidden.device), 16 if INTERPRET else 128)
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


@on_tensor_device
def dlogits_chunk(hidden, weight, bias, labels, lse, entropy, g_logp, g_ent, v0, chunk, dz, keep, inv_temp, eps,
                  order=None):
    """dz for chunk positions [v0, v0 + chunk) (vocabulary ids ``order[v0:v0 + chunk]`` when sorted) and keep flags."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    upcast, ieee = _dot_flags(hidden.dtype)
    grid = (triton.cdiv(n, FLAG_BLOCK_N) * triton.cdiv(chunk, FLAG_BLOCK_V),)
    _dlogits_chunk_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, lse, entropy, g_logp,
        g_ent if g_ent is not None else g_logp, dz, keep, order if order is not None else keep, n, vocab, h, v0, chunk,
        hidden.stride(0), weight.stride(0), dz.stride(0), keep.stride(0), inv_temp, eps,
        HAS_BIAS=bias is not None, HAS_G_ENT=g_ent is not None, FILTER=eps > 0, SORTED=order is not None,
        UPCAST=upcast, IEEE=ieee,
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


def vocab_order(hidden, weight, bias, filtered: bool):
    """The vocabulary sorted by average logit, descending (int32), when filtering; else None.

    Filtering skips a tile only if all its entries have a small softmax gradient; in vocabulary
    order nearly every 128 x 128 tile holds some likely token, so Cut Cross-Entropy sorts the
    vocabulary by average logit first and the likely tokens share a few tiles. The average logit
    over the tokens is linear in the hidden states, mean_n(h_n . w_v + b_v) = mean(h) . w_v + b_v:
    one GEMV (2 V H flops), so it is computed here rather than accumulated by the forward kernel.
    ``FASTALIGN_FILTER_SORT=0`` filters in vocabulary order (to measure what sorting buys).
    """
    if not filtered or os.environ.get("FASTALIGN_FILTER_SORT", "1") == "0":
        return None
    mean_hidden = hidden.float().mean(0).to(weight.dtype)
    avg = (weight @ mean_hidden).float()
    if bias is not None:
        avg = avg + bias.float()
    return torch.argsort(avg, descending=True, stable=True).to(torch.int32)


GRAD_GEMM_IMPLS = ("auto", "cublas", "triton")


def grad_gemm_impl(filtered: bool) -> str:
    """Which GEMMs compute d(hidden)/d(weight) from the staged chunk: "cublas" or "triton".

    ``FASTALIGN_GRAD_GEMM=auto`` (default): cuBLAS on the dense chunk, the Triton kernels when
    filtering (cuBLAS cannot skip tiles). Forcing "cublas" with filtering is an error.
    """
    choice = os.environ.get("FASTALIGN_GRAD_GEMM", "auto")
    if choice not in GRAD_GEMM_IMPLS:
        raise ValueError(f"FASTALIGN_GRAD_GEMM must be one of {GRAD_GEMM_IMPLS}, got {choice!r}")
    if choice == "auto":
        return "triton" if filtered else "cublas"
    if choice == "cublas" and filtered:
        raise ValueError("FASTALIGN_GRAD_GEMM=cublas cannot skip filtered tiles: use grad_filter_eps=0 or "
                         "FASTALIGN_GRAD_GEMM=triton/auto")
    return choice


@functools.cache
def _fp32_accumulate_mode(device_type: str) -> str:
    """How this torch adds a bf16 product into an fp32 buffer, found once per device type.

    "addmm": ``torch.addmm(out, a, b, out_dtype=float32, out=out)`` in place (no temporary);
    "mm": ``out += torch.mm(a, b, out_dtype=float32)`` (an [N, H] fp32 temporary);
    "upcast": neither exists (CPU torch): fp32 copies of the operands (the dry run and tests only).
    Each candidate is checked for the right answer on a tiny product, not just for running.
    """
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device_type).to(torch.bfloat16)
    want = torch.tensor([[8.0, 12.0], [16.0, 24.0]], device=device_type)  # 1 + a @ a
    try:
        out = torch.ones((2, 2), device=device_type)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        if torch.equal(out, want):
            return "addmm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        out = torch.ones((2, 2), device=device_type)
        out += torch.mm(a, a, out_dtype=torch.float32)
        if torch.equal(out, want):
            return "mm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return "upcast"


def _accumulate_fp32(out32, a, b):
    """out32 += a @ b with fp32 accumulation (cuBLAS), without fp32 copies of a, b where torch allows."""
    if a.dtype == torch.float32:
        out32.addmm_(a, b)
        return
    mode = _fp32_accumulate_mode(a.device.type)
    if mode == "addmm":
        torch.addmm(out32, a, b, out_dtype=torch.float32, out=out32)
    elif mode == "mm":
        out32 += torch.mm(a, b, out_dtype=torch.float32)
    else:
        out32.addmm_(a.float(), b.float())


@on_tensor_device
def dhidden_accumulate(dz, weight, kept, count, dh, v0, chunk, filtered, order=None):
    """dh[:, :] += dz[:, :chunk] @ weight[v0 : v0 + chunk] (fp32 dh); with ``filtered`` only kept tiles.

    With ``order`` the chunk's positions are the vocabulary ids ``order[v0 : v0 + chunk]``.
    """
    n, h = dh.shape
    if grad_gemm_impl(filtered) == "cublas":
        if order is not None:
            raise ValueError("a sorted vocabulary is for the filtered Triton gradient GEMMs only")
        _accumulate_fp32(dh, dz[:, :chunk], weight[v0:v0 + chunk])
        return
    upcast, ieee = _dot_flags(dz.dtype)
    grid = lambda meta: (triton.cdiv(n, FLAG_BLOCK_N) * triton.cdiv(h, meta["BLOCK_HO"]),)
    _dhidden_accumulate_kernel[grid](
        dz, weight, kept, count, order if order is not None else kept, dh, n, weight.shape[0], h, v0, chunk,
        dz.stride(0), weight.stride(0), dh.stride(0), kept.stride(0), FILTER=filtered, SORTED=order is not None,
        UPCAST=upcast, IEEE=ieee, BLOCK_N=FLAG_BLOCK_N, BLOCK_V=FLAG_BLOCK_V)


@on_tensor_device
def dweight_chunk(dz, hidden, kept, count, dw, db, vocab, v0, chunk, filtered, order=None):
    """dw[v0 : v0 + chunk] = dz^T @ hidden (dw may be None) and db[v0 : v0 + chunk] = sum_n dz (db may be None).

    With ``order`` the rows written are the vocabulary ids ``order[v0 : v0 + chunk]``.
    """
    n, h = hidden.shape
    if grad_gemm_impl(filtered) == "cublas":
        if order is not None:
            raise ValueError("a sorted vocabulary is for the filtered Triton gradient GEMMs only")
        dz_c = dz[:, :chunk]
        if dw is not None:
            # cuBLAS accumulates in fp32 and rounds once into the weight's dtype.
            torch.mm(dz_c.t(), hidden, out=dw[v0:v0 + chunk])
        if db is not None:
            db[v0:v0 + chunk] = dz_c.sum(0, dtype=torch.float32)
        return
    upcast, ieee = _dot_flags(dz.dtype)
    has_dw = dw is not None
    grid = lambda meta: (triton.cdiv(chunk, FLAG_BLOCK_V) * (triton.cdiv(h, meta["BLOCK_HO"]) if has_dw else 1),)
    _dweight_chunk_kernel[grid](
        dz, hidden, kept, count, order if order is not None else kept, dw if has_dw else dz,
        db if db is not None else dz, n, vocab, h, v0, chunk,
        dz.stride(0), hidden.stride(0), dw.stride(0) if has_dw else 0, kept.stride(0),
        HAS_DW=has_dw, HAS_BIAS=db is not None, FILTER=filtered, SORTED=order is not None, UPCAST=upcast, IEEE=ieee,
        BLOCK_N=FLAG_BLOCK_N, BLOCK_V=FLAG_BLOCK_V)
