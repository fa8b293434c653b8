"""Per-token log-probs and entropy: from hidden states and an LM head, or from logits."""

from __future__ import annotations

import math

import torch

from .. import dispatch
from .. import validation as v
from . import chunked, cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref

__all__ = ["token_logprobs", "logprobs_from_logits", "sequence_logprobs"]  # fastalign.ops re-exports these


def _check_temperature_ignore(temperature, ignore_index):
    v.positive("temperature", temperature)
    v.integer("ignore_index", ignore_index)


def _check_head_options(softcap, logit_scale, return_extras) -> tuple[str, ...]:
    """Validate the logit transform and the extras; returns the extras as a tuple of names."""
    if softcap is not None:
        v.positive("softcap", softcap)
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if isinstance(return_extras, str):
        raise ValueError(f"return_extras must be a tuple of names from {chunked.EXTRAS}, got the string "
                         f"{return_extras!r} (write ({return_extras!r},))")
    extras = tuple(return_extras)
    for name in extras:
        if name not in chunked.EXTRAS:
            raise ValueError(f"return_extras must name outputs among {chunked.EXTRAS}, got {name!r}")
    if len(set(extras)) != len(extras):
        raise ValueError(f"return_extras must not repeat a name, got {extras}")
    return extras


def _as_dict(logp, entropy, extra, return_entropy):
    out = {"logp": logp}
    if return_entropy:
        out["entropy"] = entropy
    out.update(extra)
    return out


