"""Triton kernels for the elementwise-plus-reduction RL and preference losses.

Each op has a forward and a backward launcher here; ``fastalign.ops.triton_rl`` wraps them in
``torch.autograd.Function``s. All math runs in float32 whatever the input dtype, and every
derivative follows PyTorch autograd on the reference formulas (``fastalign.ops.reference``),
ties included: ``torch.minimum`` splits the gradient equally between equal operands,
``torch.clamp`` passes it on the closed interval, ``relu`` and ``|x|`` have derivative 0 at 0.

Reductions are deterministic: each program writes its partial sums to its own slot and one
single-program kernel adds them in a fixed order (no float atomics), so two runs give the same
bits. No launcher synchronizes with the host: normalizers and the incoming scalar gradient are
read from device memory.

Codes shared with ``csrc/common/rl_math.h``: KL kinds k1=0, k2=1, k3=2, abs=3; loss types
grpo=0, bnpo=1, dr_grpo=2, dapo=3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_tensor_device

KL_KIND_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
LOSS_TYPE_CODES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
DPO_LOSS_CODES = {"sigmoid": 0, "hinge": 1, "ipo": 2, "robust": 3}

# Policy-loss partial sums, laid out [_N_PARTIALS, B * NB] with one column per program: masked
# loss, mask count, clipped count, ratio sum, KL sum.
_N_PARTIALS = 5


# ----------------------------------------------------------------------------------- scalar math
@triton.jit
def _exp_minus_1_minus_x(d):
    """exp(d) - 1 - d, accurate near 0 where the direct form cancels (a Taylor series there)."""
    series = d * d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (
        1.0 / 720.0 + d * (1.0 / 5040.0 + d * (1.0 / 40320.0 + d * (1.0 / 362880.0))))))))
    return tl.where(tl.abs(d) < 0.5, series, tl.exp(d) - 1.0 - d)


@triton.jit
def _kl_value(d, KL_KIND: tl.constexpr):
    if KL_KIND == 0:
        out = -d
    elif KL_KIND == 1:
        out = 0.5 * d * d
    elif KL_KIND == 2:
        out = _exp_minus_1_minus_x(d)
    else:
        out = tl.abs(d)
    return out


@triton.jit
def _kl_grad_logp(d, KL_KIND: tl.constexpr):
    """d kl / d logp with d = ref_logp - logp."""
    if KL_KIND == 0:
        out = tl.full(d.shape, 1.0, tl.float32)
    elif KL_KIND == 1:
        out = -d
    elif KL_KIND == 2:
        out = -(d + _exp_minus_1_minus_x(d))  # -expm1(d)
    else:
        out = tl.where(d > 0.0, -1.0, tl.where(d < 0.0, 1.0, 0.0))
    return out


@triton.jit
def _log1p_unit(z):
    """log1p(z) for z in [0, 1] (Goldberg's trick: exact where 1 + z rounds)."""
    u = 1.0 + z
    denom = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, z, tl.log(u) * (z / denom))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


def _block(n: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(max(n, 1)), cap))


def as_loadable(x: torch.Tensor) -> torch.Tensor:
    """A tensor Triton can load element-wise: bool viewed as uint8 (no copy), unit inner stride."""
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    if x.dim() > 0 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


# ----------------------------------------------------------------------------------- kl_penalty
@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, KL_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(ref - lp, KL_KIND), mask=valid)


