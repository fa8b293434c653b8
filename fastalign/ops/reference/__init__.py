"""Pure-PyTorch reference implementations: the spec every fast backend is tested against.

Each op's spec lives beside it (``fastalign/ops/<family>/spec.py``, listed in its ``__all__``); this
namespace gathers them. They favour clarity over speed (token_logprobs materializes the full logits
here), accumulate in float32 and take already-validated inputs with the same keywords as the ops.
"""

from ..advantages import spec as _advantages
from ..advantages.spec import *  # noqa: F403
from ..kl import spec as _kl
from ..kl.spec import *  # noqa: F403
from ..logprobs import spec as _logprobs
from ..logprobs.spec import *  # noqa: F403
from ..offpolicy import spec as _offpolicy
from ..offpolicy.spec import *  # noqa: F403
from ..policy import spec as _policy
from ..policy.spec import *  # noqa: F403
from ..preference import spec as _preference
from ..preference.spec import *  # noqa: F403
from ..steering import spec as _steering
from ..steering.spec import *  # noqa: F403

__all__ = [name for spec in (_logprobs, _kl, _advantages, _policy, _preference, _steering,
                                          _offpolicy) for name in spec.__all__]
