"""Triton kernels for the elementwise-plus-reduction RL and preference losses.

Each op has its launchers here; the ``triton.py`` of each op package in ``fastalign.ops`` wraps
them in ``torch.autograd.Function``s. All math runs in float32 whatever the input dtype, and every
derivative follows PyTorch autograd on the reference formulas (``fastalign.ops.<op>.spec``),
ties included: ``torch.minimum`` splits the gradient equally between equal operands,
``torch.clamp`` passes it on the closed interval, ``relu`` and ``|x|`` have derivative 0 at 0.

Reductions are deterministic: each program writes its partial sums to its own slot and one
single-program kernel adds them in a fixed order (no float atomics), so two runs give the same
bits. No launcher synchronizes with the host: normalizers and the incoming scalar gradient are
read from device memory.

Kind codes come from the enums declared in each op's spec (``KlKind``, ``DpoLossType``): the
kernels compare against constexpr copies of them, launchers turn names into codes with
``Kind.code`` (an unknown name raises before any launch), and a code no branch knows gives NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastalign.ops.kl.spec import KlKind
from fastalign.ops.offpolicy.spec import RolloutIsMode
from fastalign.ops.policy.spec import ImportanceLevel, PolicyObjective
from fastalign.ops.preference.spec import DpoLossType

from .launch import on_tensor_device

KL_K1 = tl.constexpr(KlKind.k1.value)
KL_K2 = tl.constexpr(KlKind.k2.value)
KL_K3 = tl.constexpr(KlKind.k3.value)
KL_ABS = tl.constexpr(KlKind.abs.value)
DPO_SIGMOID = tl.constexpr(DpoLossType.sigmoid.value)
DPO_HINGE = tl.constexpr(DpoLossType.hinge.value)
DPO_IPO = tl.constexpr(DpoLossType.ipo.value)
DPO_ROBUST = tl.constexpr(DpoLossType.robust.value)
LEVEL_TOKEN = tl.constexpr(ImportanceLevel.token.value)
LEVEL_SEQUENCE = tl.constexpr(ImportanceLevel.sequence.value)
LEVEL_SEQUENCE_TOKEN = tl.constexpr(ImportanceLevel.sequence_token.value)
OBJECTIVE_CLIP = tl.constexpr(PolicyObjective.clip.value)
OBJECTIVE_CISPO = tl.constexpr(PolicyObjective.cispo.value)
ROLLOUT_TOKEN_TRUNCATE = tl.constexpr(RolloutIsMode.token_truncate.value)
ROLLOUT_TOKEN_MASK = tl.constexpr(RolloutIsMode.token_mask.value)
ROLLOUT_SEQUENCE_TRUNCATE = tl.constexpr(RolloutIsMode.sequence_truncate.value)
ROLLOUT_SEQUENCE_MASK = tl.constexpr(RolloutIsMode.sequence_mask.value)


# ----------------------------------------------------------------------------------- scalar math
@triton.jit
def _exp_minus_1_minus_x(d):
    """exp(d) - 1 - d, accurate near 0 where the direct form cancels (a Taylor series there)."""
    series = d * d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (
        1.0 / 720.0 + d * (1.0 / 5040.0 + d * (1.0 / 40320.0 + d * (1.0 / 362880.0))))))))
    return tl.where(tl.abs(d) < 0.5, series, tl.exp(d) - 1.0 - d)


@triton.jit
def _kl_value(d, KL_KIND: tl.constexpr):
    if KL_KIND == KL_K1:
        out = -d
    elif KL_KIND == KL_K2:
        out = 0.5 * d * d
    elif KL_KIND == KL_K3:
        out = _exp_minus_1_minus_x(d)
    elif KL_KIND == KL_ABS:
        out = tl.abs(d)
    else:  # never some other estimator
        out = d * float("nan")
    return out


@triton.jit
def _kl_grad_logp(d, KL_KIND: tl.constexpr):
    """d kl / d logp with d = ref_logp - logp."""
    if KL_KIND == KL_K1:
        out = tl.full(d.shape, 1.0, tl.float32)
    elif KL_KIND == KL_K2:
        out = -d
    elif KL_KIND == KL_K3:
        out = -(d + _exp_minus_1_minus_x(d))  # -expm1(d)
    elif KL_KIND == KL_ABS:
        out = tl.where(d > 0.0, -1.0, tl.where(d < 0.0, 1.0, 0.0))
    else:
        out = d * float("nan")
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
        _kl_fwd_kernel[(triton.cdiv(n, block),)](logp, ref_logp, out, n, KL_KIND=KlKind.code(kind), BLOCK=block)
    return out


@on_tensor_device
def kl_penalty_backward(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    grad = grad.contiguous()
    grad_logp = torch.empty_like(logp)
    n = logp.numel()
    if n:
        block = _block(n, 2048)
        _kl_bwd_kernel[(triton.cdiv(n, block),)](grad, logp, ref_logp, grad_logp, n,
                                                 KL_KIND=KlKind.code(kind), BLOCK=block)
    return grad_logp


# ----------------------------------------------------------------------------------- policy_loss
@triton.jit
def _policy_ext_terms(lp, log_ratio, adv, row_lr, tw, ratio_low, ratio_high, cispo_cap, delta, dual_clip,
                      LEVEL: tl.constexpr, OBJECTIVE: tl.constexpr, HAS_DELTA: tl.constexpr,
                      HAS_DUAL: tl.constexpr):
    """Issue 12's surrogate of a block (spec: ``fastalign.ops.policy.spec.policy_token_terms``).

    Returns ``(ratio, pg, g_w, g_logp, g_adv, low, high)``: the weighted surrogate ``tw·pg`` and its
    derivatives w.r.t. the weight, logp (directly, CISPO) and the advantage, all times ``tw``.
    """
    if LEVEL == LEVEL_TOKEN:
        ratio = tl.exp(log_ratio)
    else:
        ratio = tl.exp(row_lr)
    if OBJECTIVE == OBJECTIVE_CISPO:
        q = tl.minimum(ratio, cispo_cap)  # detached
        pg = -q * adv * lp
        g_w = ratio * 0.0
        g_logp = -q * adv
        g_adv = -q * lp
        low = ratio < 0.0  # never
        high = (ratio > cispo_cap) & (adv > 0.0)
    elif OBJECTIVE == OBJECTIVE_CLIP:
        if HAS_DELTA:
            r1 = tl.where(ratio > delta, delta, ratio)
            d_r1 = tl.where(ratio <= delta, 1.0, 0.0)  # torch.clamp(max=delta) passes on x <= delta
        else:
            r1 = ratio
            d_r1 = ratio * 0.0 + 1.0
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        a = r1 * adv
        b = clipped * adv
        pg = -tl.minimum(a, b)
        wa = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))
        wb = 1.0 - wa
        inside = (ratio >= ratio_low) & (ratio <= ratio_high)
        g_w = -(wa * d_r1 + tl.where(inside, wb, 0.0)) * adv
        g_adv = -(wa * r1 + wb * clipped)
        g_logp = ratio * 0.0
        if HAS_DUAL:  # for A < 0: min(pg, -c A), torch.minimum's split on a tie
            bound = -dual_clip * adv
            wd = tl.where(pg < bound, 1.0, tl.where(pg == bound, 0.5, 0.0))
            neg = adv < 0.0
            pg = tl.where(neg, tl.minimum(pg, bound), pg)
            g_w = tl.where(neg, wd * g_w, g_w)
            g_adv = tl.where(neg, wd * g_adv - (1.0 - wd) * dual_clip, g_adv)
        low = (r1 < ratio_low) & (adv < 0.0)
        high = (r1 > ratio_high) & (adv > 0.0)
    else:  # no other objective: NaN
        pg = ratio * float("nan")
        g_w = pg
        g_logp = pg
        g_adv = pg
        low = ratio < 0.0
        high = low
    return ratio, tw * pg, tw * g_w, tw * g_logp, tw * g_adv, low, high


@triton.jit
def _policy_tokens_kernel(
    logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, scale_ptr, partial_ptr, grad_logp_ptr, grad_adv_ptr,
    row_lr_ptr, tw_ptr,
    T, n_programs,
    ratio_low, ratio_high, beta, cispo_cap, delta, dual_clip,
    ADV_PER_TOKEN: tl.constexpr, SCALE_PER_TOKEN: tl.constexpr, HAS_KL: tl.constexpr, KL_KIND: tl.constexpr,
    NEED_ADV_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, EXT: tl.constexpr = False, LEVEL: tl.constexpr = 0,
    OBJECTIVE: tl.constexpr = 0, HAS_TW: tl.constexpr = False, HAS_DELTA: tl.constexpr = False,
    HAS_DUAL: tl.constexpr = False, KL_BIAS: tl.constexpr = False,
):
    """One block of one row: the scaled loss, metric sums and d logp (and d advantages) at once.

    Inputs are row-major contiguous [R, T] (advantages and scale [R] or [R, T]). Per-program partial
    sums go to ``partial[k, program]`` (k: loss, low, high, kl, log-ratio², d adv, d row_log_ratio),
    which the launcher adds: deterministic, no atomics. With w = scale · mask, d logp = w · d term /
    d logp. ``EXT`` turns on issue 12's options (levels, CISPO, δ, dual clip, KL bias correction,
    token weights, see :func:`_policy_ext_terms`); without it the plain body compiles unchanged.
    """
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = cols < T
    offs = row * T + cols
    lp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
    # Row values broadcast to the block (the interpreter does not mix 0-d and blocks in &).
    zeros = tl.zeros([BLOCK_T], tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        adv = zeros + tl.load(adv_ptr + row).to(tl.float32)
    if SCALE_PER_TOKEN:
        scale = tl.load(scale_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        scale = zeros + tl.load(scale_ptr + row).to(tl.float32)
    log_ratio = lp - old
    d_row = zeros
    if EXT:
        if LEVEL == LEVEL_TOKEN:
            row_lr = zeros
        else:
            row_lr = zeros + tl.load(row_lr_ptr + row).to(tl.float32)
        if HAS_TW:
            tw = tl.load(tw_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            tw = zeros + 1.0
        ratio, term, g_w, d_lp, d_adv_tok, low, high = _policy_ext_terms(
            lp, log_ratio, adv, row_lr, tw, ratio_low, ratio_high, cispo_cap, delta, dual_clip, LEVEL, OBJECTIVE,
            HAS_DELTA, HAS_DUAL)
        kl = zeros
        if HAS_KL:
            ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            kl_raw = _kl_value(ref - lp, KL_KIND)
            d_kl = _kl_grad_logp(ref - lp, KL_KIND)
            if KL_BIAS:
                kl = kl_raw * ratio
                d_lp += beta * d_kl * ratio
                g_w += beta * kl_raw
            else:
                kl = kl_raw
                d_lp += beta * d_kl
            term = term + beta * kl
        if LEVEL == LEVEL_SEQUENCE:
            d_row = g_w * ratio
        else:
            d_lp += g_w * ratio
    else:
        ratio = tl.exp(log_ratio)
        clipped = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        unclipped_term = ratio * adv
        clipped_term = clipped * adv
        term = -tl.minimum(unclipped_term, clipped_term)
        # torch.minimum: the smaller operand takes the gradient, a tie splits it in halves; torch.clamp
        # passes the gradient on the closed interval only.
        w_unclipped = tl.where(unclipped_term < clipped_term, 1.0,
                               tl.where(unclipped_term == clipped_term, 0.5, 0.0))
        w_clipped = 1.0 - w_unclipped
        in_range = (ratio >= ratio_low) & (ratio <= ratio_high)
        d_lp = -(adv * ratio) * (w_unclipped + tl.where(in_range, w_clipped, 0.0))
        d_adv_tok = -(w_unclipped * ratio + w_clipped * clipped)
        kl = zeros
        if HAS_KL:
            ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            kl = _kl_value(ref - lp, KL_KIND)
            term = term + beta * kl
            d_lp += beta * _kl_grad_logp(ref - lp, KL_KIND)
        low = (ratio < ratio_low) & (adv < 0.0)
        high = (ratio > ratio_high) & (adv > 0.0)
    # Masked-out positions contribute exactly 0 even when they hold inf/NaN padding.
    keep = (m != 0.0) & valid
    w = scale * m
    d_adv = tl.where(keep, w * d_adv_tok, 0.0)
    tl.store(grad_logp_ptr + offs, tl.where(keep, w * d_lp, 0.0), mask=valid)
    slot = partial_ptr + row * tl.num_programs(1) + blk
    tl.store(slot, tl.sum(tl.where(keep, w * term, 0.0), axis=0))
    tl.store(slot + n_programs, tl.sum(tl.where(keep & low, m, 0.0), axis=0))
    tl.store(slot + 2 * n_programs, tl.sum(tl.where(keep & high, m, 0.0), axis=0))
    tl.store(slot + 3 * n_programs, tl.sum(tl.where(keep, kl * m, 0.0), axis=0))
    tl.store(slot + 4 * n_programs, tl.sum(tl.where(keep, log_ratio * log_ratio * m, 0.0), axis=0))
    tl.store(slot + 5 * n_programs, tl.sum(d_adv, axis=0))
    tl.store(slot + 6 * n_programs, tl.sum(tl.where(keep, w * d_row, 0.0), axis=0))
    if NEED_ADV_GRAD:
        if ADV_PER_TOKEN:
            tl.store(grad_adv_ptr + offs, d_adv, mask=valid)


@on_tensor_device
def policy_tokens(logp, old_logp, advantages, mask, ref_logp, scale, *, beta, kl_kind, clip_low, clip_high,
                  need_adv_grad, row_log_ratio=None, token_weights=None, level="token", objective="clip", delta=None,
                  dual_clip=None, kl_bias_correction=False):
    """The policy loss's token pass (the contract of ``fastalign.ops.policy.spec.policy_tokens``).

    fp32 contiguous inputs: logp, old_logp, mask [R, T]; advantages and scale [R] or [R, T];
    row_log_ratio [R] (unless level is token) and token_weights [R, T] or None.
    Returns ``(loss, row_sums [R, 4], d_logp [R, T], d_adv or None, d_row [R])``.
    """
    R, T = logp.shape
    device = logp.device
    block_t = _block(T, 1024)
    nb = triton.cdiv(T, block_t) if T else 0
    n_programs = R * nb
    partials = torch.zeros((7, max(n_programs, 1)), dtype=torch.float32, device=device)
    grad_logp = torch.zeros((R, T), dtype=torch.float32, device=device)
    adv_per_token = advantages.dim() == 2
    grad_adv = torch.zeros((R, T), dtype=torch.float32, device=device) if need_adv_grad and adv_per_token else None
    has_kl = beta > 0.0
    level_code = ImportanceLevel.code(level, "importance_sampling_level")
    objective_code = PolicyObjective.code(objective, "objective")
    ext = (level_code != ImportanceLevel.token or objective_code != PolicyObjective.clip or delta is not None
           or dual_clip is not None or bool(kl_bias_correction) or token_weights is not None)
    if level_code != ImportanceLevel.token and row_log_ratio is None:
        raise ValueError(f"row_log_ratio [R] is required at importance_sampling_level={level!r}, got None")
    if n_programs:
        _policy_tokens_kernel[(R, nb)](
            logp, old_logp, ref_logp if has_kl else logp, advantages, mask, scale, partials, grad_logp,
            grad_adv if grad_adv is not None else grad_logp,
            row_log_ratio if row_log_ratio is not None else logp,
            token_weights if token_weights is not None else logp,
            T, n_programs,
            1.0 - clip_low, 1.0 + clip_high, beta, clip_high, float("inf") if delta is None else float(delta),
            0.0 if dual_clip is None else float(dual_clip),
            ADV_PER_TOKEN=adv_per_token, SCALE_PER_TOKEN=scale.dim() == 2, HAS_KL=has_kl,
            KL_KIND=KlKind.code(kl_kind, "kl_kind"), NEED_ADV_GRAD=need_adv_grad, BLOCK_T=block_t,
            EXT=ext, LEVEL=level_code, OBJECTIVE=objective_code, HAS_TW=token_weights is not None,
            HAS_DELTA=delta is not None, HAS_DUAL=dual_clip is not None, KL_BIAS=bool(kl_bias_correction),
        )
    loss = partials[0].sum()
    # Per row: TRL logs per-sequence clip extremes (clip_ratio/low_min, high_max).
    sums = (partials[1:5, :n_programs].view(4, R, nb).sum(2).t().contiguous() if n_programs
            else torch.zeros((R, 4), dtype=torch.float32, device=device))
    if need_adv_grad and not adv_per_token:
        grad_adv = partials[5, :n_programs].view(R, nb).sum(1) if n_programs else torch.zeros(R, device=device)
    d_row = partials[6, :n_programs].view(R, nb).sum(1) if n_programs else torch.zeros(R, device=device)
    return loss, sums, grad_logp, grad_adv, d_row


# ------------------------------------------------------------ off-policy corrections (issue 12)
@triton.jit
def _rollout_weight(log_rho, low, high, MODE: tl.constexpr):
    rho = tl.exp(log_rho)
    if (MODE == ROLLOUT_TOKEN_TRUNCATE) or (MODE == ROLLOUT_SEQUENCE_TRUNCATE):
        out = tl.minimum(tl.maximum(rho, low), high)
    elif (MODE == ROLLOUT_TOKEN_MASK) or (MODE == ROLLOUT_SEQUENCE_MASK):
        out = tl.where((rho < low) | (rho > high), 0.0, rho)
    else:  # no other mode: NaN
        out = rho * float("nan")
    return out


@triton.jit
def _rollout_is_kernel(old_ptr, rollout_ptr, mask_ptr, out_ptr, T, low, high, MODE: tl.constexpr,
                       BLOCK_T: tl.constexpr):
    """One row: its importance weights (sequence modes: a first sweep sums the row's log-ratios)."""
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_T], tl.float32)
    if (MODE == ROLLOUT_SEQUENCE_TRUNCATE) or (MODE == ROLLOUT_SEQUENCE_MASK):
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            valid = cols < T
            o = tl.load(old_ptr + row * T + cols, mask=valid, other=0.0)
            r = tl.load(rollout_ptr + row * T + cols, mask=valid, other=0.0)
            m = tl.load(mask_ptr + row * T + cols, mask=valid, other=0.0)
            d = (o - r) * m
            total += tl.where(d != d, 0.0, d)  # an unscored (NaN) token counts as log-ratio 0
        weight = _rollout_weight(tl.sum(total, axis=0), low, high, MODE)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        valid = cols < T
        if (MODE == ROLLOUT_SEQUENCE_TRUNCATE) or (MODE == ROLLOUT_SEQUENCE_MASK):
            w = tl.zeros([BLOCK_T], tl.float32) + weight
        else:
            o = tl.load(old_ptr + row * T + cols, mask=valid, other=0.0)
            r = tl.load(rollout_ptr + row * T + cols, mask=valid, other=0.0)
            m = tl.load(mask_ptr + row * T + cols, mask=valid, other=0.0)
            d = (o - r) * m
            w = _rollout_weight(tl.where(d != d, 0.0, d), low, high, MODE)
        tl.store(out_ptr + row * T + cols, w, mask=valid)