@triton.jit
def _kl_bwd_kernel(grad_ptr, logp_ptr, ref_ptr, grad_logp_ptr, n, KL_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    grad = g * _kl_grad_logp(ref - lp, KL_KIND)
    tl.store(grad_logp_ptr + offs, grad.to(grad_logp_ptr.dtype.element_ty), mask=valid)


@on_tensor_device
def kl_penalty_forward(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """fp32 KL estimate of every element; ``logp`` and ``ref_logp`` contiguous, same shape."""
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        block = _block(n, 2048)
        _kl_fwd_kernel[(triton.cdiv(n, block),)](logp, ref_logp, out, n, KL_KIND=KL_KIND_CODES[kind], BLOCK=block)
    return out


@on_tensor_device
def kl_penalty_backward(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    grad = grad.contiguous()
    grad_logp = torch.empty_like(logp)
    n = logp.numel()
    if n:
        block = _block(n, 2048)
        _kl_bwd_kernel[(triton.cdiv(n, block),)](grad, logp, ref_logp, grad_logp, n,
                                                 KL_KIND=KL_KIND_CODES[kind], BLOCK=block)
    return grad_logp


# ----------------------------------------------------------------------------------- policy_loss
@triton.jit
def _policy_token(lp, old, adv, ratio_low, ratio_high):
    """(surrogate loss, ratio, clipped product, unclipped product) of one token block."""
    ratio = tl.exp(lp - old)
    clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    unclipped_term = ratio * adv
    clipped_term = clipped * adv
    return -tl.minimum(unclipped_term, clipped_term), ratio, clipped, unclipped_term, clipped_term


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, partial_ptr,
    T, n_partial_rows,
    stride_logp, stride_old, stride_ref, stride_adv, stride_mask,
    ratio_low, ratio_high, beta,
    ADV_PER_TOKEN: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = cols < T
    lp = tl.load(logp_ptr + row * stride_logp + cols, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + row * stride_old + cols, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + row * stride_mask + cols, mask=valid, other=0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + row * stride_adv + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        # Broadcast the row's advantage to the block (the interpreter does not mix 0-d and blocks in &).
        adv = tl.zeros([BLOCK_T], tl.float32) + tl.load(adv_ptr + row * stride_adv).to(tl.float32)
    loss, ratio, clipped, _, _ = _policy_token(lp, old, adv, ratio_low, ratio_high)
    is_clipped = ((ratio < ratio_low) & (adv < 0.0)) | ((ratio > ratio_high) & (adv > 0.0))
    # Masked-out positions contribute exactly 0 even when they hold inf/NaN padding.
    keep = m != 0.0
    slot = partial_ptr + row * tl.num_programs(1) + blk
    if HAS_KL:
        ref = tl.load(ref_ptr + row * stride_ref + cols, mask=valid, other=0.0).to(tl.float32)
        kl = _kl_value(ref - lp, KL_KIND)
        loss = loss + beta * kl
        tl.store(slot + 4 * n_partial_rows, tl.sum(tl.where(keep, kl * m, 0.0), axis=0))
    else:
        tl.store(slot + 4 * n_partial_rows, 0.0)
    tl.store(slot, tl.sum(tl.where(keep, loss * m, 0.0), axis=0))
    tl.store(slot + n_partial_rows, tl.sum(m, axis=0))
    tl.store(slot + 2 * n_partial_rows, tl.sum(tl.where(keep & is_clipped, m, 0.0), axis=0))
    tl.store(slot + 3 * n_partial_rows, tl.sum(tl.where(keep, ratio * m, 0.0), axis=0))


@triton.jit
def _policy_loss_finalize_kernel(
    partial_ptr, stats_ptr, row_scale_ptr, num_items_ptr,
    B, NB, n_partial_rows, norm_value,
    LOSS_TYPE: tl.constexpr, NORM_FROM_PTR: tl.constexpr, NORM_FROM_VALUE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    """One program: per-row sums of the partials, then loss, metrics and the gradient scale.

    The gradient scale (1 / normalizer) goes to ``stats[4]``; for grpo the per-row scales
    ``1 / (B * max(count_row, 1))`` go to ``row_scale``.
    """
    rows_in_block = tl.arange(0, BLOCK_B)
    blocks = tl.arange(0, BLOCK_NB)
    tot_loss = tl.zeros([BLOCK_B], tl.float32)
    tot_count = tl.zeros([BLOCK_B], tl.float32)
    tot_clip = tl.zeros([BLOCK_B], tl.float32)
    tot_ratio = tl.zeros([BLOCK_B], tl.float32)
    tot_kl = tl.zeros([BLOCK_B], tl.float32)
    tot_row_mean = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + rows_in_block
        row_ok = rows < B
        row_loss = tl.zeros([BLOCK_B], tl.float32)
        row_count = tl.zeros([BLOCK_B], tl.float32)
        row_clip = tl.zeros([BLOCK_B], tl.float32)
        row_ratio = tl.zeros([BLOCK_B], tl.float32)
        row_kl = tl.zeros([BLOCK_B], tl.float32)
        for n0 in range(0, NB, BLOCK_NB):
            cols = n0 + blocks
            idx = rows[:, None].to(tl.int64) * NB + cols[None, :]
            ok = row_ok[:, None] & (cols[None, :] < NB)
            row_loss += tl.sum(tl.load(partial_ptr + idx, mask=ok, other=0.0), axis=1)
            row_count += tl.sum(tl.load(partial_ptr + n_partial_rows + idx, mask=ok, other=0.0), axis=1)
            row_clip += tl.sum(tl.load(partial_ptr + 2 * n_partial_rows + idx, mask=ok, other=0.0), axis=1)
            row_ratio += tl.sum(tl.load(partial_ptr + 3 * n_partial_rows + idx, mask=ok, other=0.0), axis=1)
            row_kl += tl.sum(tl.load(partial_ptr + 4 * n_partial_rows + idx, mask=ok, other=0.0), axis=1)
        tot_loss += row_loss
        tot_count += row_count
        tot_clip += row_clip
        tot_ratio += row_ratio
        tot_kl += row_kl
        if LOSS_TYPE == 0:
            row_norm = tl.maximum(row_count, 1.0)
            tot_row_mean += tl.where(row_ok, row_loss / row_norm, 0.0)
            tl.store(row_scale_ptr + rows, 1.0 / (row_norm * B), mask=row_ok)
    loss_sum = tl.sum(tot_loss, axis=0)
    count = tl.sum(tot_count, axis=0)
    metric_norm = tl.maximum(count, 1.0)
    if LOSS_TYPE == 0:
        loss = tl.sum(tot_row_mean, axis=0) / B
        inv_norm = 0.0  # unused: grpo scales per row
    else:
        if NORM_FROM_PTR:
            norm = tl.maximum(tl.load(num_items_ptr).to(tl.float32), 1.0)
        elif NORM_FROM_VALUE:
            norm = norm_value
        else:
            norm = metric_norm
        loss = loss_sum / norm
        inv_norm = 1.0 / norm
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, tl.sum(tot_clip, axis=0) / metric_norm)
    tl.store(stats_ptr + 2, tl.sum(tot_ratio, axis=0) / metric_norm)
    tl.store(stats_ptr + 3, tl.sum(tot_kl, axis=0) / metric_norm)
    tl.store(stats_ptr + 4, inv_norm)


@triton.jit
def _policy_loss_bwd_kernel(
    grad_loss_ptr, stats_ptr, row_scale_ptr,
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, grad_logp_ptr, grad_adv_ptr,
    T,
    stride_logp, stride_old, stride_ref, stride_adv, stride_mask,
    ratio_low, ratio_high, beta,
    LOSS_TYPE: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
    NEED_LOGP_GRAD: tl.constexpr, NEED_ADV_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """d loss / d logp per token (and d loss / d advantages when asked) from the saved inputs.

    The grad of ``logp`` is row-major contiguous [B, T]; the grad of [B] advantages goes out as
    per-program partial sums [B, NB] that the launcher adds (deterministic, no atomics).
    """
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = cols < T
    g = tl.load(grad_loss_ptr).to(tl.float32)
    if LOSS_TYPE == 0:
        scale = tl.load(row_scale_ptr + row)
    else:
        scale = tl.load(stats_ptr + 4)
    lp = tl.load(logp_ptr + row * stride_logp + cols, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + row * stride_old + cols, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + row * stride_mask + cols, mask=valid, other=0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + row * stride_adv + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        # Broadcast the row's advantage to the block (the interpreter does not mix 0-d and blocks in &).
        adv = tl.zeros([BLOCK_T], tl.float32) + tl.load(adv_ptr + row * stride_adv).to(tl.float32)
    _, ratio, clipped, unclipped_term, clipped_term = _policy_token(lp, old, adv, ratio_low, ratio_high)
    weight = tl.where(m != 0.0, (g * scale) * m, 0.0)
    # torch.minimum: the smaller operand takes the gradient, a tie splits it in halves.
    w_unclipped = tl.where(unclipped_term < clipped_term, 1.0, tl.where(unclipped_term == clipped_term, 0.5, 0.0))
    w_clipped = 1.0 - w_unclipped
    if NEED_LOGP_GRAD:
        # torch.clamp passes the gradient on the closed interval only.
        in_range = (ratio >= ratio_low) & (ratio <= ratio_high)
        d_ratio = w_unclipped + tl.where(in_range, w_clipped, 0.0)
        d_lp = -(adv * ratio) * d_ratio
        if HAS_KL:
            ref = tl.load(ref_ptr + row * stride_ref + cols, mask=valid, other=0.0).to(tl.float32)
            d_lp += beta * _kl_grad_logp(ref - lp, KL_KIND)
        d_lp = tl.where(m != 0.0, weight * d_lp, 0.0)
        tl.store(grad_logp_ptr + row * T + cols, d_lp.to(grad_logp_ptr.dtype.element_ty), mask=valid)
    if NEED_ADV_GRAD:
        d_adv = tl.where(m != 0.0, -weight * (w_unclipped * ratio + w_clipped * clipped), 0.0)
        if ADV_PER_TOKEN:
            tl.store(grad_adv_ptr + row * T + cols, d_adv.to(grad_adv_ptr.dtype.element_ty), mask=valid)
        else:
            tl.store(grad_adv_ptr + row * tl.num_programs(1) + blk, tl.sum(d_adv, axis=0))


def _policy_layout(T: int) -> tuple[int, int]:
    block_t = _block(T, 1024)
    return block_t, triton.cdiv(T, block_t)


@on_tensor_device
def policy_loss_forward(logp, old_logp, advantages, mask, ref_logp, *, beta, kl_kind, clip_low, clip_high,
                        loss_type, max_completion_length, num_items):
    """Loss and metrics of the clipped policy loss in one pass over the tokens.

    Inputs are [B, T] (advantages [B] or [B, T]) with unit inner stride, see :func:`as_loadable`.
    Returns ``(stats, row_scale)``: ``stats`` = fp32 [loss, clip_fraction, ratio_mean, kl_mean,
    1/normalizer] and ``row_scale`` = fp32 [B] per-row gradient scales (grpo only).
    """
    B, T = logp.shape
    device = logp.device
    block_t, nb = _policy_layout(T)
    n_partial_rows = B * nb
    partials = torch.empty((_N_PARTIALS, n_partial_rows), dtype=torch.float32, device=device)
    stats = torch.empty(5, dtype=torch.float32, device=device)
    row_scale = torch.empty(max(B, 1), dtype=torch.float32, device=device)
    has_kl = beta > 0.0
    ref = ref_logp if has_kl else logp
    if n_partial_rows:
        _policy_loss_fwd_kernel[(B, nb)](
            logp, old_logp, ref, advantages, mask, partials,
            T, n_partial_rows,
            logp.stride(0), old_logp.stride(0), ref.stride(0), advantages.stride(0), mask.stride(0),
            1.0 - clip_low, 1.0 + clip_high, beta,
            ADV_PER_TOKEN=advantages.dim() == 2, HAS_KL=has_kl, KL_KIND=KL_KIND_CODES[kl_kind], BLOCK_T=block_t,
        )
    code = LOSS_TYPE_CODES[loss_type]
    norm_from_ptr = code == 3 and isinstance(num_items, torch.Tensor)
    norm_value = 1.0
    norm_from_value = False
    if code == 2:
        norm_value = float(B * (T if max_completion_length is None else max_completion_length))
        norm_from_value = True
    elif code == 3 and num_items is not None and not norm_from_ptr:
        norm_value = max(float(num_items), 1.0)
        norm_from_value = True
    num_items_t = (num_items.reshape(1).to(device=device, dtype=torch.float32) if norm_from_ptr else stats)
    _policy_loss_finalize_kernel[(1,)](
        partials, stats, row_scale, num_items_t,
        B, nb, n_partial_rows, norm_value,
        LOSS_TYPE=code, NORM_FROM_PTR=norm_from_ptr, NORM_FROM_VALUE=norm_from_value,
        BLOCK_B=_block(B, 64), BLOCK_NB=_block(nb, 16),
    )
    return stats, row_scale


@on_tensor_device
def policy_loss_backward(grad_loss, stats, row_scale, logp, old_logp, advantages, mask, ref_logp, *, beta,
                         kl_kind, clip_low, clip_high, loss_type, need_logp_grad, need_adv_grad):
    """(grad of logp [B, T] in logp's dtype or None, grad of advantages in their shape or None)."""
    B, T = logp.shape
    device = logp.device
    block_t, nb = _policy_layout(T)
    has_kl = beta > 0.0
    ref = ref_logp if has_kl else logp
    adv_per_token = advantages.dim() == 2
    grad_logp = torch.empty((B, T), dtype=logp.dtype, device=device) if need_logp_grad else None
    grad_adv = None
    if need_adv_grad:
        grad_adv = (torch.empty((B, T), dtype=advantages.dtype, device=device) if adv_per_token
                    else torch.empty((B, nb), dtype=torch.float32, device=device))
    if B * nb and (need_logp_grad or need_adv_grad):
        _policy_loss_bwd_kernel[(B, nb)](
            grad_loss, stats, row_scale,
            logp, old_logp, ref, advantages, mask,
            grad_logp if need_logp_grad else stats, grad_adv if need_adv_grad else stats,
            T,
            logp.stride(0), old_logp.stride(0), ref.stride(0), advantages.stride(0), mask.stride(0),
            1.0 - clip_low, 1.0 + clip_high, beta,
            LOSS_TYPE=LOSS_TYPE_CODES[loss_type], ADV_PER_TOKEN=adv_per_token, HAS_KL=has_kl,
            KL_KIND=KL_KIND_CODES[kl_kind], NEED_LOGP_GRAD=need_logp_grad, NEED_ADV_GRAD=need_adv_grad,
            BLOCK_T=block_t,
        )
    elif need_adv_grad:
        grad_adv.zero_()
    if grad_adv is not None and not adv_per_token:
        grad_adv = grad_adv.sum(1).to(advantages.dtype)
    return grad_logp, grad_adv


# ----------------------------------------------------------------------------------- dpo / simpo
@triton.jit
def _dpo_loss_and_slope(delta, beta, ipo_target, label_smoothing, LOSS: tl.constexpr):
    """(loss, d loss / d delta) of one pair block; delta = chosen - rejected log-ratio."""
    z = beta * delta
    if LOSS == 0:  # sigmoid with conservative label smoothing
        loss = -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)
        slope = beta * (-(1.0 - label_smoothing) * _sigmoid(-z) + label_smoothing * _sigmoid(z))
    elif LOSS == 1:  # hinge
        h = 1.0 - z
        loss = tl.maximum(h, 0.0)
        slope = tl.where(h > 0.0, -beta, 0.0)
    elif LOSS == 2:  # ipo
        r = delta - ipo_target
        loss = r * r
        slope = 2.0 * r
    else:  # robust
        inv = 1.0 / (1.0 - 2.0 * label_smoothing)
        loss = (-(1.0 - label_smoothing) * _log_sigmoid(z) + label_smoothing * _log_sigmoid(-z)) * inv
        slope = beta * (-(1.0 - label_smoothing) * _sigmoid(-z) - label_smoothing * _sigmoid(z)) * inv
    return loss, slope


@triton.jit
def _dpo_fwd_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, chosen_reward_ptr, rejected_reward_ptr,
                    n, s_pc, s_pr, s_rc, s_rr, beta, ipo_target, label_smoothing,
                    LOSS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    chosen = (tl.load(pc_ptr + offs * s_pc, mask=valid, other=0.0).to(tl.float32)
              - tl.load(rc_ptr + offs * s_rc, mask=valid, other=0.0).to(tl.float32))
    rejected = (tl.load(pr_ptr + offs * s_pr, mask=valid, other=0.0).to(tl.float32)
                - tl.load(rr_ptr + offs * s_rr, mask=valid, other=0.0).to(tl.float32))
    loss, _ = _dpo_loss_and_slope(chosen - rejected, beta, ipo_target, label_smoothing, LOSS)
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(chosen_reward_ptr + offs, beta * chosen, mask=valid)
    tl.store(rejected_reward_ptr + offs, beta * rejected, mask=valid)


@triton.jit
def _dpo_bwd_kernel(grad_ptr, pc_ptr, pr_ptr, rc_ptr, rr_ptr, grad_chosen_ptr, grad_rejected_ptr,
                    n, s_grad, s_pc, s_pr, s_rc, s_rr, beta, ipo_target, label_smoothing,
                    LOSS: tl.constexpr, NEED_CHOSEN: tl.constexpr, NEED_REJECTED: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs * s_grad, mask=valid, other=0.0).to(tl.float32)
    chosen = (tl.load(pc_ptr + offs * s_pc, mask=valid, other=0.0).to(tl.float32)
              - tl.load(rc_ptr + offs * s_rc, mask=valid, other=0.0).to(tl.float32))
    rejected = (tl.load(pr_ptr + offs * s_pr, mask=valid, other=0.0).to(tl.float32)
                - tl.load(rr_ptr + offs * s_rr, mask=valid, other=0.0).to(tl.float32))
    _, slope = _dpo_loss_and_slope(chosen - rejected, beta, ipo_target, label_smoothing, LOSS)
    d = g * slope
    if NEED_CHOSEN:
        tl.store(grad_chosen_ptr + offs, d.to(grad_chosen_ptr.dtype.element_ty), mask=valid)
    if NEED_REJECTED:
        tl.store(grad_rejected_ptr + offs, (-d).to(grad_rejected_ptr.dtype.element_ty), mask=valid)


def _pair_block(n: int) -> int:
    return _block(n, 1024)


@on_tensor_device
def dpo_forward(pc, pr, rc, rr, *, beta, loss_type, label_smoothing):
    """(losses, chosen_rewards, rejected_rewards), all fp32 [B]."""
    n = pc.shape[0]
    losses, chosen_rewards, rejected_rewards = (torch.empty(n, dtype=torch.float32, device=pc.device)
                                                for _ in range(3))
    if n:
        block = _pair_block(n)
        _dpo_fwd_kernel[(triton.cdiv(n, block),)](
            pc, pr, rc, rr, losses, chosen_rewards, rejected_rewards,
            n, pc.stride(0), pr.stride(0), rc.stride(0), rr.stride(0), beta, 0.5 / beta, label_smoothing,
            LOSS=DPO_LOSS_CODES[loss_type], BLOCK=block)
    return losses, chosen_rewards, rejected_rewards


@on_tensor_device
def dpo_backward(grad, pc, pr, rc, rr, *, beta, loss_type, label_smoothing, need_chosen, need_rejected):
    n = pc.shape[0]
    grad_chosen = torch.empty(n, dtype=pc.dtype, device=pc.device) if need_chosen else None
    grad_rejected = torch.empty(n, dtype=pr.dtype, device=pr.device) if need_rejected else None
    if n and (need_chosen or need_rejected):
        block = _pair_block(n)
        _dpo_bwd_kernel[(triton.cdiv(n, block),)](
            grad, pc, pr, rc, rr,
            grad_chosen if need_chosen else grad, grad_rejected if need_rejected else grad,
            n, grad.stride(0), pc.stride(0), pr.stride(0), rc.stride(0), rr.stride(0),
            beta, 0.5 / beta, label_smoothing,
            LOSS=DPO_LOSS_CODES[loss_type], NEED_CHOSEN=need_chosen, NEED_REJECTED=need_rejected, BLOCK=block)
    return grad_chosen, grad_rejected


@triton.jit
def _simpo_fwd_kernel(c_ptr, r_ptr, loss_ptr, chosen_reward_ptr, rejected_reward_ptr, n, s_c, s_r,
                      beta, gamma, label_smoothing, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c = tl.load(c_ptr + offs * s_c, mask=valid, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32)
    z = beta * (c - r) - gamma
    loss = -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(chosen_reward_ptr + offs, beta * c, mask=valid)
    tl.store(rejected_reward_ptr + offs, beta * r, mask=valid)


@triton.jit
def _simpo_bwd_kernel(grad_ptr, c_ptr, r_ptr, grad_chosen_ptr, grad_rejected_ptr, n, s_grad, s_c, s_r,
                      beta, gamma, label_smoothing,
                      NEED_CHOSEN: tl.constexpr, NEED_REJECTED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs * s_grad, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs * s_c, mask=valid, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32)
    z = beta * (c - r) - gamma
    d = g * beta * (-(1.0 - label_smoothing) * _sigmoid(-z) + label_smoothing * _sigmoid(z))
    if NEED_CHOSEN:
        tl.store(grad_chosen_ptr + offs, d.to(grad_chosen_ptr.dtype.element_ty), mask=valid)
    if NEED_REJECTED:
        tl.store(grad_rejected_ptr + offs, (-d).to(grad_rejected_ptr.dtype.element_ty), mask=valid)


@on_tensor_device
def simpo_forward(chosen, rejected, *, beta, gamma, label_smoothing):
    n = chosen.shape[0]
    losses, chosen_rewards, rejected_rewards = (torch.empty(n, dtype=torch.float32, device=chosen.device)
                                                for _ in range(3))
    if n:
        block = _pair_block(n)
        _simpo_fwd_kernel[(triton.cdiv(n, block),)](
            chosen, rejected, losses, chosen_rewards, rejected_rewards, n, chosen.stride(0), rejected.stride(0),
            beta, gamma, label_smoothing, BLOCK=block)
    return losses, chosen_rewards, rejected_rewards


@on_tensor_device
def simpo_backward(grad, chosen, rejected, *, beta, gamma, label_smoothing, need_chosen, need_rejected):
    n = chosen.shape[0]
    grad_chosen = torch.empty(n, dtype=chosen.dtype, device=chosen.device) if need_chosen else None
    grad_rejected = torch.empty(n, dtype=rejected.dtype, device=rejected.device) if need_rejected else None
    if n and (need_chosen or need_rejected):
        block = _pair_block(n)
        _simpo_bwd_kernel[(triton.cdiv(n, block),)](
            grad, chosen, rejected, grad_chosen if need_chosen else grad, grad_rejected if need_rejected else grad,
            n, grad.stride(0), chosen.stride(0), rejected.stride(0), beta, gamma, label_smoothing,
            NEED_CHOSEN=need_chosen, NEED_REJECTED=need_rejected, BLOCK=block)
    return grad_chosen, grad_rejected


# ----------------------------------------------------------------------------------- bradley_terry
@triton.jit
def _bt_fwd_kernel(c_ptr, r_ptr, margin_ptr, stats_ptr, n, s_c, s_r, s_m, margin_value, center_coef,
                   MARGIN_PER_PAIR: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """One program walks the pairs in order: [loss, accuracy, mean margin] (deterministic sums)."""
    lanes = tl.arange(0, BLOCK)
    nll = tl.zeros([BLOCK], tl.float32)
    center = tl.zeros([BLOCK], tl.float32)
    wins = tl.zeros([BLOCK], tl.float32)
    gap = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + lanes
        valid = offs < n
        c = tl.load(c_ptr + offs * s_c, mask=valid, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32)
        if MARGIN_PER_PAIR:
            margin = tl.load(margin_ptr + offs * s_m, mask=valid, other=0.0).to(tl.float32)
        else:
            margin = margin_value
        nll += tl.where(valid, -_log_sigmoid(c - r - margin), 0.0)
        if HAS_CENTER:
            s = c + r
            center += s * s
        wins += tl.where(valid & (c > r), 1.0, 0.0)
        gap += c - r
    loss = tl.sum(nll, axis=0) / n
    if HAS_CENTER:
        loss += center_coef * (tl.sum(center, axis=0) / n)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, tl.sum(wins, axis=0) / n)
    tl.store(stats_ptr + 2, tl.sum(gap, axis=0) / n)


@triton.jit
def _bt_bwd_kernel(grad_ptr, c_ptr, r_ptr, margin_ptr, grad_c_ptr, grad_r_ptr, grad_margin_ptr,
                   n, s_c, s_r, s_m, margin_value, center_coef,
                   MARGIN_PER_PAIR: tl.constexpr, HAS_CENTER: tl.constexpr, NEED_C: tl.constexpr,
                   NEED_R: tl.constexpr, NEED_MARGIN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr).to(tl.float32) / n
    c = tl.load(c_ptr + offs * s_c, mask=valid, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32)
    if MARGIN_PER_PAIR:
        margin = tl.load(margin_ptr + offs * s_m, mask=valid, other=0.0).to(tl.float32)
    else:
        margin = margin_value
    # d(-log σ(x))/dx = -σ(-x) with x = c - r - margin.
    d_x = -g * _sigmoid(-(c - r - margin))
    d_center = tl.full(d_x.shape, 0.0, tl.float32)
    if HAS_CENTER:
        d_center = g * center_coef * 2.0 * (c + r)
    if NEED_C:
        tl.store(grad_c_ptr + offs, (d_x + d_center).to(grad_c_ptr.dtype.element_ty), mask=valid)
    if NEED_R:
        tl.store(grad_r_ptr + offs, (d_center - d_x).to(grad_r_ptr.dtype.element_ty), mask=valid)
    if NEED_MARGIN:
        tl.store(grad_margin_ptr + offs, (-d_x).to(grad_margin_ptr.dtype.element_ty), mask=valid)


@on_tensor_device
def bradley_terry_forward(chosen, rejected, margin, *, margin_value, center_coef):
    """fp32 [loss, accuracy, mean margin]; ``margin`` a [B] tensor or None (then ``margin_value``)."""
    n = chosen.shape[0]
    stats = torch.empty(3, dtype=torch.float32, device=chosen.device)
    per_pair = margin is not None
    _bt_fwd_kernel[(1,)](
        chosen, rejected, margin if per_pair else chosen, stats, n,
        chosen.stride(0), rejected.stride(0), margin.stride(0) if per_pair else 0, margin_value, center_coef,
        MARGIN_PER_PAIR=per_pair, HAS_CENTER=center_coef != 0.0, BLOCK=_block(n, 1024))
    return stats


@on_tensor_device
def bradley_terry_backward(grad_loss, chosen, rejected, margin, *, margin_value, center_coef, need_chosen,
                           need_rejected, need_margin):
    n = chosen.shape[0]
    per_pair = margin is not None
    grad_c = torch.empty(n, dtype=chosen.dtype, device=chosen.device) if need_chosen else None
    grad_r = torch.empty(n, dtype=rejected.dtype, device=rejected.device) if need_rejected else None
    grad_m = torch.empty(n, dtype=margin.dtype, device=margin.device) if need_margin else None
    block = _pair_block(n)
    _bt_bwd_kernel[(triton.cdiv(n, block),)](
        grad_loss, chosen, rejected, margin if per_pair else chosen,
        grad_c if need_chosen else grad_loss, grad_r if need_rejected else grad_loss,
        grad_m if need_margin else grad_loss,
        n, chosen.stride(0), rejected.stride(0), margin.stride(0) if per_pair else 0, margin_value, center_coef,
        MARGIN_PER_PAIR=per_pair, HAS_CENTER=center_coef != 0.0, NEED_C=need_chosen, NEED_R=need_rejected,
        NEED_MARGIN=need_margin, BLOCK=block)
    return grad_c, grad_r, grad_m
