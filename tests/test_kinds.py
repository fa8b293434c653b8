"""Kind lists are declared once, in Python, and every language agrees and rejects unknown codes.

The C++ enums in csrc/ mirror the ``Kind`` enums of the op specs: this test parses every ``enum X :
int {...}`` in csrc/ and fails on any drift (a renamed, renumbered, added or missing kind, or a count
constant that disagrees). The Triton kernels take the codes from the Python enums directly. Then a
bogus code is sent to every backend of every op with a kind and must come back as an error.
"""

from __future__ import annotations

import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import fastalign.ops
from fastalign import ops
from fastalign.ops import dispatch
from fastalign.ops.advantages.spec import AdvantageScale
from fastalign.ops.kinds import Kind
from fastalign.ops.kl.spec import KlKind
from fastalign.ops.offpolicy.spec import RolloutIsMode
from fastalign.ops.policy.spec import ImportanceLevel, PolicyLossType, PolicyObjective
from fastalign.ops.preference.spec import DpoLossType

ROOT = Path(__file__).resolve().parents[1]
# Python enum -> the prefix of its C++ enumerators (kKlK3, kDpoIpo, kScaleGroup).
MIRRORED_IN_CPP = {KlKind: "Kl", DpoLossType: "Dpo", AdvantageScale: "Scale", ImportanceLevel: "Level",
                   PolicyObjective: "Objective", RolloutIsMode: "Rollout"}
# Kinds no kernel switches on (the aggregation of the policy loss is a per-row scale computed in Python).
PYTHON_ONLY = {PolicyLossType}


def _declared_kinds() -> set[type]:
    kinds = set()
    for mod in pkgutil.walk_packages(fastalign.ops.__path__, "fastalign.ops."):
        module = __import__(mod.name, fromlist=["_"])
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Kind) and obj is not Kind:
                kinds.add(obj)
    return kinds


