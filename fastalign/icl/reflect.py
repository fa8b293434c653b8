"""IROTE-style search for a compact self-reflection text placed in the system prompt.

Each round proposes candidates — texts the model writes itself (sampled continuations of a
generation prompt, optionally seeded with a random prefix of a pool text) and mutations of the
texts kept so far (drop a word, cut at a word boundary, splice two kept texts, let the model
rewrite the tail) — scores every new text by

    objective(text) = alignment(text) − λ · length_in_tokens(text)

where ``alignment`` is the judge's mean reward of the responses to the probe prompts with ``text``
as the instruction, and keeps the ``keep`` best texts seen so far. The caller supplies the three
model-facing pieces (scoring, sampling, token length), so this module is only the search.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReflectResult:
    best_text: str
    best_objective: float
    best_alignment: float
    rounds: list = field(default_factory=list)  # per round: best objective/alignment/text, candidates scored
    scored: dict = field(default_factory=dict)  # text -> {"objective", "alignment", "length", "round", "origin"}


def reflect_search(*, align_fn, sample_fn, length_fn, pool, rounds: int, num_generated: int, num_mutations: int,
                   keep: int, length_penalty: float, seed: int, max_chars: int = 80) -> ReflectResult:
    """Run the search. ``align_fn(texts) -> list[float|None]`` (None: no usable judge score),
    ``sample_fn(prefixes) -> list[str]`` (the model's continuation of each prefix),
    ``length_fn(text) -> int`` (tokens)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rng = random.Random(seed)
    scored: dict = {}
    history = []

    def evaluate(candidates, round_index):
        new = []
        for text, origin in candidates:
            text = _clean(text, max_chars)
            if text and text not in scored and text not in [t for t, _ in new]:
                new.append((text, origin))
        alignments = align_fn([t for t, _ in new]) if new else []
        for (text, origin), alignment in zip(new, alignments):
            length = length_fn(text)
            objective = None if alignment is None else alignment - length_penalty * length
            scored[text] = {"objective": objective, "alignment": alignment, "length": length, "round": round_index,
                            "origin": origin}
        return len(new)

    def kept():
        ok = [(t, s) for t, s in scored.items() if s["objective"] is not None]
        return sorted(ok, key=lambda ts: (-ts[1]["objective"], ts[1]["length"], ts[0]))[:keep]

    for round_index in range(rounds + 1):
        candidates = [(t, "pool") for t in pool] if round_index == 0 else []
        prefixes = [_seed_prefix(rng, pool) for _ in range(num_generated)]
        candidates += [(p + s, "generated") for p, s in zip(prefixes, sample_fn(prefixes))] if prefixes else []
        if round_index > 0:
            candidates += _mutations(rng, [t for t, _ in kept()], num_mutations, sample_fn)
        count = evaluate(candidates, round_index)
        top = kept()
        best_text, best = top[0] if top else ("", {"objective": None, "alignment": None})
        history.append({"round": round_index, "best_text": best_text, "best_objective": best["objective"],
                        "best_alignment": best["alignment"], "new_candidates": count,
                        "kept": [t for t, _ in top]})
    top = kept()
    if not top:
        raise ValueError("reflect: the judge scored no candidate text (every score failed); see the judge errors above")
    best_text, best = top[0]
    return ReflectResult(best_text, best["objective"], best["alignment"], history, scored)


def _seed_prefix(rng, pool):
    """A random leading part of a pool text (the model writes the rest), or "" without a pool."""
    if not pool:
        return ""
    text = rng.choice(pool)
    return text[:rng.randint(1, max(1, len(text) // 2))]


def _mutations(rng, kept, count, sample_fn):
    if not kept:
        return []
    out, rewrite_prefixes = [], []
    for _ in range(count):
        text = rng.choice(kept)
        words = text.split(" ")
        op = rng.choice(("drop", "cut", "splice", "rewrite"))
        if op == "drop" and len(words) > 1:
            i = rng.randrange(len(words))
            out.append((" ".join(words[:i] + words[i + 1:]), "mutation:drop"))
        elif op == "cut" and len(words) > 1:
            out.append((" ".join(words[:rng.randint(1, len(words) - 1)]) + " ", "mutation:cut"))
        elif op == "splice" and len(kept) > 1:
            other = rng.choice([t for t in kept if t != text])
            a, b = text.split(" "), other.split(" ")
            out.append((" ".join(a[:max(1, len(a) // 2)] + b[len(b) // 2:]), "mutation:splice"))
        else:
            rewrite_prefixes.append(text[:rng.randint(1, max(1, len(text) - 1))])
    if rewrite_prefixes:
        out += [(p + s, "mutation:rewrite") for p, s in zip(rewrite_prefixes, sample_fn(rewrite_prefixes))]
    return out


def _clean(text: str, max_chars: int) -> str:
    """One line, at most ``max_chars`` characters; an instruction is a prefix, so it keeps its trailing space."""
    line = text.split("\n")[0][:max_chars]
    return line if line.strip() else ""
