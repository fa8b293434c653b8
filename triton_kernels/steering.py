"""Triton row kernel of steer_logits: one program per row (fastalign/ops/reference/steering.py is the spec).

    z = v + alpha * (v - b) - sum_k beta_k * (n_k - b);  out = z / T, -inf outside the top-p set

The top-p set is sort-free, as in csrc/common/steering_row.h: with e_j = exp(v_j / T - max) and
s = sum e_j, keep {j : e_j >= t} for the largest t with

    P(t) = mass{e >= t} >= top_p * s  and  count{e >= t} >= min_keep

which is the probability of the last token the set needs; tokens tied with it are kept (the
reference's tie rule). t is searched on its float bit pattern (for non-negative floats the bit
order is the numeric order): each round tests NUM_CAND evenly spaced candidates in one pass of
block reductions over the row, shrinking the interval [lo, hi] (P(lo) holds; lo = 0 keeps every
token) about NUM_CAND-fold, so ~8 rounds pin t exactly to one of the e_j. e_j is recomputed from
the logits in every pass, identically, so the final comparison e_j >= t is exact.

Divisions by T are correctly rounded (``div_rn``), so alpha = 0 with no negatives and top_p = 1
returns exactly v / T, like the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device

ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0f, the largest e_j (the max token's exp(0))


@triton.jit
def _value_exp(v_row, cols, V, temperature, m):
    x = tl.load(v_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    # Columns past V load -inf, so their e is 0 and never reaches a candidate t > 0.
    return tl.exp(tl.math.div_rn(x, temperature) - m)


@triton.jit
def _steer_kernel(value_ptr, base_ptr, neg_ptr, betas_ptr, out_ptr, V, K, stride_v, stride_b, stride_nk, stride_nb,
                  stride_o, alpha, temperature, top_p, min_keep, MASKED: tl.constexpr, BLOCK_V: tl.constexpr,
                  SEARCH_BLOCK: tl.constexpr, NUM_CAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    v_row = value_ptr + row * stride_v
    b_row = base_ptr + row * stride_b
    n_row = neg_ptr + row * stride_nb
    o_row = out_ptr + row * stride_o
    offs = tl.arange(0, BLOCK_V)
    m = 0.0
    threshold = 0.0
    if MASKED:
        vmax = float("-inf")
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(v_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            vmax = tl.maximum(vmax, tl.max(x, axis=0))
        m = tl.math.div_rn(vmax, temperature)  # max(v) / T == max(v / T): T > 0
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            s += tl.sum(_value_exp(v_row, v0 + offs, V, temperature, m), axis=0)
        target = top_p * s
        search_offs = tl.arange(0, SEARCH_BLOCK)
        cand_idx = tl.arange(0, NUM_CAND)
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], ONE_BITS, tl.int32)
        while lo < hi:
            step = (hi - lo + NUM_CAND - 1) // NUM_CAND
            cand = lo + (cand_idx + 1) * step
            t = cand.to(tl.float32, bitcast=True)
            mass = tl.zeros([NUM_CAND], dtype=tl.float32)
            count = tl.zeros([NUM_CAND], dtype=tl.int32)
            for v0 in range(0, V, SEARCH_BLOCK):
                e = _value_exp(v_row, v0 + search_offs, V, temperature, m)
                reached = e[None, :] >= t[:, None]
                mass += tl.sum(tl.where(reached, e[None, :], 0.0), axis=1)
                count += tl.sum(reached.to(tl.int32), axis=1)
            holds = (mass >= target) & (count >= min_keep) & (cand <= hi)
            # P only gets harder as t grows, so the candidates that hold are a prefix.
            new_lo = lo + tl.sum(holds.to(tl.int32), axis=0) * step
            hi = tl.minimum(hi, new_lo + step - 1)
            lo = new_lo
        threshold = lo.to(tl.float32, bitcast=True)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        zv = tl.load(v_row + cols, mask=mask, other=0.0).to(tl.float32)
        zb = tl.load(b_row + cols, mask=mask, other=0.0).to(tl.float32)
        z = zv + alpha * (zv - zb)
        # Step a pointer through the K negatives: k * stride_nk in the loop's int32 would wrap past
        # 2^31 elements (K x B x V), a 64-bit pointer plus one stride never does.
        n_k = n_row
        for k in range(0, K):
            beta = tl.load(betas_ptr + k)
            zn = tl.load(n_k + cols, mask=mask, other=0.0).to(tl.float32)
            z = z - beta * (zn - zb)
            n_k += stride_nk
        z = tl.math.div_rn(z, temperature)
        if MASKED:
            e = _value_exp(v_row, cols, V, temperature, m)
            z = tl.where(e >= threshold, z, float("-inf"))
        tl.store(o_row + cols, z, mask=mask)


@on_tensor_device
def steer_logits(value: torch.Tensor, base: torch.Tensor, negatives: torch.Tensor | None, betas: torch.Tensor,
                 alpha: float, temperature: float, top_p: float, min_keep: int) -> torch.Tensor:
    """float32 [B, V] steered logits. Inputs share one dtype; columns must be contiguous (stride 1)."""
    batch, vocab = value.shape
    out = torch.empty((batch, vocab), dtype=torch.float32, device=value.device)
    if batch == 0:
        return out
    num_neg = 0 if negatives is None else negatives.shape[0]
    neg = negatives if num_neg else value  # never read when K = 0
    stride_nk, stride_nb = (negatives.stride(0), negatives.stride(1)) if num_neg else (0, 0)
    block = min(4096, triton.next_power_of_2(vocab))
    _steer_kernel[(batch,)](
        value, base, neg, betas, out, vocab, num_neg, value.stride(0), base.stride(0), stride_nk, stride_nb,
        out.stride(0), alpha, temperature, top_p, min(min_keep, vocab), MASKED=top_p < 1.0, BLOCK_V=block,
        SEARCH_BLOCK=min(512, block), NUM_CAND=16, num_warps=8 if block >= 2048 else 4)
    return out