def _cpp_enums() -> dict[str, tuple[dict[str, int], int | None]]:
    """``{enum name: ({enumerator: value}, count constant or None)}`` over every header and source in csrc/."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "csrc").rglob("*")) if p.suffix in (".h", ".cpp", ".cu",
                                                                                               ".cuh"))
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*:\s*int\s*\{([^}]*)\}", text):
        members = {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}
        count = re.search(rf"constexpr\s+int\s+k{name}s\s*=\s*(\d+)\s*;", text)
        enums[name] = (members, int(count.group(1)) if count else None)
    return enums


def _cpp_name(prefix: str, python_name: str) -> str:
    return "k" + prefix + "".join(part.capitalize() for part in python_name.split("_"))


def test_every_kind_is_accounted_for():
    assert _declared_kinds() == set(MIRRORED_IN_CPP) | PYTHON_ONLY, \
        "a new Kind enum must be listed here: mirrored in csrc/ (with its prefix) or Python-only"


@pytest.mark.parametrize("kind", sorted(MIRRORED_IN_CPP, key=lambda k: k.__name__), ids=lambda k: k.__name__)
def test_cpp_enum_equals_the_python_declaration(kind):
    enums = _cpp_enums()
    assert kind.__name__ in enums, f"csrc/ has no enum {kind.__name__} mirroring {kind.__module__}.{kind.__name__}"
    members, count = enums[kind.__name__]
    expected = {_cpp_name(MIRRORED_IN_CPP[kind], k.name): k.value for k in kind}
    assert members == expected
    assert count == len(kind), f"constexpr int k{kind.__name__}s must be {len(kind)}"


def test_no_cpp_enum_without_a_python_declaration():
    declared = {k.__name__ for k in MIRRORED_IN_CPP}
    python_only = {k.__name__ for k in PYTHON_ONLY}
    for name in _cpp_enums():
        assert name in declared, f"csrc/ enum {name} has no Kind declaration in fastalign/ops (or is Python-only)"
        assert name not in python_only


def test_triton_kernels_type_no_code_table():
    # The kernels compare against constexpr copies of the enums; a hand-typed {"k3": 2} table could drift.
    for path in (ROOT / "triton_kernels").glob("*.py"):
        assert not re.search(r"=\s*\{\s*\"\w+\"\s*:\s*\d", path.read_text()), path.name


# ----------------------------------------------------------------------------------- bogus codes
def _backends(op: str) -> list[str]:
    status = dispatch.backends()
    return [b for b in dispatch.implementations(op) if status[b].available and b in ("torch", "cpu", "triton")]


def _kl_args():
    logp = -torch.rand(2, 5)
    return (logp, logp + 0.1), {}


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bogus_kind_name_raises_on_every_backend(backend):
    if backend not in _backends("kl_penalty"):
        pytest.skip(f"{backend} is not available here")
    logp = -torch.rand(2, 5)
    impl = dispatch.implementations("kl_penalty")[backend]
    with pytest.raises(ValueError, match="kind must be one of k1, k2, k3, abs, got 'k9'"):
        impl(logp, logp + 0.1, kind="k9")
    pc = -torch.rand(3)
    impl = dispatch.implementations("dpo_loss")[backend]
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, hinge, ipo, robust, got 'bogus'"):
        impl(pc, pc - 1, pc, pc - 1, beta=0.1, loss_type="bogus", label_smoothing=0.0)
    impl = dispatch.implementations("policy_loss")[backend]
    ones = torch.ones(2, 5)
    with pytest.raises(ValueError, match="kind must be one of k1, k2, k3, abs, got 'k0'"):
        impl(logp, logp, torch.ones(2), ones, logp, torch.ones(2), beta=0.1, kl_kind="k0", clip_low=0.2,
             clip_high=0.2, need_adv_grad=False)
    if backend in dispatch.implementations("group_advantages"):
        with pytest.raises(ValueError, match="scale must be one of group, batch, none"):
            dispatch.implementations("group_advantages")[backend](torch.rand(4), 2, scale="rank", eps=1e-4)


def test_public_ops_name_the_bad_kind():
    logp = -torch.rand(2, 5)
    with pytest.raises(ValueError, match="kind must be one of 'k1', 'k2', 'k3', 'abs', got 'k4'"):
        ops.kl_penalty(logp, logp, kind="k4")
    with pytest.raises(ValueError, match="loss_type must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', .*got 'ppo'"):
        ops.policy_loss(logp, logp, torch.ones(2), torch.ones(2, 5), loss_type="ppo")
    with pytest.raises(ValueError, match="loss_type must be one of grpo, bnpo, dr_grpo, dapo, .*got 'x'"):
        ops.policy.spec.row_scale(torch.ones(2), "x")


@pytest.mark.skipif("cpu" not in _backends("kl_penalty"), reason="fastalign._C is not built")
def test_native_kernels_reject_an_unknown_code():
    # Below the Python launchers: the compiled ops themselves refuse a code they do not know.
    logp = -torch.rand(8)
    with pytest.raises(RuntimeError, match=r"kl kind must be a code in \[0, 4\), got 4"):
        torch.ops.fastalign.kl_fwd(logp, logp, 4)
    with pytest.raises(RuntimeError, match=r"kl kind must be a code in \[0, 4\), got -1"):
        torch.ops.fastalign.kl_bwd(logp, logp, logp, -1)
    with pytest.raises(RuntimeError, match=r"dpo loss_type must be a code in \[0, 4\), got 7"):
        torch.ops.fastalign.dpo_fwd(logp, logp, logp, logp, 0.1, 7, 0.0)
    with pytest.raises(RuntimeError, match=r"scale must be a code in \[0, 3\), got 3"):
        torch.ops.fastalign.group_advantages(logp, 2, 3, 1e-4)
    lp = logp.view(2, 4)
    with pytest.raises(RuntimeError, match=r"kl_kind must be a code in \[0, 4\), got 9"):
        torch.ops.fastalign.policy_tokens(lp, lp, torch.ones(2), torch.ones(2, 4), lp, torch.ones(2), 0.1, 9, 0.2,
                                          0.2, False, None, None, 0, 0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match=r"must be a code in \[0, 3\), got 5"):
        torch.ops.fastalign.policy_tokens(lp, lp, torch.ones(2), torch.ones(2, 4), lp, torch.ones(2), 0.1, 2, 0.2,
                                          0.2, False, None, None, 5, 0, 0.0, 0.0, False)


@pytest.mark.skipif("triton" not in _backends("kl_penalty"), reason="triton is not available here")
def test_triton_launchers_never_launch_an_unknown_code():
    from fastalign.triton_kernels import rl_losses

    logp = -torch.rand(8)
    for bad in (4, -1, "k5"):
        with pytest.raises(ValueError, match="must be one of k1, k2, k3, abs"):
            rl_losses.kl_penalty_forward(logp, logp, bad)
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, hinge, ipo, robust"):
        rl_losses.dpo_forward(logp, logp, logp, logp, beta=0.1, loss_type=9, label_smoothing=0.0)