def token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, chunk_size=None, mem_budget=None, grad_filter_eps=0.0,
                   softcap=None, logit_scale=1.0, return_extras=()):
    """log_softmax((hidden @ weight.T + bias) / temperature)[label] per position, never N x V.

    hidden ``[..., H]``, weight ``[V, H]``, labels ``[...]`` integer. Returns fp32 ``logp [...]``
    (0.0 where ``labels == ignore_index``) and, with ``return_entropy=True``, ``(logp, entropy)``.
    Differentiable w.r.t. hidden, weight and bias through both outputs. No label shifting inside.
    ``chunk_size`` caps the tokens per chunk; by default it is chosen from ``mem_budget`` (bytes;
    default ``FASTALIGN_MEM_BUDGET``). ``grad_filter_eps > 0`` lets GPU backends skip vocabulary
    blocks whose softmax gradient is below it (an approximation; 0 = exact).

    TRL's head options: the logits become ``softcap * tanh(logit_scale * z / softcap)`` (no tanh when
    ``softcap`` is None) before the temperature, differentiably. ``return_extras``, a tuple of names
    among ``"log_sum_p2"`` (``log sum_v p_v^2``), ``"mean_logit"`` (mean of the logits over the
    vocabulary, after transform and temperature) and ``"is_top1"`` (bool: the label is the first
    argmax), each computed only when named, makes the result a dict ``{"logp", "entropy" (with
    return_entropy), <each extra>}``; the extras are non-differentiable and 0/False where ignored.
    """
    v.float_tensor("hidden", hidden, min_dim=1)
    v.float_tensor("weight", weight, dim=2)
    v.int_tensor("labels", labels)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, {hidden.shape[-1]}] (H = hidden.shape[-1]), got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    v.same_shape("labels", labels, hidden.shape[:-1], ref="hidden without its last dim")
    v.same_device("weight", weight, hidden, "hidden")
    v.same_device("labels", labels, hidden, "hidden")
    if bias is not None:
        v.float_tensor("bias", bias, dim=1)
        v.same_shape("bias", bias, (weight.shape[0],), ref="[V]")
        v.same_device("bias", bias, hidden, "hidden")
    _check_temperature_ignore(temperature, ignore_index)
    if chunk_size is not None:
        v.integer("chunk_size", chunk_size, minimum=1)
    if mem_budget is not None:
        v.integer("mem_budget", mem_budget, minimum=1)
    v.in_range("grad_filter_eps", grad_filter_eps, 0.0, 1.0)
    extras = _check_head_options(softcap, logit_scale, return_extras)
    v.labels_in_range(labels, weight.shape[0], ignore_index)
    _, impl = dispatch.select("token_logprobs", hidden.device)
    head = {}
    if softcap is not None or logit_scale != 1.0 or extras:  # today's impl signature when nothing new is asked
        head = dict(softcap=None if softcap is None else float(softcap), logit_scale=float(logit_scale),
                    extras=extras)
    out = impl(hidden, weight, labels, bias=bias, temperature=float(temperature),
               ignore_index=ignore_index, return_entropy=bool(return_entropy or extras), chunk_size=chunk_size,
               mem_budget=mem_budget, grad_filter_eps=float(grad_filter_eps), **head)
    return _as_dict(*out, return_entropy) if extras else out


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                         inplace_backward=False, softcap=None, logit_scale=1.0, return_extras=()):
    """The same outputs as :func:`token_logprobs` from materialized ``logits [..., V]``.

    ``inplace_backward=True`` lets the backward write d(logits) into the logits buffer (the
    caller promises not to read ``logits`` afterwards), halving peak memory on backends that
    support it. ``softcap``, ``logit_scale`` and ``return_extras`` as in :func:`token_logprobs`
    (a transform makes one float32 copy of the logits, which the in-place backward then uses).
    """
    v.float_tensor("logits", logits, min_dim=1)
    v.int_tensor("labels", labels)
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension >= 1, got shape {tuple(logits.shape)}")
    v.same_shape("labels", labels, logits.shape[:-1], ref="logits without its last dim")
    v.same_device("labels", labels, logits, "logits")
    _check_temperature_ignore(temperature, ignore_index)
    extras = _check_head_options(softcap, logit_scale, return_extras)
    v.labels_in_range(labels, logits.shape[-1], ignore_index)
    _, impl = dispatch.select("logprobs_from_logits", logits.device)
    tf = chunked.LogitTransform(float(logit_scale), None if softcap is None else float(softcap))
    if not tf.identity:  # differentiable torch ops: every backend's row pass then sees the transformed logits
        logits = logits.float() * tf.scale
        if tf.softcap is not None:
            logits = torch.tanh(logits / tf.softcap) * tf.softcap
    out = impl(logits, labels, temperature=float(temperature), ignore_index=ignore_index,
               return_entropy=bool(return_entropy or extras), inplace_backward=bool(inplace_backward))
    if not extras:
        return out
    with torch.no_grad():
        z2d = logits.detach().reshape(-1, logits.shape[-1]).float()
        lab = labels.reshape(-1)
        valid = lab != ignore_index
        rows = valid.nonzero().squeeze(1)
        lead = labels.shape
        extra = {}
        for name, x in zip(extras, chunked.row_extras(z2d.index_select(0, rows), lab.index_select(0, rows).long(),
                                                      float(temperature), extras)):
            full = torch.zeros(lab.shape[0], dtype=x.dtype, device=x.device)
            extra[name] = full.index_copy_(0, rows, x).reshape(lead)
    return _as_dict(out[0], out[1], extra, return_entropy)


def sequence_logprobs(token_logp, mask, *, average=False):
    """Sum (or, with ``average=True``, mean) of ``token_logp [B, T]`` over ``mask`` → ``[B]``."""
    v.float_tensor("token_logp", token_logp, dim=2)
    v.mask_tensor("mask", mask, token_logp.shape, token_logp)
    if average:
        v.nonempty_rows("mask", mask)
    _, impl = dispatch.select("sequence_logprobs", token_logp.device)
    return impl(token_logp, mask, average=bool(average))


# The references are the torch backend, except token_logprobs: token-chunked (never N x V) with the
# PyTorch row passes; cpu.py registers the same loop with the native row passes.
@dispatch.register("token_logprobs", "torch")
def _token_logprobs_torch(hidden, weight, labels, **kw):
    return chunked.token_logprobs_chunked(hidden, weight, labels, rows=chunked.TORCH_ROWS, **kw)


dispatch.register("sequence_logprobs", "torch")(ref.sequence_logprobs)


@dispatch.register("logprobs_from_logits", "torch")
def _logprobs_from_logits_torch(logits, labels, *, temperature, ignore_index, return_entropy, inplace_backward):
    return ref.logprobs_from_logits(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)
