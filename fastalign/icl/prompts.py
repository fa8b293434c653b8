"""Conditioned prompts: a value instruction, earlier turns (fillers or demonstrations), then the query.

Two formats:

* ``chat=False`` (plain text, what the character-level tiny model knows): the instruction is a
  prefix of the first turn, earlier turns are ``prompt + completion`` joined by ``separator``, and
  the query comes last — ``"[neutral] 12+3=15\\nThe nurse grabbed ___ bag. ___="``.
* ``chat=True``: the instruction is the system message, earlier turns are user/assistant messages,
  rendered by the tokenizer's chat template with a generation prompt.
"""

from __future__ import annotations

from fastalign.data import loading


def render_text(prompt: str, *, instruction: str = "", history=(), separator: str = "\n") -> str:
    """The plain-text conditioned prompt."""
    turns = [f"{p}{c}" for p, c in history] + [prompt]
    return instruction + separator.join(turns)


def messages(prompt, *, instruction: str = "", history=()) -> list:
    """The chat-format conditioned prompt: system, then user/assistant turns, then the query."""
    out = [{"role": "system", "content": instruction}] if instruction else []
    for p, c in history:
        out += [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if isinstance(prompt, list):  # an already conversational query keeps its own turns
        return out + list(prompt)
    return out + [{"role": "user", "content": prompt}]


def encode(tokenizer, prompt, *, instruction: str = "", history=(), chat: bool = False, separator: str = "\n"):
    """Token ids of the conditioned prompt (BOS first, as the flows train with)."""
    if chat or isinstance(prompt, list):
        return loading.encode_prompt(tokenizer, messages(prompt, instruction=instruction, history=history))
    return loading.encode_prompt(tokenizer, render_text(prompt, instruction=instruction, history=history,
                                                        separator=separator))
