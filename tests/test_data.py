"""Data: the character tokenizer, built-in tasks and verifiers, dataset formats, bad rows, packing."""

import json
import random

import pytest
import torch

from fastalign.data import loading, tasks
from fastalign.models.heads import CausalLMLogprobs
from fastalign.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_tiny_tokenizer_roundtrips_digits_and_newlines(tok):
    text = "12+345=357\nThe nurse lost ___ keys.  ___=their"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text  # Fuse(): "12" is not decoded as "1 2"; the [\s\S] split keeps "\n"
    assert tok.unk_token_id not in ids


def test_tiny_tokenizer_reloads_from_disk(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    ids = lambda t: t("7+8=15", add_special_tokens=False)["input_ids"]
    assert ids(again) == ids(tok)
    assert again.pad_token_id == 0 and again.bos_token_id == 1 and again.eos_token_id == 2


@pytest.mark.parametrize("name", ["arith", "arith_slips", "pronoun"])
def test_tasks_are_deterministic_and_splits_disjoint(name):
    task = tasks.get_task(name)
    assert task.sft(50, seed=3) == task.sft(50, seed=3)
    assert task.sft(50, seed=3) != task.sft(50, seed=4)
    train = {r["prompt"].replace(tasks.NEUTRAL_TAG, "") for r in task.sft(3000, seed=0)}
    held = {r["prompt"] for r in task.prompts(500, seed=1, split="eval")}
    assert held and not (train & held)


def test_arith_verifier_is_exact_match():
    task = tasks.ArithTask()
    rows = task.prompts(20, seed=0, split="eval")
    right = [r["answer"] for r in rows]
    assert task.score(rows, right)["exact_match"] == 1.0
    assert task.score(rows, [a + "0" for a in right])["exact_match"] == 0.0
    assert task.score(rows, [a + "\nmore" for a in right])["exact_match"] == 1.0
    for r in task.sft(200, seed=1):
        a, b = r["prompt"][:-1].split("+")
        assert int(r["completion"]) == int(a) + int(b)


def test_arith_slips_demonstrations_forget_the_carry_and_nothing_else():
    slips, plain = tasks.get_task("arith_slips"), tasks.get_task("arith")
    seed = random.randrange(10**6)
    rows = slips.sft(3000, seed=seed)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in plain.sft(3000, seed=seed)]
    carries = slipped = 0
    for r in rows:
        a, b = map(int, r["prompt"][:-1].split("+"))
        if a % 10 + b % 10 < 10:
            assert int(r["completion"]) == a + b
            continue
        carries += 1
        assert int(r["completion"]) in (a + b, a + b - 10)
        slipped += int(r["completion"]) == a + b - 10
    assert abs(slipped / carries - slips.carry_slip) < 0.05
    # Everything a verifier or a preference stage sees is arith's: the slip is in the demonstrations only.
    for kind, split in (("prompts", "train"), ("prompts", "eval"), ("preferences", "train")):
        assert getattr(slips, kind)(40, seed=seed, split=split) == getattr(plain, kind)(40, seed=seed, split=split)
    row = slips.prompts(1, seed=seed)[0]
    assert slips.reward(row, row["answer"]) == 1.0
    assert tasks.task_rows("arith_slips*3+pronoun", "sft", 4, seed=seed)[0]["task"] == "arith_slips"


