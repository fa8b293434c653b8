"""Datasets in TRL's formats → token ids, labels masked on the prompt, and batch collators.

Sources: a built-in task (``arith``, ``pronoun``, ``arith+pronoun``; see :mod:`.tasks`), a local
JSONL / JSON / Parquet file, or a Hugging Face hub dataset id. Row formats (plain strings or
conversational message lists, as in TRL):

* SFT: ``prompt`` + ``completion``, or ``messages`` (the last assistant turn is the target)
* preference: ``prompt`` + ``chosen`` + ``rejected``
* prompt-only: ``prompt`` (extra columns are kept for verifiers)
* unpaired (KTO): ``prompt`` + ``completion`` + ``label`` (true = desirable); paired rows are split
  into a desirable and an undesirable half
* negatives (D²O): ``prompt`` + ``rejected``

A malformed row raises ``ValueError`` naming the file, the row number and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from fastalign.models.tiny import DEFAULT_CHAT_TEMPLATE

from . import tasks

IGNORE_INDEX = -100
KINDS = ("sft", "preferences", "prompts", "unpaired", "negatives")
REQUIRED = {"sft": (("prompt", "completion"), ("messages",)),
            "preferences": (("prompt", "chosen", "rejected"),),
            "prompts": (("prompt",),),
            "unpaired": (("prompt", "completion", "label"),),
            "negatives": (("prompt", "rejected"),)}


# ----------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------
DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".arrow")


def _decode_line(raw: bytes, path, lineno) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: row {lineno} is not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None


def _read_jsonl(path):
    import gzip

    rows = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {lineno} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json_array(path):
    """A ``.json`` file holding one array of row objects (the rows are numbered from 1 in messages)."""
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (byte {raw[e.start]:#04x} at column {column}); "
                         "save the file as UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json dataset must hold an array of row objects (or one object per line), "
                         f"got a {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i} must be a JSON object, got {type(row).__name__}")
    return data


def read_rows(source: str, split: str = "train"):
    """Rows (list of dicts) from a JSONL/JSON/Parquet file or a hub dataset id, with their origin name.

    A path that exists, ends in a data-file suffix, starts with ``.`` or ``/``, or whose first folder
    exists here is local and never sent to the hub."""
    if os.path.isfile(source):
        if source.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(source)
        if source.endswith(".json"):
            return _read_jsonl(source) if _first_char(source) == "{" else _read_json_array(source)
        import datasets

        builder = "parquet" if source.endswith(".parquet") else "json"
        try:
            return list(datasets.load_dataset(builder, data_files=source, split="train"))
        except Exception as e:  # the datasets readers raise many kinds; name the file and the reader
            raise ValueError(f"{source}: could not be read as {builder} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if os.path.isdir(source):
        import datasets

        return list(datasets.load_dataset(source, split=split))
    first = source.split("/")[0]
    if source.endswith(DATA_FILE_SUFFIXES) or source.startswith((".", "/", "~")) or (
            "/" in source and first and os.path.isdir(first)):
        raise ValueError(f"dataset file {source!r} does not exist (a local path: it is not looked up on the hub)")
    if source.count("/") != 1:
        raise ValueError(f"dataset {source!r} is not a built-in task ({sorted(tasks.TASKS)}), an existing file, "
                         "or a hub id of the form 'owner/name'")
    import datasets

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # the hub raises many kinds; the user needs to know which dataset and why
        raise ValueError(f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub: "
                         f"{type(e).__name__}: {e}. Offline? Pass a local JSONL/Parquet file instead.") from e


def _first_char(path) -> str:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head[:1].decode("latin-1")


def _is_messages(value):
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_messages(value, source, i, key, *, needs_assistant):
    """A message list: string contents; a target (``needs_assistant``) must end in a non-empty assistant turn."""
    for t, m in enumerate(value, start=1):
        if not isinstance(m["content"], str) or not isinstance(m["role"], str):
            raise ValueError(f"{source}: row {i} field {key!r} turn {t} must have string 'role' and 'content', "
                             f"got {type(m['role']).__name__} and {type(m['content']).__name__}")
    if not needs_assistant:
        return
    if not value:
        raise ValueError(f"{source}: row {i} field {key!r} is empty (it needs an assistant turn to train on)")
    turns = [t for t, m in enumerate(value, start=1) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{source}: row {i} field {key!r} has no assistant turn (roles: "
                         f"{[m['role'] for m in value]}); the last assistant turn is the target")
    if not value[turns[-1] - 1]["content"]:
        raise ValueError(f"{source}: row {i} field {key!r} turn {turns[-1]} (the assistant reply, the target) is "
                         "empty")


def validate_rows(rows, kind, source):
    """Raise ValueError naming source, row and field for the first row that does not fit ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows, start=1):
        options = REQUIRED[kind]
        fields = next((f for f in options if all(k in row for k in f)), None)
        if fields is None:
            wanted = " or ".join("+".join(f) for f in options)
            missing = [k for k in options[0] if k not in row]
            raise ValueError(f"{source}: row {i} is missing field {missing[0]!r} (a {kind} row needs {wanted}); "
                             f"it has {sorted(row)}")
        for key in fields:
            value = row[key]
            if key == "label":
                if not isinstance(value, bool):
                    raise ValueError(f"{source}: row {i} field 'label' must be true (desirable) or false, got "
                                     f"{type(value).__name__}: {str(value)[:60]!r}")
                continue
            if not (isinstance(value, str) or _is_messages(value)):
                raise ValueError(f"{source}: row {i} field {key!r} must be a string or a list of "
                                 f"{{'role', 'content'}} messages, got {type(value).__name__}: {str(value)[:60]!r}")
            # Every target (completion, chosen, rejected, a messages row's last assistant turn) must be non-empty.
            if isinstance(value, list):
                _check_messages(value, source, i, key, needs_assistant=key != "prompt")
            elif key != "prompt" and not value:
                raise ValueError(f"{source}: row {i} field {key!r} is empty (it is the target to train on)")
    return rows


