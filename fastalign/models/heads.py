"""Modules the flows train: a causal LM that returns per-token log-probs, and a scalar (reward/value) head.

Both compute everything inside ``forward`` so DDP and FSDP see every parameter they manage. The
log-probs come from the final hidden states and the LM head through ``ops.token_logprobs``:
the ``tokens × vocabulary`` logits are never materialized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastalign import ops

from .loading import base_causal_lm
from .packed import packed_hidden_states

IGNORE_INDEX = -100


def decoder(lm):
    """The transformer trunk (embeddings → layers → final norm) of a causal LM, peft-wrapped or not."""
    base = base_causal_lm(lm)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def lm_head(lm) -> nn.Module:
    return base_causal_lm(lm).get_output_embeddings()


class CausalLMLogprobs(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` → ``logp [B, T-1]`` of ``labels[:, 1:]`` (0 where ignored), at
    ``temperature`` (the logits divided by it) when given. Everything happens inside ``forward``, so an FSDP2 root
    has its parameters (the LM head included) gathered there.

    ``packed=True`` runs the trunk padding-free over right-padded rows (:mod:`fastalign.models.packed`)."""

    def __init__(self, lm, packed: bool = False):
        super().__init__()
        self.lm, self.packed = lm, packed

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        if self.packed and attention_mask is not None and position_ids is None:
            return packed_hidden_states(decoder(self.lm), input_ids, attention_mask)
        out = decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, temperature=1.0):
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        head = lm_head(self.lm)
        logp = ops.token_logprobs(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias,
                                  temperature=temperature, ignore_index=IGNORE_INDEX)
        # FSDP2 warns about (and cannot hook in-place ops on) a returned view; [B, T] floats are cheap to copy.
        return logp.clone() if logp._base is not None else logp


def target_mask(labels):
    """``[B, T-1]`` mask of the positions ``CausalLMLogprobs`` scores."""
    return labels[:, 1:] != IGNORE_INDEX


class ScalarHeadModel(nn.Module):
    """A causal LM trunk + ``Linear(H, 1)``: one scalar per sequence, read at its last real token.

    The LM head is frozen (unused), so DDP sees no parameter without a gradient.
    """

    HEAD_FILE = "scalar_head.safetensors"

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        hidden = base_causal_lm(lm).config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=True)
        nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)
        self.score.to(next(lm.parameters()).dtype)
        lm_head(lm).requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        hidden = decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.long().sum(1).clamp(min=1) - 1  # right padding: the last real token
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(picked).squeeze(-1).float()

    def save(self, folder, tokenizer):
        from safetensors.torch import save_file

        from .loading import save_pretrained

        folder = Path(folder)
        save_pretrained(self.lm, tokenizer, folder)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.score.state_dict().items()},
                  str(folder / self.HEAD_FILE))
        return folder

    @classmethod
    def load(cls, folder, **load_kwargs):
        """A saved reward model: the causal LM folder plus ``scalar_head.safetensors``."""
        from safetensors.torch import load_file

        from .loading import load_causal_lm

        folder = Path(folder)
        if not (folder / cls.HEAD_FILE).exists():
            raise ValueError(f"{folder} is not a reward model folder (no {cls.HEAD_FILE})")
        model = cls(load_causal_lm(str(folder), **load_kwargs))
        model.score.load_state_dict(load_file(str(folder / cls.HEAD_FILE)))
        return model


class PolicyValueModel(nn.Module):
    """PPO's policy: a causal LM whose ``forward`` returns the trunk's hidden states ``[B, T, H]`` (for
    the fused policy loss through :func:`lm_head`) and, with ``value_head=True``, per-token values
    ``[B, T]`` from a ``Linear(H, 1)`` on the same trunk (one model, two heads: no separate critic).

    The value head starts at zero, so the first values are 0 and the first value loss is the returns'
    mean square. ``packed=True`` runs the trunk padding-free (:mod:`fastalign.models.packed`).
    """

    def __init__(self, lm, value_head: bool = False, packed: bool = False):
        super().__init__()
        self.lm, self.packed = lm, packed
        self.value_head = None
        if value_head:
            hidden = base_causal_lm(lm).config.hidden_size
            self.value_head = nn.Linear(hidden, 1, bias=True).to(next(lm.parameters()).dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, prompt_lengths=None):
        """``(hidden [B, T, H], values [B, T] or None)``. With ``prompt_lengths`` (``[B]``; rows right-padded,
        prompt then completion, as :meth:`SampledCompletions.training_batch` lays them out) only the completion part is
        returned, through :func:`completion_hidden_states`: ``hidden [B, C, H]``, position ``j`` predicting the
        row's completion token ``j``."""
        if prompt_lengths is not None:
            if self.value_head is not None:
                raise ValueError("prompt_lengths (the shared-prompt forward) gives no values: the model has a value "
                                 "head, call it without prompt_lengths")
            return completion_hidden_states(self.lm, input_ids, attention_mask, prompt_lengths), None
        if self.packed and attention_mask is not None and position_ids is None:
            hidden = packed_hidden_states(decoder(self.lm), input_ids, attention_mask)
        else:
            hidden = decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        values = None if self.value_head is None else self.value_head(hidden).squeeze(-1).float()
        return hidden, values


