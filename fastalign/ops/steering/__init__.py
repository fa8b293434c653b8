"""Token-level steering: combine the logits of several prompt branches into one next-token score."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import dispatch
from .. import validation as v
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref

__all__ = ["steer_logits"]  # fastalign.ops re-exports these


def _betas(betas, num_neg: int, like: torch.Tensor) -> torch.Tensor:
    """``betas`` as a float32 ``[K]`` tensor on ``like``'s device (all ones when None)."""
    if betas is None:
        return torch.ones(num_neg, dtype=torch.float32, device=like.device)
    if isinstance(betas, torch.Tensor):
        v.float_tensor("betas", betas, dim=1)
        if betas.device != like.device and betas.device.type != "cpu":
            raise ValueError(f"betas must be on {like.device} (or the CPU), got {betas.device}")
        if betas.shape[0] != num_neg:
            raise ValueError(f"betas must have K={num_neg} entries (one per negative branch), got {betas.shape[0]}")
        betas = betas.detach().to(device=like.device, dtype=torch.float32).contiguous()
        if v.check_values_enabled() and num_neg and not bool(torch.isfinite(betas).all()):
            raise ValueError(f"betas must be finite, got {betas.tolist()}")
        return betas
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence):
        raise TypeError(f"betas must be a sequence of K floats or a [K] tensor, got {type(betas).__name__}")
    if len(betas) != num_neg:
        raise ValueError(f"betas must have K={num_neg} entries (one per negative branch), got {len(betas)}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"betas[{i}] must be a number, got {type(b).__name__}")
        if not math.isfinite(b):
            raise ValueError(f"betas[{i}] must be finite, got {b}")
    return torch.tensor([float(b) for b in betas], dtype=torch.float32, device=like.device)


def steer_logits(value_logits, base_logits, negative_logits=None, *, alpha=1.0, betas=None, top_p=1.0,
                 min_tokens_to_keep=1, temperature=1.0):
    """Steered next-token logits: amplify the value-conditioned branch, suppress contrary ones.

    ``value_logits`` and ``base_logits`` are ``[B, V]``: the model's next-token logits with and
    without the value instruction; ``negative_logits`` is ``[K, B, V]`` (or None): logits under
    K contrary instructions. All branches share one dtype (fp32/bf16/fp16/fp64) and device. In
    float32::

        z = value + alpha * (value - base) - sum_j betas[j] * (negatives[j] - base)

    is divided by ``temperature`` (as generation does before top-p), and every token outside the
    top-p set of the value-conditioned distribution ``softmax(value / temperature)`` becomes
    -inf: the smallest set of most probable tokens whose mass reaches ``top_p``, at least
    ``min_tokens_to_keep`` of them, plus every token whose probability ties the last one needed
    (all backends apply this tie rule). ``top_p = 1`` keeps every token.

    ``alpha = r`` with no negatives is Linear Alignment's ``(1 + r) z(y|v,x) - r z(y|x)``; one
    negative with a reverse prompt is ROSE; classifier-free guidance has the same shape. With
    ``alpha = 0``, no negatives and ``top_p = 1`` the result is exactly ``value_logits / temperature``.

    Returns a float32 ``[B, V]`` tensor. Inference only: there is no backward, and the result is
    detached from autograd even when the inputs require grad. Inputs are expected to be finite
    model logits; apply logits processors that write -inf (banned words, grammar masks) afterwards.
    """
    v.float_tensor("value_logits", value_logits, dim=2)
    batch, vocab = value_logits.shape
    if vocab < 1:
        raise ValueError(f"value_logits must be [B, V] with V >= 1, got shape {tuple(value_logits.shape)}")
    v.float_tensor("base_logits", base_logits)
    v.same_shape("base_logits", base_logits, value_logits.shape, ref="value_logits")
    v.same_device("base_logits", base_logits, value_logits, "value_logits")
    _same_dtype("base_logits", base_logits, value_logits)
    num_neg = 0
    if negative_logits is not None:
        v.float_tensor("negative_logits", negative_logits, dim=3)
        num_neg = negative_logits.shape[0]
        v.same_shape("negative_logits", negative_logits, (num_neg, batch, vocab), ref="[K, *value_logits.shape]")
        v.same_device("negative_logits", negative_logits, value_logits, "value_logits")
        _same_dtype("negative_logits", negative_logits, value_logits)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    betas_t = _betas(betas, num_neg, value_logits)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    v.integer("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
    v.positive("temperature", temperature)
    if num_neg == 0:
        negative_logits = None
    _, impl = dispatch.select("steer_logits", value_logits.device)
    return impl(value_logits.detach(), base_logits.detach(),
                None if negative_logits is None else negative_logits.detach(),
                alpha=float(alpha), betas=betas_t, top_p=float(top_p), min_tokens_to_keep=min_tokens_to_keep,
                temperature=float(temperature))


def _same_dtype(name: str, x: torch.Tensor, ref_tensor: torch.Tensor) -> None:
    if x.dtype != ref_tensor.dtype:
        raise TypeError(f"{name} must have the dtype of value_logits ({str(ref_tensor.dtype).replace('torch.', '')}), "
                        f"got {str(x.dtype).replace('torch.', '')}")


dispatch.register("steer_logits", "torch")(ref.steer_logits)
