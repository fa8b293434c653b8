"""Reference-model strategies for DPO-style flows, chosen by ``reference:`` in the config.

Each strategy answers ``token_logps(batch)`` — the frozen reference's per-token log-probs of the
batch's labels, without gradient — and reports ``extra_bytes``, the memory it adds over the policy
(logged at start-up so the trade-offs are visible):

* ``frozen_copy``  — a full copy of the starting policy, optionally in bf16 and/or parked on the
  CPU between uses (on a GPU run). Cost: one model.
* ``adapter``      — the policy is LoRA; the reference is the same weights with adapters disabled.
  Cost: nothing.
* ``precomputed``  — one reference pass over the training set before training, cached on disk
  under ``$FASTALIGN_CACHE/reference/<hash of data + model>.pt``. Cost: two numbers per sequence
  (sequence sum and token count); per-token log-probs are not kept, so the flows use sequence sums.
* ``shared_trunk`` — the policy trains only its top ``k`` layers; the reference reuses the
  policy's (frozen, identical) trunk activations and runs only its own copy of the top ``k``
  layers. Cost: ``k`` layers.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from .heads import CausalLMLogprobs, decoder, lm_head, target_mask
from .loading import base_causal_lm, parameter_bytes
from .tiny import cache_dir

STRATEGIES = ("frozen_copy", "adapter", "precomputed", "shared_trunk")


def _forward(model, batch):
    return model(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)


class FrozenCopy:
    name = "frozen_copy"

    def __init__(self, policy: CausalLMLogprobs, dtype: str = "", offload: bool = False):
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        if dtype:
            self.model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
        self.device = next(policy.parameters()).device
        self.offload = offload and self.device.type != "cpu"
        if self.offload:
            self.model.to("cpu")
        self.extra_bytes = parameter_bytes(self.model)

    @torch.no_grad()
    def token_logps(self, batch):
        if self.offload:
            self.model.to(self.device, non_blocking=True)
        out = _forward(self.model, batch)
        if self.offload:
            self.model.to("cpu")
        return out


class AdapterDisabled:
    name = "adapter"
    extra_bytes = 0

    def __init__(self, policy: CausalLMLogprobs):
        if not hasattr(policy.lm, "disable_adapter"):
            raise ValueError("reference='adapter' needs a LoRA policy: set lora_r > 0")
        self.policy = policy

    @torch.no_grad()
    def token_logps(self, batch):
        with self.policy.lm.disable_adapter():
            return _forward(self.policy, batch)


class SharedTrunk:
    """Top-``k`` reference layers fed by the trunk activations the policy's forward just computed."""

    name = "shared_trunk"

    def __init__(self, policy: CausalLMLogprobs, k: int):
        trunk = decoder(policy.lm)
        layers = trunk.layers
        if not 1 <= k < len(layers):
            raise ValueError(f"trainable_top_layers must be in [1, {len(layers) - 1}] for a model with "
                             f"{len(layers)} layers, got {k}")
        # The policy trains only its top k layers; everything below (and the norm and head) is shared and frozen.
        policy.requires_grad_(False)
        for layer in layers[len(layers) - k:]:
            layer.requires_grad_(True)
        self.policy = policy
        self.top = copy.deepcopy(layers[len(layers) - k:]).eval().requires_grad_(False)
        self.norm, self.head = trunk.norm, lm_head(policy.lm)
        self.captured = None
        layers[len(layers) - k].register_forward_pre_hook(self._capture, with_kwargs=True)
        self.extra_bytes = parameter_bytes(self.top)

    def _capture(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.captured = (hidden.detach(), rest)

    @torch.no_grad()
    def token_logps(self, batch):
        from fastalign import ops

        if self.captured is None or self.captured[0].shape[:2] != batch.input_ids.shape:
            decoder(self.policy.lm)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, use_cache=False)
        hidden, kwargs = self.captured
        self.captured = None
        for layer in self.top:
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = self.norm(hidden)
        return ops.token_logprobs(hidden[:, :-1], self.head.weight, batch.labels[:, 1:], bias=self.head.bias)


class Precomputed:
    """Sequence sums and token counts of the reference, per training row, computed once and cached."""

    name = "precomputed"

    def __init__(self, policy: CausalLMLogprobs, pairs, collate_fn, batch_size: int = 64):
        key = hashlib.sha256()
        for p in base_causal_lm(policy.lm).state_dict().values():
            key.update(p.detach().float().cpu().numpy().tobytes())
        for pair in pairs:
            key.update(repr((pair["chosen"]["input_ids"], pair["chosen"]["labels"], pair["rejected"]["input_ids"],
                             pair["rejected"]["labels"])).encode())
        path = cache_dir() / "reference" / f"{key.hexdigest()[:24]}.pt"
        if path.exists():
            table = torch.load(path, weights_only=True)  # a tensor; never unpickle objects (torch < 2.6 would)
        else:
            table = self._compute(policy, pairs, collate_fn, batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}")
            torch.save(table, tmp)
            tmp.replace(path)
        self.path, self.table = path, table
        self.extra_bytes = table.numel() * table.element_size()

    @staticmethod
    @torch.no_grad()
    def _compute(policy, pairs, collate_fn, batch_size):
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        rows = []
        for start in range(0, len(pairs), batch_size):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            batch = collate_fn([pairs[i] for i in idx], idx).to(device)
            logp = _forward(policy, batch)
            mask = target_mask(batch.labels)
            sums, counts = (logp * mask).sum(1).double(), mask.sum(1).double()
            n = len(idx)
            rows.append(torch.stack([sums[:n], counts[:n], sums[n:], counts[n:]], dim=1).cpu())
        policy.train(was_training)
        return torch.cat(rows)  # [rows, 4]: chosen sum, chosen count, rejected sum, rejected count

    def sequence_logps(self, batch):
        """``(sums [2B], counts [2B])`` for a preference batch (chosen rows first) from the cache."""
        t = self.table[batch.index.cpu()]
        return (torch.cat([t[:, 0], t[:, 2]]).float().to(batch.input_ids.device),
                torch.cat([t[:, 1], t[:, 3]]).float().to(batch.input_ids.device))


def build_reference(strategy: str, policy: CausalLMLogprobs, cfg, *, pairs=None, collate_fn=None):
    """The reference for ``strategy`` (see the module docstring); prints its memory cost."""
    if strategy == "frozen_copy":
        ref = FrozenCopy(policy, cfg.reference_dtype, cfg.reference_offload)
    elif strategy == "adapter":
        ref = AdapterDisabled(policy)
    elif strategy == "shared_trunk":
        ref = SharedTrunk(policy, cfg.trainable_top_layers)
    elif strategy == "precomputed":
        ref = Precomputed(policy, pairs, collate_fn)
    else:
        raise ValueError(f"reference must be one of {STRATEGIES}, got {strategy!r}")
    return ref


def sequence_logps(reference, batch, average: bool):
    """Reference sequence log-probs ``[2B]`` (sum, or mean over target tokens when ``average``)."""
    if isinstance(reference, Precomputed):
        sums, counts = reference.sequence_logps(batch)
        return sums / counts.clamp(min=1) if average else sums
    from fastalign import ops

    return ops.sequence_logprobs(reference.token_logps(batch), target_mask(batch.labels), average=average)
