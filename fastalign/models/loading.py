"""Load causal LMs and tokenizers from ``"tiny"``, a local folder or a hub id; dtype, attention, LoRA."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
from pathlib import Path

import torch

from . import tiny

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """``"tiny"`` → the cached tiny model folder (built on first use); anything else unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be 'tiny', a local folder or a hub id, got {name!r}")
    return str(tiny.tiny_path()) if name == tiny.TINY_NAME else name


def _hub_error(kind, name, err):
    local = "it is not a local folder, and " if not os.path.isdir(name) else "the local folder could not be read: "
    return OSError(f"could not load {kind} {name!r}: {local}the Hugging Face hub could not provide it "
                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline? Pass a local "
                   "folder, or model=tiny for the built-in default.")


def load_tokenizer(name: str):
    """A tokenizer with a pad token (EOS when it has none) and a chat template (built-in default when none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _hub_error("tokenizer", name, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = tiny.DEFAULT_CHAT_TEMPLATE
    return tok


def check_attn_implementation(attn_implementation: str):
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be 'sdpa', 'eager' or 'flash_attention_2', got "
                         f"{attn_implementation!r}")
    if attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device; use 'sdpa'")
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation='flash_attention_2' needs flash-attn installed "
                             "(pip install 'fastalign[gpu]'); use 'sdpa'")


def load_causal_lm(name: str, *, dtype: str = "float32", attn_implementation: str = "sdpa",
                   gradient_checkpointing: bool = False, device=None):
    """A ``transformers`` causal LM in ``dtype`` with the given attention kernel."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load would bury the training progress
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_attn_implementation(attn_implementation)
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    except OSError as e:
        raise _hub_error("model", name, e) from e
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if device is not None:
        model.to(device)
    return model


def apply_lora(model, *, r: int, alpha: float, dropout: float, target_modules):
    """Wrap ``model`` with LoRA adapters (peft); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA (lora_r > 0) needs peft: pip install 'fastalign[peft]'") from e
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_from_config(cfg, name: str | None = None, device=None):
    """The model named by ``name`` (default ``cfg.model``) with the config's dtype, attention, checkpointing, LoRA."""
    model = load_causal_lm(name or cfg.model, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                           gradient_checkpointing=cfg.gradient_checkpointing, device=device)
    if cfg.lora_r > 0:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules)
    return model


def base_causal_lm(model):
    """The ``*ForCausalLM`` under a peft wrapper (adapters stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_pretrained(model, tokenizer, folder) -> Path:
    """Save a loadable model folder; LoRA adapters are merged so the folder is a plain causal LM."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def module_bytes(module) -> int:
    """Parameters + buffers, in bytes (a shared tensor counted once)."""
    tensors = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cache_argument(lm) -> str:
    """The keyword the model's forward takes its KV cache by (transformers 5 renamed it to ``cache``)."""
    params = inspect.signature(base_causal_lm(lm).forward).parameters
    return "cache" if "cache" in params else "past_key_values"
