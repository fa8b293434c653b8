"""A fused LM head for any ``transformers`` causal LM, outside TRL (custom loops, verl/OpenRLHF-style code)::

    from fastalign.integrations.hf import fused_lm_head
    fused_lm_head(model, temperature=0.9)
    out = model(input_ids, attention_mask=mask, labels=labels)   # no [B, T, V] logits are built
    out.log_probs, out.entropy                                     # [B, T - 1], fp32, 0 where ignored

With ``labels`` the forward runs the backbone and scores each next-token label with
:func:`fastalign.ops.token_logprobs` (native CPU kernels, Triton on CUDA): ``log_probs[:, t]`` is
``log p(labels[:, t + 1] | tokens <= t)``, as in a causal LM's own loss, and ``loss`` is the mean NLL
over the valid (``!= -100``) labels. Without ``labels`` it is the model's own forward, so ``generate``
is unchanged. The logit transforms the model's config declares (``final_logit_softcapping``,
``logit_scale``) are applied; the remaining ones (``logits_scaling`` and similar) raise, naming the
attribute, rather than give different log-probs.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from .. import ops

# Config attributes that change the logits and that this head applies, or refuses.
_APPLIED = ("final_logit_softcapping", "logit_scale")
_REFUSED = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass
class FusedLMOutput:
    """What the fused forward returns (a plain dataclass: attribute access like a ModelOutput)."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    label_mask: torch.Tensor
    logits: None = None


def _head_options(config) -> tuple[float | None, float]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _REFUSED:
        if getattr(text, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"fused_lm_head does not apply the config's {name}={getattr(text, name)!r}; "
                                      f"use the model's own forward for this model")
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    return softcap, 1.0 if scale is None else float(scale)


def fused_lm_head(model, *, temperature: float = 1.0, ignore_index: int = -100):
    """Give ``model`` (a transformers causal LM) a fused LM head; returns the model. Calling it again
    replaces the options (the original forward is kept once)."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a transformers causal LM with an output embedding (lm_head), got "
                         f"{type(model).__name__}")
    backbone = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if backbone is None or backbone is model:
        raise ValueError(f"model {type(model).__name__} exposes no backbone under base_model_prefix "
                         f"{getattr(model, 'base_model_prefix', None)!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    softcap, scale = _head_options(model.config)
    if not hasattr(model, "_fastalign_original_forward"):
        # None: the class's forward (unfuse deletes the instance attribute); else an instance override
        model._fastalign_original_forward = model.__dict__.get("forward")
    original = model._fastalign_original_forward or model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        head = self.get_output_embeddings()
        hidden = hidden.to(head.weight.device)
        targets = targets.to(head.weight.device)
        # float32 logits whatever the autocast dtype (the chunk loop's own numerics)
        with torch.autocast(hidden.device.type, enabled=False):
            logp, entropy = ops.token_logprobs(hidden, head.weight, targets, bias=head.bias,
                                               temperature=temperature, ignore_index=ignore_index,
                                               softcap=softcap, logit_scale=scale, return_entropy=True)
        mask = targets != ignore_index
        loss = -logp.sum() / mask.sum().clamp(min=1)
        return FusedLMOutput(loss=loss, log_probs=logp, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return model


def unfuse_lm_head(model):
    """Restore the model's own forward."""
    if not hasattr(model, "_fastalign_original_forward"):
        return model
    original = model.__dict__.pop("_fastalign_original_forward")
    if original is None:
        del model.forward
    else:
        model.forward = original
    return model


__all__ = ["fused_lm_head", "unfuse_lm_head", "FusedLMOutput"]
