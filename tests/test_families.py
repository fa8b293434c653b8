"""The procedurally generated task families: every family gives valid rows its verifier accepts, and rejects a
wrong answer; the held-out families are new combinations of trained steps; seeds and splits differ."""

import pytest

from fastalign.data import families, loading
from fastalign.models.tiny import CHARACTERS


def test_there_are_hundreds_of_families_with_distinct_names_and_instructions():
    assert len(families.FAMILIES) >= 300
    assert len({f.name for f in families.FAMILIES}) == len(families.FAMILIES)
    assert len({f.instruction for f in families.FAMILIES}) == len(families.FAMILIES)
    kinds = {f.takes for f in families.FAMILIES}
    assert kinds == {families.WORD, families.DIGITS, families.PAIR}
    assert any(f.format for f in families.FAMILIES) and any(len(f.steps) == 2 for f in families.FAMILIES)


def test_every_family_gives_valid_rows_its_verifier_accepts_and_rejects_wrong_answers():
    for family in families.FAMILIES:
        rows = family.rows(4, seed=0) + family.rows(2, seed=0, split="eval")
        loading.validate_rows(rows, "sft", family.name)  # what the SFT flow will ask of them
        for row in rows:
            text = row["prompt"] + row["completion"]
            assert set(text) <= set(CHARACTERS), (family.name, text)  # the tiny tokenizer reads every character
            assert row["prompt"].startswith(family.instruction + ": ") and row["family"] == family.name
            assert row["completion"] == row["answer"] and row["answer"].strip() == row["answer"]
            assert family.verify(row, row["completion"])
            assert family.verify(row, row["completion"] + "\nanything after the first line")
            assert not family.verify(row, row["completion"] + "x")
            assert not family.verify(row, row["completion"][:-1])


@pytest.mark.parametrize("name, prompt_input, answer", [
    ("reverse>upper", "abc", "CBA"),
    ("sort_list>drop_first", "3 1 2 0", "1 2 3"),
    ("add|brackets", "37 48", "[85]"),
    ("subtract>digit_sum", "3 48", "9"),
    ("drop_vowels>count_consonants", "banana", "3"),
    ("shift_letters", "zap", "abq"),
    ("max|dashes", "3 9 12", "1-2"),
])
def test_answers_follow_the_instruction(name, prompt_input, answer):
    family = families.get_family(name)
    value = prompt_input if family.takes == families.WORD else [int(v) for v in prompt_input.split()]
    assert family.answer(value) == answer


def test_heldout_families_are_new_combinations_of_trained_steps():
    held = families.heldout_family_names()
    trained = set(families.training_family_names())
    assert len(held) >= 30 and not (set(held) & trained)
    trained_steps = {s.name for name in trained for s in families.get_family(name).steps}
    for name in held:
        assert {s.name for s in families.get_family(name).steps} <= trained_steps


def test_seeds_give_different_rows_and_splits_never_share_an_input():
    family = families.get_family("reverse>upper")
    assert family.rows(20, seed=0) == family.rows(20, seed=0)
    assert family.rows(20, seed=0) != family.rows(20, seed=1)
    train = {r["prompt"] for s in range(3) for r in family.rows(200, seed=s)}
    held = {r["prompt"] for r in family.rows(200, seed=0, split="eval")}
    assert held and not (train & held)


def test_bad_names_and_splits_are_refused_with_the_value():
    with pytest.raises(ValueError, match="'nope'"):
        families.get_family("nope")
    with pytest.raises(ValueError, match="split must be one of .* got 'test'"):
        families.get_family("reverse").rows(2, split="test")
