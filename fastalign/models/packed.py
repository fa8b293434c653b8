"""The padding-free training forward: a right-padded batch runs as one sequence of its real tokens.

Rows are concatenated with ``position_ids`` restarting at 0 at each row and no attention mask; transformers reads
that layout as packed sequences and keeps attention within each row (``find_packed_sequence_indices`` builds the
block-diagonal causal mask for sdpa/eager; ``flash_attention_2`` takes the varlen path from the same position ids).
The trunk's hidden states are then put back at their padded places (zeros at padding), so everything after the
trunk — the fused log-prob and policy losses over hidden states and the LM head, value heads — runs unchanged and
no ``tokens × vocabulary`` tensor is built. Only right-padded rows are equal to their padded forward (the padded
forward numbers positions from the first column), which is how every training batch in fastalign is laid out.
"""

from __future__ import annotations

import torch


def packed_layout(attention_mask: torch.Tensor):
    """``(flat_index [N], position_ids [1, N])`` of the ``N`` real tokens of a ``[B, T]`` right-padded mask."""
    real = attention_mask.bool()
    flat_index = real.reshape(-1).nonzero().squeeze(1)
    position_ids = (real.long().cumsum(1) - 1)[real]
    return flat_index, position_ids[None]


def packed_hidden_states(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The trunk's last hidden states ``[B, T, H]`` from one packed forward over the real tokens (0 at padding)."""
    rows, width = input_ids.shape
    flat_index, position_ids = packed_layout(attention_mask)
    tokens = input_ids.reshape(-1)[flat_index][None]
    hidden = trunk(input_ids=tokens, attention_mask=None, position_ids=position_ids, use_cache=False).last_hidden_state
    out = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, flat_index, hidden[0])
    return out.view(rows, width, -1)


def padding_fraction(attention_mask: torch.Tensor) -> float:
    """The share of padding in these rows padded to the longest one (what the packed forward does not run)."""
    lengths = attention_mask.sum(1)
    return 1.0 - float(lengths.sum()) / max(int(lengths.max()) * len(lengths), 1)
