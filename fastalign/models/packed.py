"""The padding-free training forward: a right-padded batch runs as packed rows of its real tokens.

Rows are concatenated with ``position_ids`` restarting at 0 at each row and no attention mask; transformers reads
that layout as packed sequences and keeps attention within each row (``find_packed_sequence_indices`` builds the
block-diagonal causal mask for sdpa/eager; ``flash_attention_2`` takes the varlen path from the same position ids).
With flash_attention_2 all rows go into one sequence. sdpa and eager compute the dense ``N × N`` scores under that
mask, so one sequence of every token would cost far more attention than the padded batch (64 DPO rows: 10160²
scores against 64 × 47²): there the rows are packed first-fit into rows as long as the longest one, and when no
two rows fit together the padded forward runs (nothing to remove).
The trunk's hidden states are then put back at their padded places (zeros at padding), so everything after the
trunk — the fused log-prob and policy losses over hidden states and the LM head, value heads — runs unchanged and
no ``tokens × vocabulary`` tensor is built. Only right-padded rows are equal to their padded forward (the padded
forward numbers positions from the first column), which is how every training batch in fastalign is laid out.
"""

from __future__ import annotations

import torch


def packed_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Which rows share each packed row: first-fit, longest first, into rows of ``capacity`` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] == 0:
            continue
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            bins.append([])
            room.append(capacity)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


def packed_capacity(lengths: list[int], attn_implementation: str) -> int:
    """Tokens per packed row. flash_attention_2 runs each sequence on its own (varlen), so every token goes in one
    row; sdpa and eager apply a dense ``N × N`` block-diagonal mask, so packed rows stay as long as the longest
    input row (their attention then never costs more than the padded batch's)."""
    return sum(lengths) if attn_implementation == "flash_attention_2" else max(lengths, default=0)


def packed_layout(attention_mask: torch.Tensor, attn_implementation: str = "sdpa"):
    """The packed layout of a ``[B, T]`` right-padded mask: ``(source [R, L], position_ids [R, L])``.

    ``source`` holds, for each packed position, the flat index (into ``B × T``) of the real token placed there, or
    -1 in the tail of a packed row that nothing filled; that tail counts as one more sequence (positions from 0), so
    no real token attends to it. ``position_ids`` restart at 0 at each row's first token."""
    lengths = attention_mask.long().sum(1).tolist()
    width = attention_mask.shape[1]
    capacity = packed_capacity(lengths, attn_implementation)
    source, positions = [], []
    for rows in packed_rows(lengths, capacity):
        src, pos = [], []
        for i in rows:
            src += range(i * width, i * width + lengths[i])
            pos += range(lengths[i])
        tail = capacity - len(src)
        source.append(src + [-1] * tail)
        positions.append(pos + list(range(tail)))
    device = attention_mask.device
    return (torch.tensor(source, dtype=torch.long, device=device).view(-1, capacity),
            torch.tensor(positions, dtype=torch.long, device=device).view(-1, capacity))


def packed_hidden_states(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The trunk's last hidden states ``[B, T, H]`` from a packed forward over the real tokens (0 at padding)."""
    rows, width = input_ids.shape
    source, position_ids = packed_layout(attention_mask, trunk.config._attn_implementation)
    if source.shape[0] == rows:  # no two rows share a packed row: nothing to remove, the padded forward is as fast
        return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    real = source >= 0
    tokens = torch.where(real, input_ids.reshape(-1)[source.clamp(min=0)], torch.zeros_like(source))
    hidden = trunk(input_ids=tokens, attention_mask=None, position_ids=position_ids, use_cache=False).last_hidden_state
    out = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, source[real], hidden[real])
    return out.view(rows, width, -1)


def forwarded_positions(attention_mask: torch.Tensor, attn_implementation: str) -> int:
    """Positions the packed forward runs for these rows (real tokens plus the unfilled tails of packed rows)."""
    lengths = attention_mask.long().sum(1).tolist()
    return len(packed_rows(lengths, packed_capacity(lengths, attn_implementation))) * \
        packed_capacity(lengths, attn_implementation)


def padding_removed(attention_mask: torch.Tensor, attn_implementation: str) -> float:
    """The share of the padded forward's positions (rows padded to the longest) the packed forward does not run."""
    padded = int(attention_mask.long().sum(1).max()) * attention_mask.shape[0]
    return 1.0 - forwarded_positions(attention_mask, attn_implementation) / max(padded, 1)
