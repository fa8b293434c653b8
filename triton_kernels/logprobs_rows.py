"""Triton row kernels for logprobs_from_logits: one program per row, one pass over the vocabulary.

Forward: online softmax over ``BLOCK_V`` tiles of the row (running max ``m``, ``s = sum e^(x-m)``,
``u = sum e^(x-m) (x-m)``), x = z / T; lse = m + log s, entropy = log s - u / s, logp = x[label] - lse.
Backward: dz_j = (g_logp (1[j = label] - p_j) - g_ent p_j (logp_j + entropy)) / T, written into
``grad`` which may be the logits buffer itself (each tile is read before it is overwritten).
Rows whose label is ``ignore_index`` get logp = entropy = 0 and a zero gradient.

These kernels are memory bound, so they are not autotuned: a fixed tile of up to 4096 columns
(8 warps) saturates bandwidth, and autotuning the in-place backward would re-run it on a buffer it
has already overwritten.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _row_forward_kernel(z_ptr, labels_ptr, logp_ptr, ent_ptr, lse_ptr, V, stride_z, inv_temp, ignore_index,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    u = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.exp(shift)
        d = x - m_new
        e = tl.exp(d)
        u = alpha * (u + s * shift) + tl.sum(e * tl.where(mask, d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # A label outside [0, V) is never an address (FASTALIGN_CHECK_VALUES=0 lets one through): NaN log-prob.
    inside = (label >= 0) & (label < V)
    safe = tl.where(valid & inside, label, 0)
    log_s = tl.log(s)
    lse = m + log_s
    x_label = tl.load(base + safe).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, tl.where(inside, x_label - lse, float("nan")), 0.0))
    tl.store(ent_ptr + row, tl.where(valid, log_s - u / s, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _row_backward_kernel(z_ptr, grad_ptr, labels_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, V, stride_z,
                         stride_g, inv_temp, ignore_index, HAS_G_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    # Ignored rows and rows whose label is outside [0, V) (their log-prob is NaN) pass no gradient.
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
    ent = tl.load(ent_ptr + row)
    g_ent = 0.0
    if HAS_G_ENT:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row), 0.0)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        x = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = x - lse
        p = tl.exp(tl.minimum(logp, 0.0))
        dx = tl.where(cols == label, g_logp, 0.0) - g_logp * p
        if HAS_G_ENT:
            dx -= g_ent * p * (logp + ent)
        # Ignored rows: g_logp = g_ent = 0 makes dx 0 (p is finite: lse is a true row lse).
        tl.store(grad_ptr + row * stride_g + cols, (dx * inv_temp).to(grad_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> tuple[int, int]:
    if INTERPRET:
        return min(triton.next_power_of_2(vocab), 64), 1
    block = min(triton.next_power_of_2(vocab), 4096)
    return block, (8 if block >= 2048 else 4)


@on_tensor_device
def row_forward(logits2d, labels1d, inv_temp: float, ignore_index: int):
    """(logp, entropy, lse), each fp32 [N]."""
    n, vocab = logits2d.shape
    out = torch.empty((3, n), dtype=torch.float32, device=logits2d.device)
    if n == 0:
        return out[0], out[1], out[2]
    block, warps = _block_v(vocab)
    _row_forward_kernel[(n,)](logits2d, labels1d, out[0], out[1], out[2], vocab, logits2d.stride(0), inv_temp,
                              ignore_index, BLOCK_V=block, num_warps=warps)
    return out[0], out[1], out[2]


@on_tensor_device
def row_backward(logits2d, grad, labels1d, lse, entropy, g_logp, g_ent, inv_temp: float, ignore_index: int):
    """Write d(loss)/d(logits) into ``grad`` (which may be ``logits2d``)."""
    n, vocab = logits2d.shape
    if n == 0:
        return grad
    block, warps = _block_v(vocab)
    _row_backward_kernel[(n,)](logits2d, grad, labels1d, lse, entropy, g_logp, g_ent if g_ent is not None else g_logp,
                               vocab, logits2d.stride(0), grad.stride(0), inv_temp, ignore_index,
                               HAS_G_ENT=g_ent is not None, BLOCK_V=block, num_warps=warps)
    return grad
