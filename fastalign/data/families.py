"""Procedurally defined task families: string, list, arithmetic and formatting transforms and their compositions.

A *family* is a chain of one or two transforms (a word → a word, a list of digits → a number, two numbers → a
number, …), optionally followed by a formatting step (brackets, dashes between characters, …). Each family
has a natural-language instruction built from its steps ("reverse the letters, then uppercase the word; answer
in brackets"), an input generator, the true answer and a verifier (exact match of the completion's first line).
:data:`FAMILIES` holds every family (several hundred), in a fixed order.

Rows are SFT rows in TRL's format plus what the verifier needs: ``{"prompt": "<instruction>: <input>\\n",
"completion": answer, "answer": answer, "family": name}``. Within a family, ``train`` and ``eval`` rows never
share an input (a content hash decides, whatever the seed). :func:`heldout_family_names` names a fixed set of
composed families for measuring generalization to *unseen* families: every step of each appears in some
training family, only the combination is new.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable

from .tasks import SPLITS, _first_answer

VOWELS = set("aeiouAEIOU")
WORD, DIGITS, PAIR, NUMBER = "word", "digits", "pair", "number"  # the kinds of value a transform takes or gives


@dataclass(frozen=True)
class Transform:
    """One step: ``fn`` maps a value of kind ``takes`` to one of kind ``gives``; ``phrase`` is its instruction."""

    name: str
    phrase: str
    takes: str
    gives: str
    fn: Callable


@dataclass(frozen=True)
class Format:
    """A last step on the rendered answer (a string), phrased as "answer …"."""

    name: str
    phrase: str
    fn: Callable[[str], str]


def _shift(word):
    """Each letter to the next one in the alphabet (z → a), case kept."""
    out = []
    for c in word:
        base = string.ascii_lowercase if c.islower() else string.ascii_uppercase
        out.append(base[(base.index(c) + 1) % 26])
    return "".join(out)


def _dedupe(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


TRANSFORMS = [
    # a word (letters) to a word
    Transform("reverse", "reverse the letters", WORD, WORD, lambda w: w[::-1]),
    Transform("upper", "uppercase the word", WORD, WORD, str.upper),
    Transform("capitalize", "capitalize the first letter", WORD, WORD, lambda w: w[:1].upper() + w[1:]),
    Transform("sort_letters", "sort the letters", WORD, WORD, lambda w: "".join(sorted(w))),
    Transform("drop_vowels", "remove the vowels", WORD, WORD, lambda w: "".join(c for c in w if c not in VOWELS)),
    Transform("double_letters", "double every letter", WORD, WORD, lambda w: "".join(c + c for c in w)),
    Transform("rotate_left", "move the first letter to the end", WORD, WORD, lambda w: w[1:] + w[:1]),
    Transform("rotate_right", "move the last letter to the front", WORD, WORD, lambda w: w[-1:] + w[:-1]),
    Transform("shift_letters", "replace each letter by the next one", WORD, WORD, _shift),
    Transform("first_three", "keep the first three letters", WORD, WORD, lambda w: w[:3]),
    Transform("last_three", "keep the last three letters", WORD, WORD, lambda w: w[-3:]),
    Transform("dedupe_letters", "drop repeated letters", WORD, WORD, lambda w: "".join(_dedupe(w))),
    Transform("repeat_word", "write the word twice", WORD, WORD, lambda w: w + w),
    Transform("swap_ends", "swap the first and last letters", WORD, WORD,
              lambda w: w[-1] + w[1:-1] + w[0] if len(w) > 1 else w),
    # a word to a number
    Transform("length", "count the letters", WORD, NUMBER, len),
    Transform("count_vowels", "count the vowels", WORD, NUMBER, lambda w: sum(c in VOWELS for c in w)),
    Transform("count_consonants", "count the consonants", WORD, NUMBER, lambda w: sum(c not in VOWELS for c in w)),
    # a list of digits to a list
    Transform("sort_list", "sort the list", DIGITS, DIGITS, sorted),
    Transform("sort_list_desc", "sort the list in descending order", DIGITS, DIGITS, lambda x: sorted(x)[::-1]),
    Transform("reverse_list", "reverse the list", DIGITS, DIGITS, lambda x: x[::-1]),
    Transform("add_one", "add one to each number", DIGITS, DIGITS, lambda x: [v + 1 for v in x]),
    Transform("double_each", "double each number", DIGITS, DIGITS, lambda x: [2 * v for v in x]),
    Transform("drop_first", "drop the first number", DIGITS, DIGITS, lambda x: x[1:]),
    Transform("drop_last", "drop the last number", DIGITS, DIGITS, lambda x: x[:-1]),
    Transform("unique", "drop repeated numbers", DIGITS, DIGITS, _dedupe),
    Transform("rotate_list", "move the first number to the end", DIGITS, DIGITS, lambda x: x[1:] + x[:1]),
    # a list to a number
    Transform("sum", "add up the list", DIGITS, NUMBER, sum),
    Transform("max", "take the largest number", DIGITS, NUMBER, max),
    Transform("min", "take the smallest number", DIGITS, NUMBER, min),
    Transform("count", "count the numbers", DIGITS, NUMBER, len),
    Transform("count_even", "count the even numbers", DIGITS, NUMBER, lambda x: sum(v % 2 == 0 for v in x)),
    Transform("first", "take the first number", DIGITS, NUMBER, lambda x: x[0]),
    Transform("last", "take the last number", DIGITS, NUMBER, lambda x: x[-1]),
    # two numbers to a number (arithmetic)
    Transform("add", "add the two numbers", PAIR, NUMBER, lambda p: p[0] + p[1]),
    Transform("subtract", "subtract the second number from the first", PAIR, NUMBER, lambda p: p[0] - p[1]),
    Transform("multiply", "multiply the two numbers", PAIR, NUMBER, lambda p: p[0] * p[1]),
    Transform("larger", "take the larger number", PAIR, NUMBER, max),
    Transform("smaller", "take the smaller number", PAIR, NUMBER, min),
    # a number to a number
    Transform("plus_three", "add three", NUMBER, NUMBER, lambda n: n + 3),
    Transform("times_two", "double it", NUMBER, NUMBER, lambda n: 2 * n),
    Transform("minus_one", "subtract one", NUMBER, NUMBER, lambda n: n - 1),
    Transform("mod_seven", "take the remainder after dividing by seven", NUMBER, NUMBER, lambda n: n % 7),
    Transform("digit_sum", "add up its digits", NUMBER, NUMBER, lambda n: sum(int(c) for c in str(abs(n)))),
]
FORMATS = [
    Format("brackets", "answer in square brackets", lambda s: f"[{s}]"),
    Format("parens", "answer in parentheses", lambda s: f"({s})"),
    Format("dashes", "answer with dashes between the characters", lambda s: "-".join(s)),
    Format("exclaim", "answer with an exclamation mark at the end", lambda s: s + "!"),
]
BY_NAME = {t.name: t for t in TRANSFORMS}
FORMAT_BY_NAME = {f.name: f for f in FORMATS}


def render(value, kind: str) -> str:
    """A value as the model reads and writes it: words as they are, lists and pairs space-separated."""
    if kind in (DIGITS, PAIR):
        return " ".join(str(v) for v in value)
    return str(value)


def _random_input(kind: str, rng: random.Random):
    if kind == WORD:  # 4-7 lowercase letters, at least one vowel and two consonants
        consonants = [c for c in string.ascii_lowercase if c not in VOWELS]
        letters = [rng.choice("aeiou")] + rng.sample(consonants, 2)
        letters += [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 4))]
        rng.shuffle(letters)
        return "".join(letters)
    if kind == DIGITS:  # 4-6 digits: two drops still leave two
        return [rng.randrange(10) for _ in range(rng.randint(4, 6))]
    if kind == PAIR:
        return [rng.randrange(100), rng.randrange(100)]
    return rng.randrange(100)


@dataclass(frozen=True)
class Family:
    """A chain of transforms (each takes what the previous gives) and an optional final format."""

    steps: tuple
    format: Format | None = None

    @property
    def name(self) -> str:
        return ">".join(t.name for t in self.steps) + (f"|{self.format.name}" if self.format else "")

    @property
    def instruction(self) -> str:
        text = ", then ".join(t.phrase for t in self.steps)
        return text + (f"; {self.format.phrase}" if self.format else "")

    @property
    def takes(self) -> str:
        return self.steps[0].takes

    def answer(self, value) -> str:
        for step in self.steps:
            value = step.fn(value)
        text = render(value, self.steps[-1].gives)
        return self.format.fn(text) if self.format else text

    def rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        """``n`` SFT rows of this family (inputs drawn from ``seed``; the split's inputs only)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}-{split}-{seed}")
        out, tries = [], 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 1000:  # every kind has thousands of inputs; this only guards a broken generator
                raise RuntimeError(f"family {self.name}: could not draw {n} {split} inputs")
            value = _random_input(self.takes, rng)
            text = render(value, self.takes)
            if _is_eval_input(self.name, text) != (split == "eval"):
                continue
            answer = self.answer(value)
            if not answer:  # outside the family's domain (e.g. the last three letters of a word, minus the vowels)
                continue
            out.append({"prompt": f"{self.instruction}: {text}\n", "completion": answer, "answer": answer,
                        "family": self.name})
        return out

    def verify(self, row: dict, completion: str) -> bool:
        """True when the completion's first line is the row's answer."""
        return _first_answer(completion) == row["answer"]


def _is_eval_input(family: str, text: str) -> bool:
    return hashlib.sha256(f"{family}:{text}".encode()).digest()[0] % 5 == 0


def _build_families() -> list[Family]:
    singles = [Family((t,)) for t in TRANSFORMS if t.takes != NUMBER]  # a number step needs a number first
    chains = [Family((a, b)) for a in TRANSFORMS for b in TRANSFORMS
              if a is not b and a.gives == b.takes and not (a.takes == NUMBER and b.takes == NUMBER)]
    formatted = [Family(f.steps, fmt) for f in singles for fmt in FORMATS]
    return singles + chains + formatted


FAMILIES: list[Family] = _build_families()
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


def get_family(name: str) -> Family:
    if name not in FAMILY_BY_NAME:
        raise ValueError(f"task family must be one of the {len(FAMILIES)} in fastalign.data.families.FAMILIES "
                         f"(e.g. {FAMILIES[0].name!r}, {FAMILIES[-1].name!r}), got {name!r}")
    return FAMILY_BY_NAME[name]


def heldout_family_names(one_in: int = 8) -> list[str]:
    """A fixed 1/``one_in`` of the two-step families (by a content hash, independent of any seed): never trained
    on in the task-diversity experiment. Their single steps are all training families."""
    return [f.name for f in FAMILIES if len(f.steps) == 2 and f.format is None
            and hashlib.sha256(f.name.encode()).digest()[0] % one_in == 0]


def training_family_names(one_in: int = 8) -> list[str]:
    held = set(heldout_family_names(one_in))
    return [f.name for f in FAMILIES if f.name not in held]


def mixture_rows(names: list[str], per_family: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``per_family`` rows of each named family, shuffled together (seeded)."""
    rows = [r for name in names for r in get_family(name).rows(per_family, seed=seed, split=split)]
    random.Random(f"mixture-{seed}").shuffle(rows)
    return rows
