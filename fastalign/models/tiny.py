"""The tiny default model: a real ``LlamaForCausalLM`` (~1 M parameters) and a character-level tokenizer.

Built once from a fixed seed and cached under ``$FASTALIGN_CACHE`` (default ``~/.cache/fastalign``)
with ``save_pretrained``; every later use reloads it with ``from_pretrained``, exactly like a hub
model. The tokenizer is a ``tokenizers`` WordLevel model over single characters: the ``[\\s\\S]``
split keeps newlines (``.`` would drop them) and ``decoders.Fuse()`` decodes "12" as "12", not "1 2".
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_NAME = "tiny"
TINY_VERSION = "tiny-llama-v1"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + " \n" + string.punctuation
# Plain "role: content" lines: readable by a character-level model and by a person.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TINY_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, initializer_range=0.02)


def cache_dir() -> Path:
    """The fastalign cache: ``$FASTALIGN_CACHE`` or ``~/.cache/fastalign``."""
    return Path(os.environ.get("FASTALIGN_CACHE") or Path.home() / ".cache" / "fastalign")


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (pad=0, bos=1, eos=2, unk=3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", model_max_length=TINY_CONFIG["max_position_embeddings"])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, seed: int = 0):
    """A freshly initialised tiny ``LlamaForCausalLM`` (deterministic for a given seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def tiny_path() -> Path:
    """The cached tiny model folder, built on first use (safe when several processes race)."""
    target = cache_dir() / TINY_VERSION
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(len(tokenizer))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: its copy is identical
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
