"""The ``triton`` backend of token_logprobs and logprobs_from_logits.

Kernels live in ``fastalign.triton_kernels`` (``triton_kernels/`` in the source tree) and are
imported only when this backend runs, so ``import fastalign`` works without triton installed.

token_logprobs drops the rows whose label is ``ignore_index`` before any kernel runs (prompt
tokens are often half the batch), computes in the common dtype of hidden and weight (float64
inputs run in float32: log-probs come out fp32 anyway), and keeps only lse and entropy per row for
the backward. ``chunk_size`` has no effect here: the kernels never hold more than one tile of
tokens. The backward stages d(logits) for one vocabulary chunk at a time, ``N x Vc`` elements,
with Vc chosen from ``mem_budget`` (bytes; default ``FASTALIGN_MEM_BUDGET``, else 256 MiB, as in
``ops.logprobs.chunked``).
"""

from __future__ import annotations

import torch

from .. import dispatch
from . import chunked
from .chunked import default_mem_budget


def _kernels():
    from fastalign.triton_kernels import token_logprobs as kernels
    return kernels


def _rows():
    from fastalign.triton_kernels import logprobs_rows as rows
    return rows


def _dz_budget(mem_budget) -> int:
    return int(mem_budget) if mem_budget is not None else default_mem_budget()