@triton.jit
def _off_policy_mask_kernel(logp_ptr, sampling_ptr, adv_ptr, mask_ptr, out_ptr, T, threshold, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        valid = cols < T
        lp = tl.load(logp_ptr + row * T + cols, mask=valid, other=0.0)
        sp = tl.load(sampling_ptr + row * T + cols, mask=valid, other=0.0)
        m = tl.load(mask_ptr + row * T + cols, mask=valid, other=0.0)
        d = sp - lp
        total += tl.where(d != d, 0.0, d) * m
        count += m
    mean = tl.sum(total, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0)
    adv = tl.load(adv_ptr + row)
    keep = (adv >= 0.0) | (mean <= threshold)
    tl.store(out_ptr + row, tl.where(keep, 1.0, 0.0))


def rollout_is_weights(old_logp, rollout_logp, mask, *, mode, low, high):
    """``[B, T]`` float32 rollout importance weights (spec: ``fastalign.ops.offpolicy.spec.rollout_is_weights``)."""
    old, rollout = old_logp.float().contiguous(), rollout_logp.float().contiguous()
    m = mask.to(torch.float32).contiguous()
    B, T = old.shape
    out = torch.empty((B, T), dtype=torch.float32, device=old.device)
    if B and T:
        _rollout_is_kernel[(B,)](old, rollout, m, out, T, float("-inf") if low is None else low,
                                 float("inf") if high is None else high, MODE=RolloutIsMode.code(mode, "mode"),
                                 BLOCK_T=_block(T, 1024))
    return out


def off_policy_mask(logp, sampling_logp, advantages, mask, *, threshold):
    """``[B, 1]`` float32 keep-mask (spec: ``fastalign.ops.offpolicy.spec.off_policy_mask``)."""
    lp, sp = logp.float().contiguous(), sampling_logp.float().contiguous()
    adv, m = advantages.float().contiguous(), mask.to(torch.float32).contiguous()
    B, T = lp.shape
    out = torch.ones((B,), dtype=torch.float32, device=lp.device)
    if B and T:
        _off_policy_mask_kernel[(B,)](lp, sp, adv, m, out, T, float(threshold), BLOCK_T=_block(T, 1024))
    return out[:, None]


# ----------------------------------------------------------------------------------- dpo / simpo
@triton.jit
def _dpo_loss_and_slope(delta, beta, ipo_target, label_smoothing, LOSS: tl.constexpr):
    """(loss, d loss / d delta) of one pair block; delta = chosen - rejected log-ratio."""
    z = beta * delta
    if LOSS == DPO_SIGMOID:  # with conservative label smoothing
        loss = -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)
        slope = beta * (-(1.0 - label_smoothing) * _sigmoid(-z) + label_smoothing * _sigmoid(z))
    elif LOSS == DPO_HINGE:
        h = 1.0 - z
        loss = tl.maximum(h, 0.0)
        slope = tl.where(h > 0.0, -beta, 0.0)
    elif LOSS == DPO_IPO:
        r = delta - ipo_target
        loss = r * r
        slope = 2.0 * r
    elif LOSS == DPO_ROBUST:
        inv = 1.0 / (1.0 - 2.0 * label_smoothing)
        loss = (-(1.0 - label_smoothing) * _log_sigmoid(z) + label_smoothing * _log_sigmoid(-z)) * inv
        slope = beta * (-(1.0 - label_smoothing) * _sigmoid(-z) - label_smoothing * _sigmoid(z)) * inv
    else:  # never some other loss
        loss = z * float("nan")
        slope = loss
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
            LOSS=DpoLossType.code(loss_type, "loss_type"), BLOCK=block)
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
            LOSS=DpoLossType.code(loss_type, "loss_type"), NEED_CHOSEN=need_chosen, NEED_REJECTED=need_rejected,
            BLOCK=block)
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


