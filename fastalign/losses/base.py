"""What every fused-linear loss shares: input checks, the token-chunk loops and the autograd plumbing.

A loss file states only its formula; this module turns it into a loss over hidden states and an
LM head without ever building an ``N x V`` tensor. Both loops rest on the primitives of
:mod:`fastalign.ops.logprobs.chunked` (one GEMM per chunk without gradient, three with):

* :func:`token_loss` — GRPO/PPO: the loss is a weighted sum of per-token terms whose weights
  (the normalizers) come from the mask, so each token's gradient is known as soon as its chunk's
  log-prob is: forward and backward of a chunk happen together (3 GEMMs), the reference chunk
  (when given as hidden states) is computed in the same loop under ``no_grad`` (1 GEMM).
* :func:`group_loss` (and :func:`pair_loss`, its two-sequence case) — DPO/SimPO/ORPO/CPO pairs,
  D²O's K samples + negative, KTO's single completions: a group's term depends only on its own
  sequences and the ``1/B`` mean is known up front, so a pair's token gradients are fixed once the pair's sequence
  log-probs are. Consecutive pairs whose logits fit the memory budget together keep those logits:
  one GEMM, the fused row pass (:func:`fastalign.ops.logprobs_from_logits`, gradient written in
  place), the pair losses, two GEMMs into one float32 weight-gradient buffer (4 GEMMs with the
  reference). Pairs too long for the budget are token-chunked: a no-grad pass for the sequence
  log-probs, then the pass with gradients (5 GEMMs with the reference).

The loss and all its gradients therefore exist at the end of the forward; :class:`_Precomputed`
hands them to autograd, and the backward only scales them by the incoming gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fastalign import ops
from fastalign.ops import validation as v
from fastalign.ops.logprobs import chunked

TokenLossFn = Callable[[int, int, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor | None, Tensor | None]"]
PairLossFn = Callable[[Tensor, Tensor, "Tensor | None", "Tensor | None"], Tensor]
GroupLossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


# ------------------------------------------------------------------------------------ input checks
def check_common(hidden, weight, labels, *, bias, ref_hidden, ref_weight, ref_bias, ref_logps, ignore_index,
                 chunk_size, mem_budget) -> None:
    """Shapes, dtypes, devices and label range of the arguments every fused-linear loss takes."""
    v.float_tensor("hidden", hidden, dim=3)
    v.float_tensor("weight", weight, dim=2)
    v.int_tensor("labels", labels, dim=2)
    s, t, h = hidden.shape
    if weight.shape[1] != h or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, {h}] (H = hidden.shape[-1], V >= 1), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    v.same_shape("labels", labels, (s, t), ref="hidden without its last dim")
    v.same_device("weight", weight, hidden, "hidden")
    v.same_device("labels", labels, hidden, "hidden")
    vocab = weight.shape[0]
    if bias is not None:
        v.float_tensor("bias", bias, dim=1)
        v.same_shape("bias", bias, (vocab,), ref="[V]")
        v.same_device("bias", bias, hidden, "hidden")
    if ref_hidden is not None:
        if ref_logps is not None:
            raise ValueError("pass either ref_hidden or ref_logps, not both; got both")
        v.float_tensor("ref_hidden", ref_hidden, dim=3)
        v.same_shape("ref_hidden", ref_hidden, hidden.shape[:2] + ref_hidden.shape[2:], ref="hidden's [S, T]")
        v.same_device("ref_hidden", ref_hidden, hidden, "hidden")
        if ref_weight is not None:
            v.float_tensor("ref_weight", ref_weight, dim=2)
            if ref_weight.shape != (vocab, ref_hidden.shape[2]):
                raise ValueError(f"ref_weight must have shape [{vocab}, {ref_hidden.shape[2]}] ([V, ref H]), "
                                 f"got {tuple(ref_weight.shape)}")
            if ref_weight.dtype != ref_hidden.dtype:
                raise TypeError(f"ref_weight must have the dtype of ref_hidden ({ref_hidden.dtype}), "
                                f"got {ref_weight.dtype}")
            v.same_device("ref_weight", ref_weight, hidden, "hidden")
        else:
            if ref_hidden.shape[2] != h:
                raise ValueError(f"ref_hidden must have hidden size {h} when ref_weight defaults to weight, "
                                 f"got shape {tuple(ref_hidden.shape)}")
            if ref_hidden.dtype != hidden.dtype:
                raise TypeError(f"ref_hidden must have the dtype of weight ({weight.dtype}) when ref_weight "
                                f"defaults to weight, got {ref_hidden.dtype}")
        if ref_bias is not None:
            v.float_tensor("ref_bias", ref_bias, dim=1)
            v.same_shape("ref_bias", ref_bias, (vocab,), ref="[V]")
            v.same_device("ref_bias", ref_bias, hidden, "hidden")
    elif ref_weight is not None or ref_bias is not None:
        name = "ref_weight" if ref_weight is not None else "ref_bias"
        raise ValueError(f"{name} is only used with ref_hidden, which is None")
    v.integer("ignore_index", ignore_index)
    if chunk_size is not None:
        v.integer("chunk_size", chunk_size, minimum=1)
    if mem_budget is not None:
        v.integer("mem_budget", mem_budget, minimum=1)
    v.labels_in_range(labels, vocab, ignore_index)


def reference_head(weight, bias, ref_weight, ref_bias):
    """``ref_weight`` defaults to ``weight`` — and then ``ref_bias`` to ``bias``: one frozen shared head."""
    if ref_weight is None:
        return weight.detach(), (bias.detach() if bias is not None and ref_bias is None else ref_bias)
    return ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


# ----------------------------------------------------------------------------- autograd plumbing
class _Precomputed(torch.autograd.Function):
    """A loss whose gradients w.r.t. hidden, weight and bias were all computed in the forward.

    ``compute(need_hidden, need_weight, need_bias)`` returns ``(loss, grad_hidden, grad_weight,
    grad_bias)``; the backward scales them by the incoming gradient (1 in the usual
    ``loss.backward()``, then no copy is made).
    """

    @staticmethod
    def forward(ctx, compute, hidden, weight, bias):
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        loss, gh, gw, gb = compute(need_h, need_w, need_b and bias is not None)
        gh = gh.to(hidden.dtype) if gh is not None and need_h else None
        gw = gw.to(weight.dtype) if gw is not None and need_w else None
        gb = gb.to(bias.dtype) if gb is not None and bias is not None and need_b else None
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        gh, gw, gb = ctx.saved_tensors
        if not bool(grad_loss == 1):
            gh, gw, gb = (None if g is None else g * grad_loss.to(g.dtype) for g in (gh, gw, gb))
        return None, gh, gw, gb


def attach(compute, hidden, weight, bias) -> Tensor:
    """Run ``compute`` (see :class:`_Precomputed`) and return its loss wired into the autograd graph.

    Under ``torch.no_grad()`` (evaluation) or when nothing requires grad, only the forward passes run.
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return compute(False, False, False)[0]
    return _Precomputed.apply(compute, hidden, weight, bias)


