"""TRL's DPOTrainer and GRPOTrainer with the whole loss computed by :mod:`fastalign.losses`.

Imported through :mod:`fastalign.integrations.trl` (``fa_trl.DPOTrainer``, ``fa_trl.GRPOTrainer``). Each is a
subclass of TRL's trainer with TRL's signature; only the private ``_compute_loss`` is overridden, so the
training loop, generation, the reference log-probs of GRPO, evaluation and logging stay TRL's.

How a loss is computed: the model is called through whatever wrapper the accelerator put around it
(DDP, PEFT), under TRL's autocast, with ``output_hidden_states=True`` and an empty ``logits_to_keep``, so
the backbone runs and the LM head projects zero positions; the final hidden states of the scored positions
and the head's weight then go to ``FusedLinearDPOLoss`` / ``FusedLinearGRPOLoss`` in float32, outside
autocast (as the patched head does). The head is used inside the wrapped forward, so DDP sees it used.

Constructing one of these trainers calls :func:`fastalign.integrations.trl.patch` (process-wide, as a
one-line user would): whatever the subclass does not compute itself (GRPO's generation-time and reference
log-probs) and every fallback runs TRL's own code on fastalign's kernels. A config option the fused loss
does not implement falls back to that patched TRL loss, with one warning naming the option.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import trl
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl.trainer.utils import nanmax, nanmin, use_adapter

from ..losses import FusedLinearDPOLoss, FusedLinearGRPOLoss
from . import trl as fa_trl

# Model-config fields TRL's fused head honours (softcap, logit scales) that the fused losses do not
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


class _FusedLossMixin:
    """What both trainers share: the fallback decision, its one warning, and the backbone call."""

    def _init_fused(self, reasons: list[str]) -> None:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if is_peft_model(model) else model
        text_config = base.config.get_text_config()
        reasons += [f"model config {name}={getattr(text_config, name)!r}" for name in _HEAD_TRANSFORMS
                    if getattr(text_config, name, None) not in (None, 1.0)]
        if "logits_to_keep" not in inspect.signature(type(base).forward).parameters:
            reasons.append(f"a model whose forward takes no logits_to_keep ({type(base).__name__})")
        if self.args.use_liger_kernel:
            reasons.append("use_liger_kernel=True")
        self._fused_unsupported = reasons[0] if reasons else None
        self._fused_warned = False

    def _head_reason(self, model) -> str | None:
        """Why the LM head cannot be read as a plain (weight, bias), known once the model is wrapped."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if hasattr(head, "base_layer"):  # a PEFT tuner layer: its adapter would be silently dropped
            return "a PEFT adapter on the LM head"
        if isinstance(head.weight, DTensor) or hasattr(head.weight, "ds_id"):
            return "a sharded LM head (FSDP2 or DeepSpeed ZeRO-3)"
        return None

    def _use_fused(self, model, batch_keys, known_keys) -> bool:
        """True to compute the loss with fastalign.losses; else warn once (naming the option) and fall back."""
        extra = sorted(set(batch_keys) - known_keys)
        reason = (self._fused_unsupported or (f"batch input {extra[0]!r}" if extra else None)
                  or self._head_reason(model))
        if reason is None:
            return True
        if not self._fused_warned:
            self._fused_warned = True
            warnings.warn(f"fastalign.integrations.trl.{self._trl_name}: "
                          f"{reason} is not supported by the fused loss; falling back to TRL's own loss (on "
                          f"fastalign's patched head)", stacklevel=3)
        return False

    def _final_hidden(self, model, input_ids, attention_mask):
        """The backbone's final hidden states ``[B, T, H]`` through the wrapped model, and the head's (weight, bias).

        ``logits_to_keep`` as an empty index tensor makes the head project no position (zero FLOPs) while
        the forward still goes through DDP/PEFT; ``hidden_states[-1]`` is the normalized last layer output.
        """
        no_position = torch.empty(0, dtype=torch.long, device=input_ids.device)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        output_hidden_states=True, logits_to_keep=no_position)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        return out.hidden_states[-1], head.weight, head.bias

    def _global_mean(self, mean: torch.Tensor, count) -> float:
        """The mean over every process of a local mean over ``count`` items (TRL's reduce of sum and count)."""
        count = torch.as_tensor(count, dtype=torch.float32, device=mean.device)
        totals = self.accelerator.reduce(torch.stack([mean.float() * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()


class DPOTrainer(_FusedLossMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` whose loss is :class:`fastalign.losses.FusedLinearDPOLoss` (same arguments).

    Fused: one ``loss_type`` among sigmoid, hinge, ipo, robust (any ``loss_weights``), ``f_divergence_type``
    reverse_kl, a reference model, a PEFT adapter as reference, or ``precompute_ref_log_probs``. Anything else
    (``ld_alpha``, ``use_weighting``, several loss types, MoE aux loss, vision inputs, padding-free batches, a
    softcapped or scaled head) falls back to TRL's loss with one warning. Logs TRL's metrics (``logits/*`` and
    ``mean_token_accuracy`` read off the logits the loss computes).
    """

    _trl_name = "DPOTrainer"
    _FUSED_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
    _BATCH_KEYS = {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}

    def __init__(self, *args, **kwargs):
        fa_trl.patch()  # first: what TRL computes while constructing (precomputed reference log-probs) too
        super().__init__(*args, **kwargs)
        reasons = []
        if len(self.loss_types) != 1 or self.loss_types[0] not in self._FUSED_LOSS_TYPES:
            reasons.append(f"loss_type={self.args.loss_type!r} (fused: one of {list(self._FUSED_LOSS_TYPES)})")
        for name, value, default in (("f_divergence_type", self.f_divergence_type, "reverse_kl"),
                                     ("ld_alpha", self.ld_alpha, None), ("use_weighting", self.use_weighting, False),
                                     ("padding_free", self.padding_free, False)):
            if value != default:
                reasons.append(f"{name}={value!r}")
        if self.aux_loss_enabled:
            reasons.append(f"router_aux_loss_coef={self.router_aux_loss_coef!r} (MoE auxiliary loss)")
        if self._is_vision_dataset:
            reasons.append("a vision dataset (images)")
        self._init_fused(reasons)
        if self._fused_unsupported is None:
            loss_type = self.loss_types[0]
            # TRL's sigmoid ignores label_smoothing; fastalign's would apply the conservative form
            smoothing = self.label_smoothing if loss_type == "robust" else 0.0
            self._fused_loss = FusedLinearDPOLoss(beta=self.beta, loss_type=loss_type, label_smoothing=smoothing,
                                                  head_metrics=True)

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs or not self._use_fused(model, inputs, self._BATCH_KEYS):
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        labels = input_ids.masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        hidden, weight, bias = self._final_hidden(model, input_ids, attention_mask)
        hidden = hidden[:, :-1]
        reference = {}
        if self.precompute_ref_logps:
            reference["ref_logps"] = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        else:
            with torch.no_grad(), self._reference_model() as ref_model:
                ref_hidden, ref_weight, ref_bias = self._final_hidden(ref_model, input_ids, attention_mask)
            reference.update(ref_hidden=ref_hidden[:, :-1].to(ref_weight.dtype), ref_weight=ref_weight,
                             ref_bias=ref_bias)
        with torch.autocast(hidden.device.type, enabled=False):
            loss, metrics = self._fused_loss(hidden.to(weight.dtype), weight, labels, bias=bias, **reference)
        loss = loss * self.loss_weights[0]
        self._log_fused(mode, metrics, labels != -100, attention_mask)
        return loss

    @contextlib.contextmanager
    def _reference_model(self):
        """The reference as TRL picks it: the separate model, or the PEFT model with its adapter off."""
        if is_peft_model(self.accelerator.unwrap_model(self.model)) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                yield self.model
        else:
            yield self.ref_model

    def _log_fused(self, mode, metrics, valid, attention_mask):
        """TRL's DPO metrics, reduced across processes as TRL reduces them."""
        log = self._metrics[mode]
        log["entropy"].append(self._global_mean(metrics["entropy"], valid.sum()))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        log["num_tokens"] = [self._total_train_tokens]
        b = valid.shape[0] // 2
        chosen_tokens, rejected_tokens = valid[:b].sum(), valid[b:].sum()
        log["logits/chosen"].append(self._global_mean(metrics["logits/chosen"], chosen_tokens))
        log["logits/rejected"].append(self._global_mean(metrics["logits/rejected"], rejected_tokens))
        log["mean_token_accuracy"].append(self._global_mean(metrics["mean_token_accuracy"], chosen_tokens))
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected"):
            log[name].append(self.accelerator.gather(metrics[name].reshape(1)).mean().item())


class GRPOTrainer(_FusedLossMixin, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is :class:`fastalign.losses.FusedLinearGRPOLoss` (same arguments).

    Fused: ``loss_type`` grpo, bnpo, dr_grpo, dapo, cispo; ``importance_sampling_level`` token or sequence;
    ``beta`` >= 0 with or without ``use_bias_correction_kl``; ``num_iterations`` > 1; gradient accumulation;
    a tool mask. Anything else (sapo, vespo, luspo, ``delta``, ``top_entropy_quantile`` < 1, an entropy bonus,
    ``off_policy_mask_threshold``, vLLM importance-sampling correction, MoE aux loss, vision inputs, a
    softcapped or scaled head) falls back to TRL's loss with one warning. Generation and the reference
    log-probs stay TRL's (on the patched head).
    """

    _trl_name = "GRPOTrainer"
    _FUSED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
    _BATCH_KEYS = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                   "old_per_token_logps", "ref_per_token_logps", "num_items_in_batch", "tool_mask",
                   "sampling_per_token_logps", "importance_sampling_ratio"}

    def __init__(self, *args, **kwargs):
        fa_trl.patch()  # first: what TRL computes while constructing (precomputed reference log-probs) too
        super().__init__(*args, **kwargs)
        args_ = self.args
        reasons = []
        if self.loss_type not in self._FUSED_LOSS_TYPES:
            reasons.append(f"loss_type={self.loss_type!r} (fused: one of {list(self._FUSED_LOSS_TYPES)})")
        if self.importance_sampling_level not in ("token", "sequence"):
            reasons.append(f"importance_sampling_level={self.importance_sampling_level!r}")
        for name, value, default in (("delta", args_.delta, None),
                                     ("top_entropy_quantile", self.top_entropy_quantile, 1.0),
                                     ("off_policy_mask_threshold", self.off_policy_mask_threshold, None)):
            if value != default:
                reasons.append(f"{name}={value!r}")
        if self._entropy_bonus_enabled:
            reasons.append(f"entropy_coef={args_.entropy_coef!r} (entropy bonus)")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            reasons.append("vllm_importance_sampling_correction=True")
        if self.aux_loss_enabled:
            reasons.append(f"router_aux_loss_coef={self.router_aux_loss_coef!r} (MoE auxiliary loss)")
        self._init_fused(reasons)
        if self._fused_unsupported is None:
            self._fused_loss = FusedLinearGRPOLoss(
                beta=self.beta, loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                max_completion_length=self.max_completion_length, temperature=self.temperature,
                importance_sampling_level=self.importance_sampling_level,
                kl_bias_correction=bool(self.beta and args_.use_bias_correction_kl))

    def _compute_loss(self, model, inputs):
        if not self._use_fused(model, inputs, self._BATCH_KEYS):
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        n = completion_ids.size(1)
        hidden, weight, bias = self._final_hidden(model, input_ids, attention_mask)
        hidden = hidden[:, -n - 1:-1]  # the positions that predict the completion tokens
        labels = completion_ids.masked_fill(completion_mask == 0, -100)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if self.loss_type in ("dapo", "cispo"):  # TRL's normalizer: global tokens of one accumulation window
            num_items = inputs["num_items_in_batch"].clamp(min=1.0).item() / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        ref_logps = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        with torch.autocast(hidden.device.type, enabled=False):
            loss, metrics = self._fused_loss(hidden.to(weight.dtype), weight, labels, bias=bias,
                                             advantages=inputs["advantages"], mask=mask,
                                             old_logps=inputs.get("old_per_token_logps"), ref_logps=ref_logps,
                                             num_items=num_items)
        if self.loss_type not in ("dapo", "cispo"):
            loss = loss / accumulation
        self._log_fused(mode, metrics, mask)
        return loss

    def _log_fused(self, mode, metrics, mask):
        """TRL's GRPO metrics, reduced across processes as TRL reduces them."""
        log = self._metrics[mode]
        tokens = mask.sum()
        if self.beta != 0.0:
            log["kl"].append(self._global_mean(metrics["kl"], tokens))
        log["entropy"].append(self._global_mean(metrics["entropy"], tokens))
        # sequence-level ratios are one per sequence: TRL averages them over sequences
        count = tokens if self.importance_sampling_level == "token" else mask.shape[0]
        if self.loss_type == "cispo":
            log["cispo_clip_ratio"].append(self._global_mean(metrics["cispo_clip_ratio"], count))
            return
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            log[name].append(self._global_mean(metrics[name], count))
        log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(metrics["clip_ratio/low_min"].reshape(1)))
                                         .item())
        log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(metrics["clip_ratio/high_max"].reshape(1)))
                                          .item())


__all__ = ["DPOTrainer", "GRPOTrainer"]