# ------------------------------------------------------------------ d2o / kto / orpo (issue 13)
# CPO is SimPO with γ = 0 and summed log-probs: fastalign/ops/preference/triton.py reuses the SimPO
# kernels for it.
@triton.jit
def _expm1(x):
    """e^x − 1 with full relative precision near 0 (Taylor for |x| < 0.5), e^x − 1 elsewhere."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(tl.abs(x) < 0.5, p * x, tl.exp(x) - 1.0)


@triton.jit
def _d2o_fwd_kernel(ps_ptr, rs_ptr, pn_ptr, rn_ptr, loss_ptr, sample_reward_ptr, negative_reward_ptr, n, k,
                    s_ps0, s_ps1, s_rs0, s_rs1, s_pn, s_rn, beta, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    total = tl.zeros([BLOCK], tl.float32)
    for j in range(0, k):
        total += (tl.load(ps_ptr + offs * s_ps0 + j * s_ps1, mask=valid, other=0.0).to(tl.float32)
                  - tl.load(rs_ptr + offs * s_rs0 + j * s_rs1, mask=valid, other=0.0).to(tl.float32))
    sample = beta * (total / k)
    negative = alpha * (tl.load(pn_ptr + offs * s_pn, mask=valid, other=0.0).to(tl.float32)
                        - tl.load(rn_ptr + offs * s_rn, mask=valid, other=0.0).to(tl.float32))
    tl.store(loss_ptr + offs, -_log_sigmoid(sample - negative), mask=valid)
    tl.store(sample_reward_ptr + offs, sample, mask=valid)
    tl.store(negative_reward_ptr + offs, negative, mask=valid)


@triton.jit
def _d2o_bwd_kernel(grad_ptr, sample_reward_ptr, negative_reward_ptr, grad_samples_ptr, grad_negative_ptr, n, k,
                    s_grad, s_gs0, s_gs1, beta, alpha, NEED_SAMPLES: tl.constexpr, NEED_NEGATIVE: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs * s_grad, mask=valid, other=0.0).to(tl.float32)
    sample = tl.load(sample_reward_ptr + offs, mask=valid, other=0.0)
    negative = tl.load(negative_reward_ptr + offs, mask=valid, other=0.0)
    slope = -g * _sigmoid(negative - sample)  # d loss / d (sample − negative)
    if NEED_SAMPLES:
        per_sample = (slope * beta / k).to(grad_samples_ptr.dtype.element_ty)
        for j in range(0, k):
            tl.store(grad_samples_ptr + offs * s_gs0 + j * s_gs1, per_sample, mask=valid)
    if NEED_NEGATIVE:
        tl.store(grad_negative_ptr + offs, (-slope * alpha).to(grad_negative_ptr.dtype.element_ty), mask=valid)


def d2o_forward(ps, rs, pn, rn, *, beta, alpha):
    """(losses, sample_rewards, negative_rewards), all fp32 [B]; samples ``[B, K]``."""
    n, k = ps.shape
    losses, sample_rewards, negative_rewards = (torch.empty(n, dtype=torch.float32, device=ps.device)
                                                for _ in range(3))
    if n:
        block = _pair_block(n)
        _d2o_fwd_kernel[(triton.cdiv(n, block),)](
            ps, rs, pn, rn, losses, sample_rewards, negative_rewards, n, k, ps.stride(0), ps.stride(1),
            rs.stride(0), rs.stride(1), pn.stride(0), rn.stride(0), beta, alpha, BLOCK=block)
    return losses, sample_rewards, negative_rewards


def d2o_backward(grad, sample_rewards, negative_rewards, *, k, beta, alpha, samples_dtype, negative_dtype,
                 need_samples, need_negative):
    n = sample_rewards.shape[0]
    grad_samples = (torch.empty((n, k), dtype=samples_dtype, device=grad.device) if need_samples else None)
    grad_negative = torch.empty(n, dtype=negative_dtype, device=grad.device) if need_negative else None
    if n and (need_samples or need_negative):
        block = _pair_block(n)
        gs = grad_samples if need_samples else grad.view(-1, 1)
        _d2o_bwd_kernel[(triton.cdiv(n, block),)](
            grad, sample_rewards, negative_rewards, gs, grad_negative if need_negative else grad, n, k,
            grad.stride(0), gs.stride(0), gs.stride(1), beta, alpha,
            NEED_SAMPLES=need_samples, NEED_NEGATIVE=need_negative, BLOCK=block)
    return grad_samples, grad_negative


@triton.jit
def _kto_fwd_kernel(p_ptr, r_ptr, desirable_ptr, kl_ptr, loss_ptr, reward_ptr, n, s_p, s_r, s_d,
                    beta, desirable_weight, undesirable_weight, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    r = (tl.load(p_ptr + offs * s_p, mask=valid, other=0.0).to(tl.float32)
         - tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32))
    desirable = tl.load(desirable_ptr + offs * s_d, mask=valid, other=0) != 0
    x = beta * (r - tl.load(kl_ptr).to(tl.float32))
    loss = tl.where(desirable, desirable_weight * _sigmoid(-x), undesirable_weight * _sigmoid(x))  # 1 − σ(±x)
    tl.store(loss_ptr + offs, loss, mask=valid)
    tl.store(reward_ptr + offs, beta * r, mask=valid)


@triton.jit
def _kto_bwd_kernel(grad_ptr, p_ptr, r_ptr, desirable_ptr, kl_ptr, grad_p_ptr, n, s_grad, s_p, s_r, s_d,
                    beta, desirable_weight, undesirable_weight, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs * s_grad, mask=valid, other=0.0).to(tl.float32)
    r = (tl.load(p_ptr + offs * s_p, mask=valid, other=0.0).to(tl.float32)
         - tl.load(r_ptr + offs * s_r, mask=valid, other=0.0).to(tl.float32))
    desirable = tl.load(desirable_ptr + offs * s_d, mask=valid, other=0) != 0
    x = beta * (r - tl.load(kl_ptr).to(tl.float32))
    w = tl.where(desirable, -desirable_weight, undesirable_weight)
    d = g * w * beta * _sigmoid(x) * _sigmoid(-x)
    tl.store(grad_p_ptr + offs, d.to(grad_p_ptr.dtype.element_ty), mask=valid)


def kto_forward(policy, ref, desirable, kl_ref, *, beta, desirable_weight, undesirable_weight):
    """(losses, rewards) fp32 [B]; ``kl_ref`` a 0-d tensor read on the device (no host sync)."""
    n = policy.shape[0]
    losses, rewards = (torch.empty(n, dtype=torch.float32, device=policy.device) for _ in range(2))
    if n:
        d = as_loadable(desirable)
        block = _pair_block(n)
        _kto_fwd_kernel[(triton.cdiv(n, block),)](
            policy, ref, d, kl_ref, losses, rewards, n, policy.stride(0), ref.stride(0), d.stride(0),
            beta, desirable_weight, undesirable_weight, BLOCK=block)
    return losses, rewards


def kto_backward(grad, policy, ref, desirable, kl_ref, *, beta, desirable_weight, undesirable_weight):
    n = policy.shape[0]
    grad_policy = torch.empty(n, dtype=policy.dtype, device=policy.device)
    if n:
        d = as_loadable(desirable)
        block = _pair_block(n)
        _kto_bwd_kernel[(triton.cdiv(n, block),)](
            grad, policy, ref, d, kl_ref, grad_policy, n, grad.stride(0), policy.stride(0), ref.stride(0),
            d.stride(0), beta, desirable_weight, undesirable_weight, BLOCK=block)
    return grad_policy


@triton.jit
def _orpo_log_odds(w, l_):
    """(log_odds, d/dw, d/dl): log(1 − e^ℓ) = log(−expm1(ℓ)), its derivative −1/expm1(ℓ)... with signs."""
    ew, el = _expm1(w), _expm1(l_)
    log_odds = (w - l_) - (tl.log(-ew) - tl.log(-el))
    return log_odds, -1.0 / ew, 1.0 / el


@triton.jit
def _orpo_fwd_kernel(c_ptr, r_ptr, loss_ptr, log_odds_ptr, n, s_c, s_r, beta, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(c_ptr + offs * s_c, mask=valid, other=-1.0).to(tl.float32)
    l_ = tl.load(r_ptr + offs * s_r, mask=valid, other=-1.0).to(tl.float32)
    log_odds, _, _ = _orpo_log_odds(w, l_)
    tl.store(loss_ptr + offs, -beta * _log_sigmoid(log_odds), mask=valid)
    tl.store(log_odds_ptr + offs, log_odds, mask=valid)


@triton.jit
def _orpo_bwd_kernel(grad_ptr, c_ptr, r_ptr, grad_c_ptr, grad_r_ptr, n, s_grad, s_c, s_r, beta,
                     NEED_CHOSEN: tl.constexpr, NEED_REJECTED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(grad_ptr + offs * s_grad, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(c_ptr + offs * s_c, mask=valid, other=-1.0).to(tl.float32)
    l_ = tl.load(r_ptr + offs * s_r, mask=valid, other=-1.0).to(tl.float32)
    log_odds, dw, dl = _orpo_log_odds(w, l_)
    slope = -g * beta * _sigmoid(-log_odds)
    if NEED_CHOSEN:
        tl.store(grad_c_ptr + offs, (slope * dw).to(grad_c_ptr.dtype.element_ty), mask=valid)
    if NEED_REJECTED:
        tl.store(grad_r_ptr + offs, (slope * dl).to(grad_r_ptr.dtype.element_ty), mask=valid)


def orpo_forward(chosen, rejected, *, beta):
    """(losses, log_odds) fp32 [B] from length-averaged log-probs."""
    n = chosen.shape[0]
    losses, log_odds = (torch.empty(n, dtype=torch.float32, device=chosen.device) for _ in range(2))
    if n:
        block = _pair_block(n)
        _orpo_fwd_kernel[(triton.cdiv(n, block),)](chosen, rejected, losses, log_odds, n, chosen.stride(0),
                                                   rejected.stride(0), beta, BLOCK=block)
    return losses, log_odds


def orpo_backward(grad, chosen, rejected, *, beta, need_chosen, need_rejected):
    n = chosen.shape[0]
    grad_chosen = torch.empty(n, dtype=chosen.dtype, device=chosen.device) if need_chosen else None
    grad_rejected = torch.empty(n, dtype=rejected.dtype, device=rejected.device) if need_rejected else None
    if n and (need_chosen or need_rejected):
        block = _pair_block(n)
        _orpo_bwd_kernel[(triton.cdiv(n, block),)](
            grad, chosen, rejected, grad_chosen if need_chosen else grad, grad_rejected if need_rejected else grad,
            n, grad.stride(0), chosen.stride(0), rejected.stride(0), beta,
            NEED_CHOSEN=need_chosen, NEED_REJECTED=need_rejected, BLOCK=block)
    return grad_chosen, grad_rejected