# ---------------------------------------------------------------------------- GRPO/PPO: per token
def token_loss(hidden, weight, labels, per_token: TokenLossFn, *, bias=None, ref_hidden=None, ref_weight=None,
               ref_bias=None, ref_logps=None, temperature=1.0, ignore_index=-100, chunk_size=None,
               mem_budget=None, row_len=None):
    """Loss = sum over chunks of ``per_token(s, e, logp, entropy, ref_logp)`` for flat positions [s, e).

    ``per_token`` returns ``(loss_sum, g_logp, g_entropy)``: the chunk's contribution to the loss
    (its tokens' terms *already weighted* by their normalizers; 0 where a token does not count) and
    its gradients w.r.t. ``logp`` and ``entropy`` (fp32 ``[e - s]``, either may be None), e.g. from
    a backend's fused token pass. ``labels`` must carry ``ignore_index`` wherever the weight is 0,
    so those rows cost no GEMM. ``ref_logp`` is the reference chunk (computed from ``ref_hidden``
    in the same loop, or sliced from ``ref_logps``), or None when neither is given. With ``row_len``
    (``hidden``'s T) every chunk holds whole rows: ``s`` and ``e`` are multiples of it.

    Returns ``(loss, logp [S, T], entropy [S, T], ref_logp [S, T] or None)``; only ``loss`` is
    differentiable (w.r.t. hidden, weight and bias).
    """
    s_, t_, h_ = hidden.shape
    n = s_ * t_
    hidden2d = hidden.reshape(n, h_)
    labels1d = labels.reshape(n)
    ref2d = None if ref_hidden is None else ref_hidden.detach().reshape(n, ref_hidden.shape[2])
    ref_w, ref_b = reference_head(weight, bias, ref_weight, ref_bias)
    given_ref = None if ref_logps is None else ref_logps.detach().reshape(n).float()
    ref_out = None if ref2d is None else torch.zeros(n, dtype=torch.float32, device=hidden.device)
    out = {}

    def ref_chunk(s, e, chunk):
        if ref2d is not None:
            lp, _ = chunked.linear_logprobs_no_grad(ref2d[s:e], ref_w, labels1d[s:e], bias=ref_b,
                                                    temperature=temperature, ignore_index=ignore_index,
                                                    chunk_size=chunk, mem_budget=mem_budget)
            ref_out[s:e] = lp
            return lp
        return None if given_ref is None else given_ref[s:e]

    def compute(need_h, need_w, need_b):
        if not (need_h or need_w or need_b):  # evaluation: forward passes only
            logp, entropy = chunked.linear_logprobs_no_grad(
                hidden2d.detach(), weight.detach(), labels1d, bias=None if bias is None else bias.detach(),
                temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
            total = per_token(0, n, logp, entropy, ref_chunk(0, n, chunk_size))[0]
            out.update(logp=logp, entropy=entropy)
            return total, None, None, None
        totals = []

        def grad_fn(s, e, lp, ent):
            ref = ref_chunk(s, e, max(1, e - s))  # the policy chunk's rows: within the budget
            chunk_total, g_lp, g_ent = per_token(s, e, lp, ent, ref)
            totals.append(chunk_total.detach())
            return g_lp, g_ent

        logp, entropy, gh, gw, gb = chunked.linear_logprobs_grad_in_forward(
            hidden2d, weight, labels1d, grad_fn, bias=bias, temperature=temperature, ignore_index=ignore_index,
            chunk_size=chunk_size, mem_budget=mem_budget, need_weight_grad=need_w, need_bias_grad=need_b,
            row_len=row_len)
        out.update(logp=logp, entropy=entropy)
        total = torch.stack(totals).sum() if totals else torch.zeros((), dtype=torch.float32, device=hidden.device)
        return total, gh.reshape(hidden.shape), gw, gb

    loss = attach(compute, hidden, weight, bias)
    ref_full = ref_out if ref_out is not None else given_ref
    shape = (s_, t_)
    return (loss, out["logp"].reshape(shape), out["entropy"].reshape(shape),
            None if ref_full is None else ref_full.reshape(shape))


# ---------------------------------------------------- DPO/SimPO/ORPO/CPO pairs, D²O/KTO groups
def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _segment_sum(values: Tensor, segment: Tensor, n_segments: int) -> Tensor:
    return torch.zeros(n_segments, dtype=values.dtype, device=values.device).index_add_(0, segment, values)


def _group_pairs(pair_tokens: list[int], vocab: int, chunk_size, mem_budget) -> tuple[list[list[int]], list[int]]:
    """Consecutive pairs whose logits fit one chunk together (kept), and the pairs too long for one."""
    def fits(n):
        return n <= chunk_size if chunk_size is not None else chunked.choose_chunk_size(n, vocab, mem_budget) >= n

    groups, long_pairs, current, current_n = [], [], [], 0
    for i, n in enumerate(pair_tokens):
        if not fits(n):
            long_pairs.append(i)
            continue
        if current and not fits(current_n + n):
            groups.append(current)
            current, current_n = [], 0
        current.append(i)
        current_n += n
    if current:
        groups.append(current)
    return groups, long_pairs


def group_loss(hidden, weight, labels, per_group: GroupLossFn, *, rows, average, nll_rows=None, nll_coef=0.0,
               bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, ignore_index=-100,
               chunk_size=None, mem_budget=None, head_extras=()):
    """Mean over groups of ``per_group(groups [P], scores [P, G], ref_scores [P, G] or None)`` plus an NLL term.

    ``groups`` are the indices (into ``rows``) of the P groups a call scores.

    ``rows [P_total, G]`` (int64): the sequences (indices into ``hidden``'s first dim) of each group,
    each sequence in at most one group — a DPO pair is ``(chosen, rejected)``, a D²O group its K
    samples then the negative. Sequences in no group get no GEMM. A sequence's score is the sum of
    its token log-probs (their mean with ``average=True``; a sequence without tokens counts as
    length 1, as in TRL). ``nll_coef > 0`` adds ``nll_coef * (−mean log-prob of the tokens of the
    sequences where nll_rows [S] is True)``. Reference scores come from ``ref_hidden`` (same chunk
    loops, no gradient), from ``ref_logps`` (``[S]`` per-sequence sums or ``[S, T]`` per token),
    or are None.

    A group's term depends only on its own sequences and the ``1/P`` mean is known up front, so
    consecutive groups whose logits fit the memory budget keep them (4 GEMMs with the reference);
    groups too long for it are token-chunked (5 GEMMs): memory never grows with the group size.

    ``head_extras`` (names of :func:`fastalign.ops.logprobs.chunked.row_extras`: ``mean_logit``,
    ``is_top1``, ``log_sum_p2``) are read off the policy logits of the grouped tokens while they exist
    (for metrics; no gradient); groups too long for one chunk pay one more no-grad GEMM for them.

    Returns ``(loss, info)``: info holds fp32 ``[S]`` vectors ``scores``, ``sums`` and ``ref_sums``
    (or None), ``losses [P_total]``, scalars ``entropy_sum``, ``n_tokens`` (tokens of grouped
    sequences), ``nll``, and ``extras``: ``{name: [S, T]}`` for ``head_extras`` (zero elsewhere).
    """
    s_, t_, h_ = hidden.shape
    n_groups = rows.shape[0]
    dev = hidden.device
    vocab = weight.shape[0]
    hidden2d = hidden.reshape(s_ * t_, h_)
    labels1d = labels.reshape(-1)
    valid = labels != ignore_index
    counts_t = valid.sum(1)
    counts = counts_t.tolist()
    rows_list = rows.tolist()
    rows = rows.to(dev)
    denom = counts_t.clamp(min=1).to(torch.float32) if average else torch.ones(s_, dtype=torch.float32, device=dev)
    nll_mask = (torch.zeros(s_, dtype=torch.bool, device=dev) if nll_rows is None else nll_rows.to(dev))
    n_nll_tokens = max(1, int(counts_t[nll_mask].sum())) if nll_coef else 1
    ref2d = None if ref_hidden is None else ref_hidden.detach().reshape(s_ * t_, ref_hidden.shape[2])
    ref_w, ref_b = reference_head(weight, bias, ref_weight, ref_bias)

    ref_sum = None  # [S] reference sums when given; filled by the passes when computed
    if ref_logps is not None:
        r = ref_logps.detach().float()
        ref_sum = (r * valid).sum(1) if r.dim() == 2 else r.clone()
    elif ref2d is not None:
        ref_sum = torch.zeros(s_, dtype=torch.float32, device=dev)

    seq_sum = torch.zeros(s_, dtype=torch.float32, device=dev)
    losses = torch.zeros(n_groups, dtype=torch.float32, device=dev)
    stats = {"entropy_sum": torch.zeros((), dtype=torch.float32, device=dev),
             "nll": torch.zeros((), dtype=torch.float32, device=dev)}

    def positions(groups):
        """Flat positions of the valid tokens of ``groups`` (their sequences in order) and their sequence ids."""
        seq_rows = torch.tensor([r for i in groups for r in rows_list[i]], dtype=torch.int64, device=dev)
        sub = valid.index_select(0, seq_rows)
        local_row, col = sub.nonzero(as_tuple=True)
        seq = seq_rows[local_row]
        return seq * t_ + col, seq

    def reference_pass(pos, seq, chunk):
        if ref2d is None:
            return
        lp, _ = chunked.linear_logprobs_no_grad(ref2d.index_select(0, pos), ref_w, labels1d.index_select(0, pos),
                                                bias=ref_b, ignore_index=ignore_index, chunk_size=chunk,
                                                mem_budget=mem_budget)
        ref_sum.index_add_(0, seq, lp)

    extras = {k: torch.zeros(s_ * t_, dtype=torch.bool if k == "is_top1" else torch.float32, device=dev)
              for k in head_extras}

    def keep_extras(pos, z, lab):
        for k, value in zip(head_extras, chunked.row_extras(z, lab, 1.0, tuple(head_extras))):
            extras[k].index_copy_(0, pos, value)

    def extras_pass(pos, h_sel, lab_sel):
        """The extras of tokens whose logits are not kept: one no-grad GEMM."""
        if head_extras and pos.numel():
            with torch.no_grad():
                out = ops.token_logprobs(h_sel.detach(), weight.detach(), lab_sel,
                                         bias=None if bias is None else bias.detach(), return_extras=head_extras)
            for k in head_extras:
                extras[k].index_copy_(0, pos, out[k])

    def loss_of(groups_t, seq, lp):
        """Differentiable (in ``lp``) contribution of the groups ``groups_t`` whose tokens are ``lp``."""
        sums = _segment_sum(lp, seq, s_)
        members = rows.index_select(0, groups_t)  # [P, G]
        scores = sums[members] / denom[members]
        ref_scores = None if ref_sum is None else ref_sum[members] / denom[members]
        pl = per_group(groups_t, scores, ref_scores)
        total = pl.sum() / n_groups
        nll = None
        if nll_coef:
            nll = -(lp * nll_mask[seq]).sum() / n_nll_tokens
            total = total + nll_coef * nll
        return total, pl, nll, sums

    def record(groups_t, pl, nll, sums, ent_sum):
        losses[groups_t] = pl.detach()
        members = rows.index_select(0, groups_t).reshape(-1)
        seq_sum[members] = sums.detach()[members]
        stats["entropy_sum"] += ent_sum
        if nll is not None:
            stats["nll"] += nll.detach()

    def compute(need_h, need_w, need_b):
        grad = need_h or need_w or need_b
        gh = torch.zeros_like(hidden2d) if need_h else None
        gw = gb = None
        groups, long_groups = _group_pairs([sum(counts[r] for r in members) for members in rows_list], vocab,
                                           chunk_size, mem_budget)
        total = torch.zeros((), dtype=torch.float32, device=dev)

        def add_grads(pos, g_h, g_w, g_b):
            nonlocal gw, gb
            if gh is not None:
                gh.index_copy_(0, pos, g_h)
            if g_w is not None:
                gw = g_w if gw is None else gw.add_(g_w)
            if g_b is not None:
                gb = g_b if gb is None else gb.add_(g_b)

        # Groups that fit the budget: the group's logits are kept (one GEMM), the row pass gives its log-probs,
        # the pair losses give d(logp), the row kernel turns the logits into their gradient in place, and two
        # GEMMs finish: 3 GEMMs + the reference, accumulating into ONE float32 weight-gradient buffer.
        head = None
        for pairs in groups:
            pos, seq = positions(pairs)
            n_tok = pos.numel()
            reference_pass(pos, seq, chunk_size)
            pairs_t = torch.tensor(pairs, dtype=torch.int64, device=dev)
            h_sel, lab_sel = hidden2d.index_select(0, pos), labels1d.index_select(0, pos)
            if grad and n_tok:
                if head is None:
                    head = (_f32(weight.detach()), None if bias is None else _f32(bias.detach()))
                    gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
                    gb = torch.zeros(bias.shape, dtype=torch.float32, device=dev) if need_b else None
                h32 = _f32(h_sel.detach())
                z = torch.mm(h32, head[0].t()) if head[1] is None else torch.addmm(head[1], h32, head[0].t())
                if head_extras:  # before the in-place backward turns z into its gradient
                    keep_extras(pos, z, lab_sel)
                with torch.enable_grad():
                    z.requires_grad_()
                    lp, ent = ops.logprobs_from_logits(z, lab_sel, ignore_index=ignore_index, return_entropy=True,
                                                       inplace_backward=True)
                    ent_sum = ent.detach().sum()
                    part, pl, nll, sums = loss_of(pairs_t, seq, lp)
                    g_z, = torch.autograd.grad(part, z)  # written into z's buffer: no second [n, V] tensor
                # Nothing of the graph may outlive the group: its outputs hold the logits buffer.
                part, pl, sums = part.detach(), pl.detach(), sums.detach()
                nll = None if nll is None else nll.detach()
                del z, lp, ent
                if gh is not None:
                    gh.index_copy_(0, pos, torch.mm(g_z, head[0]).to(gh.dtype))
                if gw is not None:
                    gw.addmm_(g_z.t(), h32)
                if gb is not None:
                    gb.add_(g_z.sum(0))
                del g_z
            else:
                lp, ent = (chunked.linear_logprobs_no_grad(h_sel, weight, lab_sel, bias=bias,
                                                           ignore_index=ignore_index, chunk_size=max(1, n_tok))
                           if n_tok else (h_sel.new_zeros(0, dtype=torch.float32),) * 2)
                part, pl, nll, sums = loss_of(pairs_t, seq, lp)
                ent_sum = ent.sum()
                extras_pass(pos, h_sel, lab_sel)
            total = total + part
            record(pairs_t, pl, nll, sums, ent_sum)

        # Groups too long for one chunk: token-chunked sequence log-probs first, then the gradient pass.
        if long_groups:
            pos, seq = positions(long_groups)
            # Stream one sequence's worth of tokens at a time (when the budget allows more): a D²O group's
            # K samples then cost the logits of one sequence, not of K, whatever K is.
            long_chunk = chunk_size
            if long_chunk is None:
                longest = max(counts[r] for g_ in long_groups for r in rows_list[g_])
                long_chunk = max(1, min(chunked.choose_chunk_size(pos.numel(), vocab, mem_budget), longest))
            reference_pass(pos, seq, long_chunk)
            pairs_t = torch.tensor(long_groups, dtype=torch.int64, device=dev)
            h_sel, lab_sel = hidden2d.index_select(0, pos), labels1d.index_select(0, pos)
            lp, ent = chunked.linear_logprobs_no_grad(h_sel, weight, lab_sel, bias=bias, ignore_index=ignore_index,
                                                      chunk_size=long_chunk, mem_budget=mem_budget)
            extras_pass(pos, h_sel, lab_sel)
            with torch.enable_grad():
                lp_ = lp.requires_grad_(grad)
                part, pl, nll, sums = loss_of(pairs_t, seq, lp_)
                g_tok = torch.autograd.grad(part, lp_)[0] if part.requires_grad else None
            total = total + part.detach()
            record(pairs_t, pl, nll, sums, ent.sum())
            if g_tok is not None:
                _, _, g_h, g_w, g_b = chunked.linear_logprobs_grad_in_forward(
                    h_sel, weight, lab_sel, lambda s, e, lp, ent: (g_tok[s:e], None), bias=bias,
                    ignore_index=ignore_index, chunk_size=long_chunk, mem_budget=mem_budget,
                    need_weight_grad=need_w, need_bias_grad=need_b)
                add_grads(pos, g_h, g_w, g_b)
        if need_w and gw is None:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        if need_b and gb is None:
            gb = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
        return total, None if gh is None else gh.reshape(hidden.shape), gw, gb

    loss = attach(compute, hidden, weight, bias)
    info = {"scores": seq_sum / denom, "sums": seq_sum, "ref_sums": ref_sum, "losses": losses,
            "entropy_sum": stats["entropy_sum"], "n_tokens": sum(counts[r] for m in rows_list for r in m),
            "nll": stats["nll"], "extras": {k: x.reshape(s_, t_) for k, x in extras.items()}}
    return loss, info


def pair_loss(hidden, weight, labels, per_pair: PairLossFn, *, average, nll_coef=0.0, bias=None, ref_hidden=None,
              ref_weight=None, ref_bias=None, ref_logps=None, ignore_index=-100, chunk_size=None, mem_budget=None,
              head_extras=()):
    """Mean over pairs of ``per_pair(chosen, rejected, ref_chosen, ref_rejected)`` plus an NLL term.

    ``hidden [2B, T, H]``: the B chosen sequences, then the B rejected ones (:func:`group_loss`
    with groups ``(i, B + i)``). ``per_pair`` gets ``[P]`` vectors and returns ``[P]`` losses.
    ``nll_coef > 0`` adds ``nll_coef * (−mean log-prob of all chosen tokens)``.

    Returns ``(loss, info)``: info holds ``[B]`` fp32 vectors ``chosen``, ``rejected`` (scores),
    ``chosen_sum``, ``rejected_sum``, ``ref_chosen_sum``, ``ref_rejected_sum`` (or None),
    ``losses``, scalars ``entropy_sum``, ``n_tokens``, ``nll``, and ``extras`` (see :func:`group_loss`).
    """
    s_ = hidden.shape[0]
    b = s_ // 2
    idx = torch.arange(b, dtype=torch.int64)
    rows = torch.stack([idx, idx + b], 1)

    def per_group(_groups, scores, ref_scores):
        if ref_scores is None:
            return per_pair(scores[:, 0], scores[:, 1], None, None)
        return per_pair(scores[:, 0], scores[:, 1], ref_scores[:, 0], ref_scores[:, 1])

    nll_rows = torch.arange(s_) < b
    loss, g = group_loss(hidden, weight, labels, per_group, rows=rows, average=average, nll_rows=nll_rows,
                         nll_coef=nll_coef, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                         ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                         mem_budget=mem_budget, head_extras=head_extras)
    ref_sum = g["ref_sums"]
    info = {
        "chosen": g["scores"][:b], "rejected": g["scores"][b:],
        "chosen_sum": g["sums"][:b], "rejected_sum": g["sums"][b:],
        "ref_chosen_sum": None if ref_sum is None else ref_sum[:b],
        "ref_rejected_sum": None if ref_sum is None else ref_sum[b:],
        "losses": g["losses"], "entropy_sum": g["entropy_sum"], "n_tokens": g["n_tokens"], "nll": g["nll"],
        "extras": g["extras"],
    }
    return loss, info