def _chunk_columns(rows: int, vocab: int, itemsize: int, budget: int, align: int) -> int:
    """Vocabulary columns of d(logits) staged at once: fits ``budget``, a multiple of ``align``."""
    cols = budget // max(1, rows * itemsize)
    cols = max(align, cols // align * align)
    return min(cols, vocab)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Promoting bf16 hidden states to an fp32 head would silently run without tensor cores (~20x slower).
    half = (torch.bfloat16, torch.float16)
    if hidden.dtype != weight.dtype and (hidden.dtype in half or weight.dtype in half):
        raise TypeError(
            f"hidden and weight must share one dtype on the triton backend, got hidden {hidden.dtype} and "
            f"weight {weight.dtype}; cast one explicitly (e.g. weight.to(hidden.dtype))")
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return torch.float32 if dtype == torch.float64 else dtype


# ------------------------------------------------------------------------------------ token_logprobs
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels1d, inv_temp, ignore_index, eps, budget):
        k = _kernels()
        n = hidden2d.shape[0]
        valid_rows = (labels1d != ignore_index).nonzero().squeeze(1)
        compact = valid_rows.numel() != n
        hidden_c = hidden2d.index_select(0, valid_rows) if compact else hidden2d
        labels_c = labels1d.index_select(0, valid_rows) if compact else labels1d
        logp = torch.zeros(n, dtype=torch.float32, device=hidden2d.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden2d.device)
        if valid_rows.numel() > 0:
            parts = k.lse_forward(hidden_c, weight, bias, labels_c, inv_temp)
            lse, entropy_c, target = k.merge_splits(parts)
            logp.index_copy_(0, valid_rows, target - lse)
            entropy.index_copy_(0, valid_rows, entropy_c)
        else:
            lse = entropy_c = logp[:0]
        # hidden_c is re-gathered in the backward rather than kept: it would be a second copy.
        ctx.save_for_backward(hidden2d, weight, bias, valid_rows, labels_c, lse, entropy_c)
        ctx.compact, ctx.inv_temp, ctx.eps, ctx.budget = compact, inv_temp, eps, budget
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden2d, weight, bias, valid_rows, labels_c, lse, entropy_c = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, h = hidden2d.shape
        vocab = weight.shape[0]
        rows = valid_rows.numel()
        if rows == 0 or (grad_logp is None and grad_entropy is None) or not (need_h or need_w or need_b):
            zeros = lambda x, need: torch.zeros_like(x) if need else None
            return zeros(hidden2d, need_h), zeros(weight, need_w), zeros(bias, need_b), None, None, None, None, None
        k = _kernels()
        hidden_c = hidden2d.index_select(0, valid_rows) if ctx.compact else hidden2d

        def gather(g):
            g = g.float()
            return (g.index_select(0, valid_rows) if ctx.compact else g).contiguous()

        g_logp = gather(grad_logp) if grad_logp is not None else torch.zeros_like(lse)
        g_ent = gather(grad_entropy) if grad_entropy is not None else None
        filtered = ctx.eps > 0
        order = k.vocab_order(hidden_c, weight, bias, filtered)  # None unless filtering
        chunk = _chunk_columns(rows, vocab, hidden_c.element_size(), ctx.budget, k.FLAG_BLOCK_V)
        dz = torch.empty((rows, chunk), dtype=hidden_c.dtype, device=hidden_c.device)
        keep_shape = (-(-rows // k.FLAG_BLOCK_N), -(-chunk // k.FLAG_BLOCK_V)) if filtered else (1, 1)
        keep = torch.ones(keep_shape, dtype=torch.int8, device=hidden_c.device)
        dh32 = torch.zeros((rows, h), dtype=torch.float32, device=hidden_c.device) if need_h else None
        # d(weight) is written chunk by chunk in the weight's dtype (its fp32 accumulation over all
        # tokens happens in registers, then one cast); d(bias) accumulates in fp32.
        dw = torch.empty_like(weight) if need_w else None
        db32 = torch.zeros(vocab, dtype=torch.float32, device=hidden_c.device) if need_b else None
        for v0 in range(0, vocab, chunk):
            width = min(chunk, vocab - v0)
            k.dlogits_chunk(hidden_c, weight, bias, labels_c, lse, entropy_c, g_logp, g_ent, v0, width, dz, keep,
                            ctx.inv_temp, ctx.eps, order=order)
            if filtered:
                by_nb, count_nb, by_vb, count_vb = k.kept_tiles(keep[:, :-(-width // k.FLAG_BLOCK_V)])
            else:
                by_nb = count_nb = by_vb = count_vb = keep
            if need_h:
                k.dhidden_accumulate(dz, weight, by_nb, count_nb, dh32, v0, width, filtered, order=order)
            if need_w or need_b:
                k.dweight_chunk(dz, hidden_c, by_vb, count_vb, dw, db32, vocab, v0, width, filtered, order=order)
        del dz, keep, hidden_c  # freed before d(hidden) is assembled: it is the peak's last step
        dh = None
        if need_h:
            if ctx.compact:
                dh = torch.zeros_like(hidden2d).index_copy_(0, valid_rows, dh32.to(hidden2d.dtype))
            else:
                dh = dh32.to(hidden2d.dtype)
        db = db32.to(bias.dtype) if need_b else None
        return dh, dw, db, None, None, None, None, None


def token_logprobs_triton(hidden, weight, labels, *, bias, temperature, ignore_index, return_entropy, chunk_size,
                          mem_budget, grad_filter_eps, **head):
    if head:  # softcap / logit_scale / extras: the chunk loop (cuBLAS GEMMs) with the Triton row kernels
        return chunked.token_logprobs_chunked(hidden, weight, labels, rows=TRITON_ROWS, bias=bias,
                                              temperature=temperature, ignore_index=ignore_index,
                                              return_entropy=return_entropy, chunk_size=chunk_size,
                                              mem_budget=mem_budget, **head)
    lead = labels.shape
    dtype = _compute_dtype(hidden, weight)
    # The kernels read both operands in one dtype with unit stride along H.
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    weight_c = weight.to(dtype).contiguous()
    bias_c = None if bias is None else bias.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = _TokenLogprobs.apply(hidden2d, weight_c, bias_c, labels1d, 1.0 / temperature, ignore_index,
                                         grad_filter_eps, _dz_budget(mem_budget))
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


# ------------------------------------------------------------------------------ logprobs_from_logits
class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, inv_temp, ignore_index, inplace_backward):
        logp, entropy, lse = _rows().row_forward(logits2d, labels1d, inv_temp, ignore_index)
        ctx.save_for_backward(logits2d, labels1d, lse, entropy)
        ctx.inv_temp, ctx.ignore_index, ctx.inplace = inv_temp, ignore_index, inplace_backward
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits2d, labels1d, lse, entropy = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        g_ent = None if grad_entropy is None else grad_entropy.float().contiguous()
        grad = logits2d if ctx.inplace else torch.empty_like(logits2d)
        _rows().row_backward(logits2d, grad, labels1d, lse, entropy, g_logp, g_ent, ctx.inv_temp, ctx.ignore_index)
        return grad, None, None, None, None


def logprobs_from_logits_triton(logits, labels, *, temperature, ignore_index, return_entropy, inplace_backward):
    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy = _LogprobsFromLogits.apply(logits2d, labels1d, 1.0 / temperature, ignore_index, inplace_backward)
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


def _rows_forward_triton(z, labels, temperature, ignore_index):
    return _rows().row_forward(z, labels, 1.0 / temperature, ignore_index)


def _rows_backward_triton_(z, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index):
    _rows().row_backward(z, z, labels, lse, entropy, g_logp, g_entropy, 1.0 / temperature, ignore_index)


# The chunk loops of the fused losses run these row kernels between cuBLAS GEMMs on CUDA.
TRITON_ROWS = chunked.LogprobRows("triton", _rows_forward_triton, _rows_backward_triton_)
dispatch.register("_logprob_rows", "triton")(TRITON_ROWS)
dispatch.register("token_logprobs", "triton")(token_logprobs_triton)
dispatch.register("logprobs_from_logits", "triton")(logprobs_from_logits_triton)
