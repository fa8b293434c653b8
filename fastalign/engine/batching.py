"""Token-budget micro-batches: which of a process's rows share a training forward.

A fixed ``micro_batch_size`` bounds the row count, not the memory: eight 2000-token rows need far more than
eight 20-token ones. :func:`token_budget_microbatches` instead fills micro-batches up to ``max_tokens`` forwarded
tokens (``rows × longest`` when rows are padded, ``Σ lengths`` when they are packed into one sequence) and
balances them by attention cost ``Σ length²`` the way TRL's async GRPO balances its rows (``TokenBudgetBatcher``):
first-fit (longest first) sets how many micro-batches are needed, then units go costliest first into the least
loaded micro-batch that still fits (a new one opens only when none does). A unit is one dataset row with all the
sequences it forwards (an SFT row: one; a preference pair: chosen and rejected, which stay together because the
pair's loss needs both).

The flows' losses are sums that the trainer divides by the step's global unit count, so how the rows are split
changes nothing but the memory and the number of forwards; under ``torchrun`` every process runs as many forwards
(:func:`equalize_count`), so the per-forward collectives of FSDP stay matched.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .distributed import DistState


def forward_tokens(lengths: Sequence[int], *, packed: bool) -> int:
    """Tokens one forward over sequences of ``lengths`` runs: their sum when packed, else count × longest."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def token_budget_microbatches(unit_lengths: Sequence[Sequence[int]], max_tokens: int, *,
                              packed: bool) -> list[list[int]]:
    """Split units (each a list of its sequences' lengths) into micro-batches of at most ``max_tokens`` forwarded
    tokens, balanced by ``Σ length²``. Returns lists of unit indices, each sorted, the lists ordered by their first
    index (deterministic). A unit longer than the budget on its own raises ``ValueError`` (dropping it, as TRL
    does, would change the loss)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    cost = [sum(n * n for n in lengths) for lengths in unit_lengths]
    for i, lengths in enumerate(unit_lengths):
        alone = forward_tokens(list(lengths), packed=packed)
        if alone > max_tokens:
            raise ValueError(f"max_tokens_per_microbatch ({max_tokens}) is smaller than one row: row {i} forwards "
                             f"{alone} tokens (sequence lengths {list(lengths)}); raise it to at least {alone}")
    # How many micro-batches: first-fit, longest first. Then fill that many costliest first, each unit into the
    # least loaded one it fits (TRL's rule for its fixed set of rows); one that fits nowhere opens another.
    count = len(_fill(unit_lengths, sorted(range(len(unit_lengths)), key=lambda i: (-max(unit_lengths[i]), i)),
                      max_tokens, packed=packed, bins=[], load=lambda b: 0))
    order = sorted(range(len(unit_lengths)), key=lambda i: (-cost[i], i))
    empty = [{"units": [], "lengths": [], "load": 0} for _ in range(count)]
    bins = _fill(unit_lengths, order, max_tokens, packed=packed, bins=empty, load=lambda b: b["load"], cost=cost)
    return sorted((sorted(b["units"]) for b in bins), key=lambda units: units[0])


def _fill(unit_lengths, order, max_tokens, *, packed, bins, load, cost=None):
    """Place units in ``order`` into the fitting bin of least ``load`` (ties: the earliest), else a new bin."""
    for i in order:
        lengths = list(unit_lengths[i])
        fits = [b for b in bins if forward_tokens(b["lengths"] + lengths, packed=packed) <= max_tokens]
        if fits:
            target = min(fits, key=load)
        else:
            target = {"units": [], "lengths": [], "load": 0}
            bins.append(target)
        target["units"].append(i)
        target["lengths"] += lengths
        target["load"] += cost[i] if cost is not None else 0
    return bins


def equalize_count(microbatches: list[list[int]], count: int) -> list[list[int]]:
    """Split the micro-batches holding the most units in halves until there are ``count`` of them (another
    process needed that many; a half never exceeds the budget its whole met)."""
    out = [list(m) for m in microbatches]
    if count > sum(len(m) for m in out):
        raise ValueError(f"cannot make {count} micro-batches out of {sum(len(m) for m in out)} rows")
    while len(out) < count:
        largest = max(range(len(out)), key=lambda j: (len(out[j]), -j))
        units = out.pop(largest)
        out += [units[:len(units) // 2], units[len(units) // 2:]]
    return sorted(out, key=lambda units: units[0])


def process_microbatches(unit_lengths: Sequence[Sequence[int]], max_tokens: int, *, packed: bool,
                         state: DistState) -> list[list[int]]:
    """This process's token-budget micro-batches, as many as the process that needs most (one collective)."""
    micro = token_budget_microbatches(unit_lengths, max_tokens, packed=packed)
    if state.distributed:
        most = torch.tensor(len(micro), device=state.device if state.device.type == "cuda" else "cpu")
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        micro = equalize_count(micro, int(most))
    return micro
