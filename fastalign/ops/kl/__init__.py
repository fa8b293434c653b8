"""Per-token KL estimators between policy and reference log-probs."""

from __future__ import annotations

from .. import dispatch
from .. import validation as v
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from .spec import KlKind
from .spec import kl_penalty as _kl_penalty_spec

__all__ = ["kl_penalty"]  # fastalign.ops re-exports these

KL_KINDS = KlKind.names()


def kl_penalty(logp, ref_logp, *, kind="k3"):
    """Elementwise estimator of KL(policy || ref) with ``d = ref_logp - logp``.

    ``k1 = -d``, ``k2 = d²/2``, ``k3 = exp(d) - d - 1``, ``abs = |d|``. fp32 output, gradient
    w.r.t. ``logp`` only (``ref_logp`` is a constant).
    """
    v.float_tensor("logp", logp)
    v.float_tensor("ref_logp", ref_logp)
    v.same_shape("ref_logp", ref_logp, logp.shape, ref="logp")
    v.same_device("ref_logp", ref_logp, logp, "logp")
    v.choice("kind", kind, KL_KINDS)
    _, impl = dispatch.select("kl_penalty", logp.device)
    return impl(logp, ref_logp, kind=kind)


dispatch.register("kl_penalty", "torch")(_kl_penalty_spec)