def load_rows(source: str, kind: str, *, n: int = 0, seed: int = 0, split: str = "train"):
    """Validated rows of ``kind`` from a built-in task spec or a file / hub dataset (first ``n`` if n>0).

    ``unpaired`` and ``negatives`` also accept preference rows: a pair becomes a desirable and an
    undesirable row (KTO), or its prompt and rejected answer (D²O: the chosen answer is dropped).
    """
    derived = kind in ("unpaired", "negatives")
    if tasks.parse_task_spec(source) is not None:
        rows = tasks.task_rows(source, "preferences" if derived else kind, n or 1000, seed=seed, split=split)
        return _from_pairs(rows, kind) if derived else rows
    rows = read_rows(source, split=split)
    rows = rows[:n] if n else rows
    if derived and rows and all(k in rows[0] for k in REQUIRED["preferences"][0]) and "completion" not in rows[0]:
        return _from_pairs(validate_rows(rows, "preferences", source), kind)
    return validate_rows(rows, kind, source)


def _from_pairs(rows, kind):
    """Preference rows as KTO's unpaired rows (each pair split in halves) or as D²O's negatives."""
    keep = lambda r: {k: v for k, v in r.items() if k not in ("chosen", "rejected")}
    if kind == "negatives":
        return [dict(keep(r), rejected=r["rejected"]) for r in rows]
    out = []
    for r in rows:
        out.append(dict(keep(r), completion=r["chosen"], label=True))
        out.append(dict(keep(r), completion=r["rejected"], label=False))
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------------------------
def chat_template(tokenizer):
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render_prompt(tokenizer, prompt):
    """A plain prompt as is; a conversational one through the chat template with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         chat_template=chat_template(tokenizer))


def _completion_text(completion):
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role") == "assistant") or completion[-1]["content"]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(tokenizer, prompt):
    ids = _ids(tokenizer, render_prompt(tokenizer, prompt))
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and (not ids or ids[0] != bos) else []) + ids


def encode_completion(tokenizer, completion):
    eos = tokenizer.eos_token_id
    return _ids(tokenizer, _completion_text(completion)) + ([eos] if eos is not None else [])


def _fit(prompt_ids, completion_ids, max_length):
    """Keep the completion; cut the prompt from the left, then the completion from the right."""
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    keep_prompt = max(max_length - len(completion_ids), min(len(prompt_ids), max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    return prompt_ids, completion_ids[: max_length - len(prompt_ids)]


def encode_sft(tokenizer, row, max_length):
    """``{"input_ids", "labels"}`` with the prompt masked to -100."""
    if "messages" in row and "completion" not in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if any(
            m["role"] == "assistant" for m in messages) else len(messages) - 1
        prompt, completion = messages[:last], [messages[last]]
    else:
        prompt, completion = row["prompt"], row["completion"]
    p, c = _fit(encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion), max_length)
    return {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}


def encode_preference(tokenizer, row, max_length):
    """``{"chosen": {...}, "rejected": {...}}``, each an SFT-style encoding on the shared prompt."""
    prompt = encode_prompt(tokenizer, row["prompt"])
    out = {}
    for key in ("chosen", "rejected"):
        p, c = _fit(prompt, encode_completion(tokenizer, row[key]), max_length)
        out[key] = {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
    return out


# ----------------------------------------------------------------------------------------------
# Collating
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Right-padded ``[B, T]`` tensors; ``position_ids`` is set for packed rows (one row, many sequences)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    index: torch.Tensor | None = None  # dataset row of each sequence (for precomputed reference log-probs)

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.position_ids),
                     move(self.index))

    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples, pad_id, index=None):
    """Pad encodings to the longest one in the batch."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return Batch(ids, mask, labels, None, None if index is None else torch.as_tensor(index))


def collate_packed(examples):
    """Padding-free: all sequences in one row; position_ids restart per sequence, so attention stays
    within each sequence, and no label crosses a boundary (each first token is never a target)."""
    ids, labels, pos = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        pos += list(range(len(e["input_ids"])))
    as_row = lambda x: torch.tensor(x, dtype=torch.long).unsqueeze(0)
    return Batch(as_row(ids), None, as_row(labels), as_row(pos))


def collate_preferences(pairs, pad_id, index=None):
    """``[2B, T]``: the B chosen sequences first, then the B rejected ones."""
    return collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id, index)
