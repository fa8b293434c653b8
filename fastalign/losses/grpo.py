"""Fused-linear GRPO: the clipped policy loss from hidden states and the LM head, never ``N x V``.

Per token: ``ratio = exp(logp − old_logp)``, term ``−min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A)``
plus ``β·KL`` (k3 by default) against the reference, minus ``entropy_coef·entropy``. The terms are
aggregated by ``loss_type`` exactly as TRL's GRPOTrainer does; every normalizer comes from the mask,
so each token's gradient is computed in the forward (see :func:`fastalign.losses.base.token_loss`).
"""

from __future__ import annotations

import torch

from fastalign.ops import policy
from fastalign.ops import validation as v
from fastalign.ops.kl import KL_KINDS
from fastalign.ops.logprobs import chunked
from fastalign.ops.policy import LOSS_TYPES
from fastalign.ops.policy.spec import objective_of, row_scale

from . import base


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def clipped_policy_loss(hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None, ref_hidden=None,
                        ref_weight=None, ref_bias=None, ref_logps=None, num_items=None, num_sequences=None, beta=0.0,
                        kl_kind="k3", epsilon_low=0.2, epsilon_high=None, loss_type="dapo", max_completion_length=None,
                        temperature=1.0, entropy_coef=0.0, ignore_index=-100, chunk_size=None, mem_budget=None,
                        importance_sampling_level="token", delta=None, ratio_clip_c=None, kl_bias_correction=False,
                        token_weights=None, top_entropy_quantile=1.0, entropy_group=None, entropy_num_items=None,
                        entropies=None):
    """The GRPO/PPO policy loss (see :class:`FusedLinearGRPOLoss`); returns ``(loss, metrics)``.

    Each chunk's log-probs go through the same backend token pass as :func:`fastalign.ops.policy_loss`
    (:func:`fastalign.ops.policy.token_pass`), with every token's normalizer from the one
    :func:`~fastalign.ops.policy.spec.row_scale`: the per-token math exists once per backend.

    Sequence-level weights (GSPO) need every row's mean log-ratio before any of its tokens' gradients
    is known: the chunks then hold whole rows (still 3 GEMMs a token). The entropy mask needs the
    quantile of every valid token's entropy, and a row longer than a chunk cannot be held whole: then
    a no-grad pass computes all log-probs and entropies first (one extra logits GEMM per token, 4
    instead of 3), the token pass runs once over whole rows, and the gradient pass reuses its d logp.

    ``entropies [B, T]`` (float, detached; any value off the valid tokens) are the current policy's
    per-token entropies at ``temperature``, from a forward the caller runs anyway (the GRPO flow's
    rollout-time policy forward). With ``top_entropy_quantile < 1`` the mask then comes from them
    (:func:`fastalign.ops.entropy_mask`, same ``entropy_group``) and no pre-pass runs unless GSPO's rows
    do not fit a chunk: 3 GEMMs a token, the same loss, gradients and metrics as the pre-pass (the
    ``entropy`` metric and the bonus's gradient use the in-pass entropies). With
    ``top_entropy_quantile == 1`` they are validated and unused.

    The entropy bonus is ``entropy_coef`` times the mean entropy of the trained tokens (TRL's); a caller
    that sums token terms over micro-batches (dapo with ``num_items=1``) passes ``entropy_num_items=1`` to
    get its sum instead, normalized with the policy term.
    """
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    bt = tuple(labels.shape)
    v.float_tensor("advantages", advantages)
    if tuple(advantages.shape) not in (bt[:1], bt):
        raise ValueError(f"advantages must have shape {bt[:1]} (per sequence) or {bt} (per token), "
                         f"got {tuple(advantages.shape)}")
    v.same_device("advantages", advantages, hidden, "hidden")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None:
            v.float_tensor(name, t)
            v.same_shape(name, t, bt, ref="labels")
            v.same_device(name, t, hidden, "hidden")
    if mask is not None:
        v.mask_tensor("mask", mask, bt, hidden)
    if beta > 0 and ref_hidden is None and ref_logps is None:
        raise ValueError("beta > 0 needs the reference: pass ref_hidden (ref_weight defaults to weight) or ref_logps; "
                         "got neither")
    v.positive("temperature", temperature)
    v.positive("entropy_coef", entropy_coef, allow_zero=True)
    policy.check_options(beta=beta, kl_kind=kl_kind, clip_low=epsilon_low, clip_high=epsilon_high,
                         loss_type=loss_type, max_completion_length=max_completion_length, num_items=num_items,
                         clip_low_name="epsilon_low", clip_high_name="epsilon_high",
                         importance_sampling_level=importance_sampling_level, delta=delta, ratio_clip_c=ratio_clip_c,
                         kl_bias_correction=kl_bias_correction)
    if token_weights is not None:
        v.float_tensor("token_weights", token_weights)
        v.same_shape("token_weights", token_weights, bt, ref="labels")
        v.same_device("token_weights", token_weights, hidden, "hidden")
    if isinstance(top_entropy_quantile, bool) or not isinstance(top_entropy_quantile, (int, float)) \
            or not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be a number in (0, 1] (the fraction of valid tokens kept), "
                         f"got {top_entropy_quantile!r}")
    if entropies is not None:  # no finiteness check: positions off the valid tokens may hold anything
        v.tensor("entropies", entropies, dtypes=v.FLOAT_DTYPES)
        v.same_shape("entropies", entropies, bt, ref="labels")
        v.same_device("entropies", entropies, hidden, "hidden")

    config = policy.PolicyConfig(float(beta), kl_kind, float(epsilon_low),
                                 float(epsilon_low if epsilon_high is None else epsilon_high),
                                 importance_sampling_level, objective_of(loss_type),
                                 None if delta is None else float(delta),
                                 None if ratio_clip_c is None else float(ratio_clip_c), kl_bias_correction)
    valid = labels != ignore_index
    m = valid if mask is None else valid & (mask != 0)
    labels_eff = labels if mask is None else labels.masked_fill(~m, ignore_index)  # masked tokens cost no GEMM
    mf = m.to(torch.float32)
    counts = mf.sum(1)
    if num_sequences is not None:
        v.integer("num_sequences", num_sequences, minimum=1)
    scale_rows = row_scale(counts, loss_type, max_completion_length, num_items, length=bt[1],
                           num_sequences=num_sequences)
    keep = None  # the entropy mask, when the caller's entropies give it before any pass
    if top_entropy_quantile < 1.0 and entropies is not None:
        from fastalign.ops import entropy_mask

        keep = entropy_mask(entropies.detach().float().masked_fill(~m, 0.0), mf, quantile=top_entropy_quantile,
                            group=entropy_group).float()
    effective = mf if keep is None else mf * keep  # the trained tokens: the entropy bonus's
    ent_norm = effective.sum().clamp(min=1.0) if entropy_num_items is None else float(entropy_num_items)
    w_ent = (effective.reshape(1, -1) / ent_norm) * float(entropy_coef)
    use_ref = beta > 0
    # GSPO needs each row whole: chunks of whole rows when every row fits one chunk (one pass, 3 GEMMs a
    # token), else a no-grad pass first; the entropy mask needs every token's entropy first: from the
    # caller's ``entropies`` when given, else from that no-grad pass.
    whole_rows = importance_sampling_level != "token"
    if (top_entropy_quantile < 1.0 and keep is None) or (whole_rows and not chunked.whole_rows_fit(
            labels_eff, ignore_index, chunk_size, weight.shape[0], mem_budget)):
        return _whole_rows_policy_loss(
            hidden, weight, labels_eff, advantages, mf, old_logps, bias, ref_hidden if use_ref else None,
            ref_weight, ref_bias, ref_logps if use_ref else None, config, scale_rows, token_weights,
            top_entropy_quantile, entropy_group, float(entropy_coef), entropy_num_items, temperature,
            ignore_index, chunk_size, mem_budget, keep)
    length = bt[1]
    adv = advantages.detach().float()
    old = None if old_logps is None else old_logps.detach().float()
    tw = None if token_weights is None else token_weights.detach().float()
    if keep is not None:  # the mask multiplies the surrogate as a token weight, as in the pre-pass path
        tw = keep if tw is None else tw * keep
    if not whole_rows:  # the chunks cut across rows: one flat row, every row value per token
        adv = (adv.unsqueeze(1) if adv.dim() == 1 else adv).expand(bt)
        scale_rows = scale_rows[:, None].expand(bt)

    def rows_of(x, s, e):
        """A ``[B, ...]`` tensor's part for flat positions [s, e): whole rows, else one flat row."""
        if x is None:
            return None
        return x[s // length:e // length] if whole_rows else x.reshape(1, -1)[:, s:e]

    sums = []

    def per_token(s, e, logp, entropy, ref_logp):
        lp = logp.reshape(-1, length) if whole_rows else logp.reshape(1, -1)
        old_c = lp if old is None else rows_of(old, s, e)  # on-policy: ratio 1
        ref_c = None if ref_logp is None else ref_logp.reshape(lp.shape)
        with torch.enable_grad():
            lp_ = lp.detach().requires_grad_()
            total, chunk_sums = policy.token_pass(lp_, old_c, rows_of(adv, s, e), rows_of(mf, s, e), ref_c,
                                                  rows_of(scale_rows, s, e), config,
                                                  token_weights=rows_of(tw, s, e))
            g_lp, = torch.autograd.grad(total, lp_)
        sums.append(chunk_sums.sum(0))
        g_ent = None
        if entropy_coef:
            total = total - (entropy.reshape(1, -1) * w_ent[:, s:e]).sum()
            g_ent = -w_ent[0, s:e]
        return total.detach(), g_lp.reshape(-1), g_ent

    loss, logp, entropy, ref = base.token_loss(
        hidden, weight, labels_eff, per_token, bias=bias, ref_hidden=ref_hidden if use_ref else None,
        ref_weight=ref_weight if use_ref else None, ref_bias=ref_bias if use_ref else None,
        ref_logps=ref_logps if use_ref else None, temperature=temperature, ignore_index=ignore_index,
        chunk_size=chunk_size, mem_budget=mem_budget, row_len=length if whole_rows else None)

    with torch.no_grad():
        total_sums = torch.stack(sums).sum(0) if sums else torch.zeros(4, device=hidden.device)
        metrics = policy.full_metrics(total_sums, counts.sum(), logp, logp if old_logps is None else old_logps,
                                      advantages, mf, config)
        metrics["entropy"] = _masked_mean(entropy, mf)
    return loss, metrics


def _whole_rows_policy_loss(hidden, weight, labels, advantages, mf, old_logps, bias, ref_hidden, ref_weight, ref_bias,
                            ref_logps, config, scale, token_weights, quantile, entropy_group, entropy_coef,
                            entropy_num_items, temperature, ignore_index, chunk_size, mem_budget, keep=None):
    """The policy loss when a token's gradient depends on its whole row (GSPO) or on every token (entropy mask).

    ``keep [B, T]`` float: the entropy mask already taken from the caller's entropies (else, with
    ``quantile < 1``, it comes from this pass's).

    1. a no-grad pass: every log-prob and entropy (and the reference's, from ``ref_hidden``);
    2. the backend token pass over whole ``[B, T]`` rows, its gradient w.r.t. those log-probs
       (GSPO's ``d loss / d row_log_ratio`` carried back through the row mean by autograd);
    3. the gradient pass (3 GEMMs per chunk) hands each chunk its precomputed d logp (and d entropy).
    """
    bt = tuple(labels.shape)
    n = mf.numel()
    h2d, labels1d = hidden.reshape(n, hidden.shape[2]), labels.reshape(n)
    with torch.no_grad():
        logp, entropy = chunked.linear_logprobs_no_grad(
            h2d.detach(), weight.detach(), labels1d, bias=None if bias is None else bias.detach(),
            temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
        logp, entropy = logp.reshape(bt), entropy.reshape(bt)
        ref = None
        if ref_hidden is not None:
            ref_w, ref_b = base.reference_head(weight, bias, ref_weight, ref_bias)
            ref, _ = chunked.linear_logprobs_no_grad(ref_hidden.detach().reshape(n, ref_hidden.shape[2]), ref_w,
                                                     labels1d, bias=ref_b, temperature=temperature,
                                                     ignore_index=ignore_index, chunk_size=chunk_size,
                                                     mem_budget=mem_budget)
            ref = ref.reshape(bt)
        elif ref_logps is not None:
            ref = ref_logps.detach().float()
        weights = None if token_weights is None else token_weights.detach().float()
        effective = mf
        if keep is None and quantile < 1.0:
            from fastalign.ops import entropy_mask

            keep = entropy_mask(entropy, mf, quantile=quantile, group=entropy_group).float()
        if keep is not None:
            weights = keep if weights is None else weights * keep
            effective = mf * keep
    old = logp if old_logps is None else old_logps.detach().float()
    with torch.enable_grad():
        lp = logp.clone().requires_grad_()
        total, sums = policy.token_pass(lp, old, advantages.detach(), mf, ref, scale, config, token_weights=weights)
        g_logp, = torch.autograd.grad(total, lp)
    total = total.detach()
    g_ent = None
    if entropy_coef:
        norm = effective.sum().clamp(min=1.0) if entropy_num_items is None else float(entropy_num_items)
        w_ent = effective / norm * entropy_coef
        total = total - (entropy * w_ent).sum()
        g_ent = -w_ent.reshape(-1)
    g_flat = g_logp.reshape(-1)
    handed = []

    def per_token(s, e, _lp, _ent, _ref):
        part = total if not handed else torch.zeros_like(total)  # the whole loss once, with the first chunk
        handed.append(True)
        return part, g_flat[s:e], None if g_ent is None else g_ent[s:e]

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        loss, _, _, _ = base.token_loss(hidden, weight, labels, per_token, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
        if not handed:  # no valid token at all: no chunk ran
            loss = loss + total
    else:
        loss = total
    with torch.no_grad():
        metrics = policy.row_metrics(sums, mf.sum(1), advantages, config)
        metrics["entropy"] = _masked_mean(entropy, mf)
    return loss, metrics


class FusedLinearGRPOLoss(torch.nn.Module):
    """GRPO loss over completion hidden states ``[B, T, H]`` and the LM head ``[V, H]``.

    ``forward(hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None,
    ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, num_items=None)``:
    ``labels [B, T]`` are the completion tokens (``ignore_index`` on padding), ``advantages``
    ``[B]`` (or ``[B, T]``), ``mask`` optionally drops more tokens (e.g. tool output),
    ``old_logps [B, T]`` the sampling policy's log-probs (None = on-policy, ratio 1), the reference
    from ``ref_hidden`` (through ``ref_weight``/``ref_bias``, default the policy head) or
    ``ref_logps [B, T]``; ``num_items`` (dapo) and ``num_sequences`` (grpo, dr_grpo) are the
    optimizer step's global token and sequence counts (default: the local ones; see
    :func:`fastalign.ops.policy.spec.row_scale`, the one place normalization happens).

    ``loss_type``: ``grpo`` (per-sequence mean, then batch mean), ``bnpo`` (token mean),
    ``dr_grpo`` (sum / (B · max_completion_length)), ``dapo`` (sum / global tokens; TRL's default).
    ``epsilon_high`` defaults to ``epsilon_low`` (DAPO uses 0.28). ``beta > 0`` adds ``beta`` times
    the ``kl_kind`` estimator (k3, as TRL). Returns ``(loss, metrics)`` with TRL's names:
    ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``entropy``,
    ``approx_kl`` and, when ``beta > 0``, ``kl``.

    This year's objectives, with TRL 1.16's semantics (normalizers included): ``loss_type="cispo"``
    (``epsilon_high`` is then the absolute cap, e.g. 5), ``importance_sampling_level`` ``token`` |
    ``sequence`` (GSPO) | ``sequence_token`` (GSPO-token), ``delta`` (two-sided clip), ``ratio_clip_c``
    (dual clip), ``kl_bias_correction`` (TRL's ``use_bias_correction_kl``), ``top_entropy_quantile``
    (the fraction of valid tokens, by entropy, that get policy gradient; over the ranks of
    ``entropy_group`` when given), ``entropy_coef`` (bonus over the same tokens) and, in ``forward``,
    ``token_weights [B, T]`` (detached multipliers, e.g. :func:`fastalign.ops.rollout_is_weights`).
    Sequence levels and the entropy mask cost one extra no-grad logits GEMM per token (4 instead of
    3): every row's log-probs must be known before any token's gradient. ``forward``'s ``entropies
    [B, T]`` (the current policy's entropies at ``temperature`` from a forward the caller runs anyway,
    e.g. the GRPO flow's rollout-time one) give the entropy mask without that pass: 3 GEMMs a token
    again (GSPO too when its rows fit a chunk), with the same results. Metrics add
    ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (``cispo_clip_ratio`` for cispo).
    """

    default_loss_type = "dapo"

    def __init__(self, beta=0.0, loss_type=None, epsilon_low=0.2, epsilon_high=None, max_completion_length=None,
                 temperature=1.0, entropy_coef=0.0, kl_kind="k3", ignore_index=-100, chunk_size=None,
                 mem_budget=None, importance_sampling_level="token", delta=None, ratio_clip_c=None,
                 kl_bias_correction=False, top_entropy_quantile=1.0, entropy_group=None):
        super().__init__()
        loss_type = self.default_loss_type if loss_type is None else loss_type
        v.positive("beta", beta, allow_zero=True)
        v.choice("loss_type", loss_type, LOSS_TYPES)
        v.choice("kl_kind", kl_kind, KL_KINDS)
        v.in_range("epsilon_low", epsilon_low, 0.0, 1.0, high_inclusive=False)
        policy.check_options(beta=beta, kl_kind=kl_kind, clip_low=epsilon_low, clip_high=epsilon_high,
                             loss_type=loss_type, max_completion_length=max_completion_length, num_items=None,
                             clip_low_name="epsilon_low", clip_high_name="epsilon_high",
                             importance_sampling_level=importance_sampling_level, delta=delta,
                             ratio_clip_c=ratio_clip_c, kl_bias_correction=kl_bias_correction)
        self.beta, self.loss_type, self.kl_kind = beta, loss_type, kl_kind
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.max_completion_length, self.temperature, self.entropy_coef = max_completion_length, temperature, \
            entropy_coef
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget
        self.options = dict(importance_sampling_level=importance_sampling_level, delta=delta,
                            ratio_clip_c=ratio_clip_c, kl_bias_correction=kl_bias_correction,
                            top_entropy_quantile=top_entropy_quantile, entropy_group=entropy_group)

    def forward(self, hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logps=None, num_items=None, num_sequences=None, token_weights=None,
                entropy_num_items=None, entropies=None):
        return clipped_policy_loss(
            hidden, weight, labels, advantages=advantages, mask=mask, old_logps=old_logps, bias=bias,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
            num_items=num_items, num_sequences=num_sequences, beta=self.beta, kl_kind=self.kl_kind,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length, temperature=self.temperature,
            entropy_coef=self.entropy_coef, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            mem_budget=self.mem_budget, token_weights=token_weights, entropy_num_items=entropy_num_items,
            entropies=entropies, **self.options)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high}, importance_sampling_level="
                f"{self.options['importance_sampling_level']!r}")


def fused_linear_grpo_loss(hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None,
                           ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, num_items=None, beta=0.0,
                           kl_kind="k3", epsilon_low=0.2, epsilon_high=None, loss_type="dapo",
                           max_completion_length=None, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                           chunk_size=None, mem_budget=None, **options):
    """Functional form of :class:`FusedLinearGRPOLoss`; returns ``(loss, metrics)``.

    ``options``: ``importance_sampling_level``, ``delta``, ``ratio_clip_c``, ``kl_bias_correction``,
    ``token_weights``, ``top_entropy_quantile``, ``entropy_group``, ``entropies`` (see :func:`clipped_policy_loss`).
    """
    return clipped_policy_loss(
        hidden, weight, labels, advantages=advantages, mask=mask, old_logps=old_logps, bias=bias,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, num_items=num_items,
        beta=beta, kl_kind=kl_kind, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length, temperature=temperature, entropy_coef=entropy_coef,
        ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget, **options)