def completion_hidden_states(lm, input_ids, attention_mask, prompt_lengths):
    """The trunk's hidden states that predict each row's completion tokens, running every distinct prompt once.

    Rows are ``[prompt | completion | padding]`` (right-padded). The GRPO samples of a prompt share it, and its
    keys and values do not depend on the completion: the distinct prompts run as one batch with a KV cache, the
    cache rows are gathered for every row (differentiably: the prompt pass gets the gradients of all its samples)
    and the completions run on top of it. A forward over G samples of a P-token prompt with
    C-token completions then costs ``P + G·C`` tokens instead of ``G·(P + C)``. Returns ``[B, C_max, H]``:
    position 0 is the last prompt token's state, position ``j`` that of completion token ``j - 1``; positions past
    a row's completion are padding.
    """
    from transformers import DynamicCache

    from .loading import cache_argument

    trunk, cache_kw = decoder(lm), cache_argument(lm)
    device = input_ids.device
    width = input_ids.shape[1]
    lengths = attention_mask.sum(1).long()
    plen = prompt_lengths.to(device).long()
    clen = lengths - plen
    if int(plen.min()) < 1 or int(clen.min()) < 0:
        raise ValueError("prompt_lengths must be >= 1 and at most each row's length")
    # The distinct prompts (right-padded with -1) and, per row, which of them it reads. Right padding: no query
    # row is fully masked (that gives NaN in eager attention); the completions then sit after all P prompt
    # columns, the padding columns masked out.
    p_width = int(plen.max())
    cols = torch.arange(p_width, device=device)
    keyed = torch.where(cols[None, :] < plen[:, None], input_ids[:, :p_width], -1)
    distinct, which = torch.unique(keyed, dim=0, return_inverse=True)
    prompt_mask = (distinct >= 0).long()
    prompt_ids, u_len = distinct.clamp(min=0), prompt_mask.sum(1)
    cache = DynamicCache()
    out = trunk(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=cols.expand(len(u_len), -1),
                use_cache=True, **{cache_kw: cache}).last_hidden_state
    last = out[torch.arange(len(u_len), device=device), u_len - 1][which]  # [n, H]: predicts completion token 0
    c_width = int(clen.max())
    if c_width <= 1:  # only the last prompt token predicts anything
        return last[:, None]
    # Completion tokens 0 .. C-2 (the last one predicts nothing), left-aligned after the shared prompt columns.
    steps = torch.arange(c_width - 1, device=device)
    comp_ids = input_ids.gather(1, (plen[:, None] + steps).clamp(max=width - 1))
    comp_mask = (steps[None, :] < clen[:, None] - 1).long()
    cache.batch_select_indices(which)
    hidden = trunk(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[which], comp_mask], 1),
                   position_ids=plen[:, None] + steps, use_cache=True, **{cache_kw: cache}).last_hidden_state
    return torch.cat([last[:, None], hidden], 1)


def completion_aligned(prompt_lengths, width, *tensors, fill=IGNORE_INDEX):
    """Per-token tensors of the shifted ``[B, W-1]`` layout (position t scores token t+1) in the layout of
    :func:`completion_hidden_states` (``[B, width]``, position j scoring completion token j); ``None`` passes
    through. Positions past the source are filled with ``fill`` for integer tensors, 0 for float ones."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        index = (prompt_lengths.to(t.device).long()[:, None] - 1 + torch.arange(width, device=t.device))
        inside = index < t.shape[1]
        got = t.gather(1, index.clamp(max=t.shape[1] - 1))
        pad = fill if not t.is_floating_point() else 0.0
        out.append(torch.where(inside, got, torch.full_like(got, pad)))
    return out


class TokenValueModel(nn.Module):
    """PPO's separate value model: a :class:`ScalarHeadModel`'s trunk and head read at every position.

    Built from a trained reward model (the usual initialisation of the critic), it returns ``[B, T]``
    values; the LM head stays frozen (unused).
    """

    def __init__(self, scalar_model: ScalarHeadModel, packed: bool = False):
        super().__init__()
        self.lm, self.score, self.packed = scalar_model.lm, scalar_model.score, packed

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if self.packed and attention_mask is not None and position_ids is None:
            hidden = packed_hidden_states(decoder(self.lm), input_ids, attention_mask)
        else:
            hidden = decoder(self.lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        values = self.score(hidden).squeeze(-1).float()
        # FSDP2 warns about (and cannot hook in-place ops on) a returned view; [B, T] floats are cheap to copy.
        return values.clone() if values._base is not None else values
