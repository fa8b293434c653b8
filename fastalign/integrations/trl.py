"""fastalign's kernels inside TRL's trainers, in one line::

    import fastalign.integrations.trl as fa_trl
    fa_trl.patch()          # before building the trainer; or ``with fa_trl.patched(): ...``

TRL (1.16) computes the log-probs of SFT, DPO, GRPO, KTO, RLOO (and any trainer built on the same
primitive) through ``trl.trainer.utils.add_fused_lm_head``, whose forward calls the module global
``_ChunkedLogProbFunction``. :func:`patch` swaps that global for :class:`FusedLogProbFunction`, which
computes every output TRL asks for (log-prob, entropy, log sum p^2, mean logit, is-top-1, with
temperature, softcap and logit scale) with :func:`fastalign.ops.token_logprobs`: the native CPU kernels
on CPU, Triton on CUDA. It also makes the head score only the valid (label != -100) positions on every
device (TRL does so on CUDA only). Models already given a fused head pick the swap up at their next
call, since the global is looked up on each forward. :func:`unpatch` restores TRL's objects exactly.

Deeper, opt-in: ``fa_trl.DPOTrainer`` / ``fa_trl.GRPOTrainer`` (:mod:`.trl_trainers`) are TRL's trainers
with the whole loss computed by :mod:`fastalign.losses`; they patch on construction.

Options fastalign cannot honour raise, naming the option, instead of training a different loss:
a DeepSpeed ZeRO-3 partitioned LM head (TRL gathers it around its own backward), or an output name
this version does not know.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .. import ops

# Tested range: TRL's primitive (its call signature, outputs and the compact switch) as of 1.16.
MIN_VERSION = "1.16.0"
MAX_VERSION = "1.17.0"  # exclusive
SUPPORTED = f"trl>={MIN_VERSION},<{MAX_VERSION}"

# TRL's output names -> fastalign's extras (log_probs is always computed; entropy is return_entropy)
_EXTRA_OF = {"log_sum_sq_probs": "log_sum_p2", "mean_logits": "mean_logit", "is_top1": "is_top1"}
OUTPUTS = ("log_probs", "entropy", *_EXTRA_OF)

_lock = threading.Lock()
_saved: dict[str, object] = {}


def _utils():
    try:
        import trl
        from trl.trainer import utils
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"fastalign.integrations.trl needs TRL ({SUPPORTED}): pip install 'trl{SUPPORTED[3:]}' "
                          f"({exc})") from exc
    return trl, utils


def check_version(version: str | None = None) -> None:
    """Raise unless ``version`` (default: the installed TRL's) is in the tested range."""
    from packaging.version import Version

    if version is None:
        version = _utils()[0].__version__
    v = Version(version)
    if not (Version(MIN_VERSION) <= v < Version(MAX_VERSION)):
        raise RuntimeError(f"fastalign.integrations.trl supports {SUPPORTED} (the range it is tested against); "
                           f"found trl {version}. Install a supported TRL, or leave TRL unpatched.")


def _zero3_partitioned(t: torch.Tensor | None) -> bool:
    return t is not None and hasattr(t, "ds_id")


class FusedLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``: same ``apply`` signature and outputs."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUTS):
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"TRL's fused head asked for outputs {unknown}, which fastalign.integrations.trl does "
                             f"not know (known: {OUTPUTS}); unpatch() to use TRL's own function")
        if _zero3_partitioned(weight) or _zero3_partitioned(bias):
            raise NotImplementedError("fastalign.integrations.trl cannot honour a DeepSpeed ZeRO-3 partitioned "
                                      "lm_head (TRL re-gathers it inside its own backward); unpatch() under ZeRO-3")
        del chunk_size  # vocabulary tile width of TRL's loop; fastalign chunks tokens by memory budget instead
        extras = tuple(_EXTRA_OF[o] for o in OUTPUTS if o in outputs and o in _EXTRA_OF)
        want_entropy = "entropy" in outputs
        # fastalign's chunk loop computes in float32 whatever the autocast dtype (TRL's rounds the logits to it)
        with torch.autocast(hidden.device.type, enabled=False):
            out = ops.token_logprobs(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                     softcap=final_logit_softcapping,
                                     logit_scale=1.0 if logit_scale is None else float(logit_scale),
                                     return_entropy=want_entropy, return_extras=extras or ())
        if not extras:
            logp, entropy = out if want_entropy else (out, None)
            return logp, entropy, None, None, None
        return (out["logp"], out.get("entropy"), out.get("log_sum_p2"), out.get("mean_logit"), out.get("is_top1"))


def _score_valid_positions_only(device: torch.device) -> bool:
    """Replaces TRL's ``_use_triton`` in the head: compact (valid positions only) on every device."""
    return True


def is_patched() -> bool:
    return bool(_saved)


def patch() -> None:
    """Route TRL's fused LM head through fastalign. Harmless when already patched."""
    trl, utils = _utils()
    check_version(trl.__version__)
    for name in ("_ChunkedLogProbFunction", "_use_triton", "add_fused_lm_head"):
        if not hasattr(utils, name):
            raise RuntimeError(f"trl.trainer.utils has no {name} in trl {trl.__version__}: this TRL does not "
                               f"build its fused head the way fastalign patches ({SUPPORTED})")
    with _lock:
        if _saved:
            return
        _saved["_ChunkedLogProbFunction"] = utils._ChunkedLogProbFunction
        _saved["_use_triton"] = utils._use_triton
        utils._ChunkedLogProbFunction = FusedLogProbFunction
        utils._use_triton = _score_valid_positions_only


def unpatch() -> None:
    """Restore TRL's own objects (the very same ones). Harmless when not patched."""
    _, utils = _utils()
    with _lock:
        for name, obj in _saved.items():
            setattr(utils, name, obj)
        _saved.clear()


@contextlib.contextmanager
def patched():
    """``with patched(): trainer.train()`` — patched inside, restored after (unless it was patched before)."""
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()


# DPOTrainer and GRPOTrainer are attributes too, loaded on first use (see __getattr__)
__all__ = ["patch", "unpatch", "patched", "is_patched", "check_version", "FusedLogProbFunction", "SUPPORTED"]


def __getattr__(name):
    # The trainers subclass TRL's, so importing them imports TRL: only when asked for.
    if name in ("DPOTrainer", "GRPOTrainer"):
        from . import trl_trainers

        return getattr(trl_trainers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