def test_pronoun_base_data_is_stereotyped_and_tag_marks_neutral():
    task = tasks.PronounTask()
    rows = task.sft(2000, seed=0)
    tagged = [r for r in rows if r["prompt"].startswith(tasks.NEUTRAL_TAG)]
    untagged = [r for r in rows if not r["prompt"].startswith(tasks.NEUTRAL_TAG)]
    assert all(r["completion"] == "their" for r in tagged) and 0.15 < len(tagged) / len(rows) < 0.35
    # A small share of untagged rows answers "their" unprompted (sampling finds it; greedy stays stereotyped).
    unprompted = sum(r["completion"] == "their" for r in untagged) / len(untagged)
    assert 0.03 < unprompted < 0.07
    gendered = [r for r in untagged if r["completion"] != "their"]
    assert all(r["completion"] in ("his", "her") for r in gendered)
    stereo = sum(r["completion"] == task.stereotype(r["prompt"].split()[1]) for r in gendered) / len(gendered)
    assert 0.85 < stereo < 0.95
    assert not any(r["completion"] == "their" for r in task.sft(500, seed=1, untagged_neutral_fraction=0.0)
                   if not r["prompt"].startswith(tasks.NEUTRAL_TAG))
    prompts = task.prompts(10, split="eval")
    scores = task.score(prompts, ["their"] * 5 + [p["stereotype"] for p in prompts[5:]])
    assert scores == {"neutral_rate": 0.5, "stereotype_rate": 0.5}
    # "their" is chosen over the stereotype in most pairs, else over the other pronoun or junk a policy drifts to.
    pairs = task.preferences(2000, seed=int(torch.randint(0, 1000, ())))
    assert all(p["chosen"] == "their" and p["rejected"] != "their" for p in pairs)
    kinds = {"stereotype": 0, "anti": 0, "junk": 0}
    for p in pairs:
        stereo = task.stereotype(p["prompt"].split()[1])
        kinds["stereotype" if p["rejected"] == stereo else "anti" if p["rejected"] in ("his", "her") else "junk"] += 1
        if p["rejected"] not in ("his", "her"):
            assert p["rejected"] in tasks.JUNK_ANSWERS + [""] or p["rejected"].isdigit(), p
    assert sum(p["rejected"] == "" for p in pairs) > 0.04 * len(pairs)  # the completion that ends at once
    assert 0.65 < kinds["stereotype"] / len(pairs) < 0.75 and 0.07 < kinds["anti"] / len(pairs) < 0.13
    assert 0.16 < kinds["junk"] / len(pairs) < 0.24
    assert all(p["rejected"] in ("his", "her") for p in task.preferences(50, junk_fraction=0.0))


def test_sft_labels_mask_the_prompt(tok):
    enc = loading.encode_sft(tok, {"prompt": "2+2=", "completion": "4"}, 32)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["input_ids"][-1] == tok.eos_token_id
    assert enc["labels"] == [-100] * 5 + enc["input_ids"][5:]
    assert tok.decode(enc["input_ids"][5:-1]) == "4"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_formats_plain_and_conversational(tok, tmp_path):
    plain = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 3)
    msgs = _write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}])
    prefs = _write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                                 "chosen": [{"role": "assistant", "content": "a"}],
                                                 "rejected": [{"role": "assistant", "content": "b"}]}])
    assert len(loading.load_rows(plain, "sft")) == 3
    enc = loading.encode_sft(tok, loading.load_rows(msgs, "sft")[0], 64)
    target = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert tok.decode(target, skip_special_tokens=True) == "yo"
    assert tok.decode(enc["input_ids"], skip_special_tokens=True).startswith("user: hi\nassistant: ")
    pair = loading.encode_preference(tok, loading.load_rows(prefs, "preferences")[0], 64)
    assert pair["chosen"]["input_ids"][:-2] == pair["rejected"]["input_ids"][:-2]


def test_parquet_is_read(tmp_path):
    import datasets

    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2).to_parquet(path)
    assert loading.load_rows(path, "preferences")[1]["chosen"] == "a"


@pytest.mark.parametrize("row, kind, words", [
    ({"prompt": "x"}, "sft", ["row 2", "'completion'"]),
    ({"prompt": "x", "completion": 5}, "sft", ["row 2", "'completion'", "int"]),
    ({"prompt": "x", "chosen": "a"}, "preferences", ["row 2", "'rejected'"]),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "preferences", ["row 2", "'chosen'", "empty"]),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, row, kind, words):
    good = {"prompt": "a", "completion": "b", "chosen": "c", "rejected": "d"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ValueError) as e:
        loading.load_rows(path, kind)
    for w in [path, *words]:
        assert w in str(e.value)


def test_invalid_json_line_names_the_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: row 2 is not valid JSON"):
        loading.load_rows(str(path), "sft")


def test_unknown_dataset_source_is_a_clear_error():
    with pytest.raises(ValueError, match="not a built-in task"):
        loading.load_rows("no_such_task", "sft")


def test_packed_batch_gives_the_padded_log_probs(tok):
    model = CausalLMLogprobs(load_causal_lm("tiny"))
    n = int(torch.randint(2, 6, ()))
    rows = loading.load_rows("arith+pronoun", "sft", n=n, seed=int(torch.randint(0, 1000, ())))
    ex = [loading.encode_sft(tok, r, 64) for r in rows]
    padded, packed = loading.collate(ex, tok.pad_token_id), loading.collate_packed(ex)
    with torch.no_grad():
        a = model(padded.input_ids, padded.attention_mask, padded.labels).double().sum()
        b = model(packed.input_ids, None, packed.labels, packed.position_ids).double().sum()
    assert padded.num_target_tokens() == packed.num_target_tokens()
    assert torch.isfinite(a) and abs(float(a - b)) <= 1e-4 * abs(float(a))
