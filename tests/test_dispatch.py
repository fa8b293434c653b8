"""Backend registry and selection: what is available and why, forcing, errors, the default choice."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fastalign import ops
from fastalign.ops import dispatch

NATIVE_BUILT = importlib.util.find_spec("fastalign._C") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_CUDA = not torch.cuda.is_available()
# The ops whose native CPU kernels the foundation ships (issue 2).
NATIVE_CPU_OPS = ("logprobs_from_logits", "group_advantages", "rloo_advantages", "gae")
CPU = torch.device("cpu")


@pytest.fixture
def no_forcing(monkeypatch):
    """No FASTALIGN_BACKEND and no interpreter flag from the calling environment."""
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch._triton_status.cache_clear()
    yield monkeypatch
    dispatch._triton_status.cache_clear()  # recomputed from the restored environment on next use


@pytest.fixture
def torch_only_op():
    """A real op registered on the torch backend only (removed again afterwards)."""
    name = "_test_torch_only_op"
    dispatch.register(name, "torch")(lambda x: x + 1)
    yield name
    dispatch._registry.pop(name, None)


def test_backends_lists_every_backend_with_a_reason(no_forcing):
    status = ops.backends()
    assert list(status) == ["torch", "cpu", "triton", "cuda"]
    for name, s in status.items():
        assert isinstance(s.available, bool) and s.reason, name
    assert status["torch"].available
    assert status["cpu"].available == NATIVE_BUILT, status["cpu"].reason
    if NO_CUDA:
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason
        assert not status["triton"].available
        expected = "TRITON_INTERPRET=1" if HAS_TRITON else "not installed"
        assert expected in status["triton"].reason


@pytest.mark.skipif(not (HAS_TRITON and NO_CUDA), reason="needs triton installed and no CUDA device")
def test_triton_available_in_the_interpreter(no_forcing):
    no_forcing.setenv("TRITON_INTERPRET", "1")
    dispatch._triton_status.cache_clear()
    status = ops.backends()["triton"]
    assert status.available and "interpreter" in status.reason
    # Unlike the cpu preference list, a forced triton backend now accepts CPU tensors.
    with ops.backend("triton"):
        assert dispatch.select("logprobs_from_logits", CPU)[0] == "triton"


def test_default_on_cpu_tensors_is_cpu_where_registered(no_forcing):
    assert set(NATIVE_CPU_OPS) <= set(ops.registered_ops())
    cpu_ok = ops.backends()["cpu"].available
    for op in ops.registered_ops():
        expected = "cpu" if cpu_ok and "cpu" in dispatch.implementations(op) else "torch"
        assert dispatch.select(op, CPU)[0] == expected, op
    if cpu_ok:
        for op in NATIVE_CPU_OPS:
            assert "cpu" in dispatch.implementations(op), op


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastalign._C is not built")
def test_the_selected_backend_is_the_one_that_runs(no_forcing):
    # The native backend's autograd node differs from the reference's graph of torch ops.
    logits = torch.randn(4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (4,))
    native = ops.logprobs_from_logits(logits, labels)
    with ops.backend("torch"):
        reference = ops.logprobs_from_logits(logits, labels)
    assert any("LogprobsFromLogits" in name for name in _graph_nodes(native))
    assert not any("LogprobsFromLogits" in name for name in _graph_nodes(reference))


def _graph_nodes(t: torch.Tensor) -> list[str]:
    """Names of the autograd nodes behind ``t``."""
    names, stack, seen = [], [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def test_backend_context_forces_and_restores(no_forcing):
    default = dispatch.select("gae", CPU)[0]
    with ops.backend("torch"):
        assert dispatch.forced_backend() == "torch"
        assert dispatch.select("gae", CPU)[0] == "torch"
        if NATIVE_BUILT:
            with ops.backend("cpu"):
                assert dispatch.select("gae", CPU)[0] == "cpu"
            assert dispatch.select("gae", CPU)[0] == "torch"
    assert dispatch.forced_backend() is None
    assert dispatch.select("gae", CPU)[0] == default
    with pytest.raises(ZeroDivisionError), ops.backend("torch"):
        _ = 1 / 0
    assert dispatch.forced_backend() is None


def test_env_var_forces_and_the_context_wins(no_forcing):
    no_forcing.setenv("FASTALIGN_BACKEND", "torch")
    assert dispatch.select("group_advantages", CPU)[0] == "torch"
    if NATIVE_BUILT:
        with ops.backend("cpu"):
            assert dispatch.select("group_advantages", CPU)[0] == "cpu"
    no_forcing.setenv("FASTALIGN_BACKEND", " ")
    assert dispatch.forced_backend() is None
    no_forcing.setenv("FASTALIGN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"FASTALIGN_BACKEND must be one of torch, cpu, triton, cuda, got 'fast'"):
        ops.group_advantages(torch.randn(4), 2)


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match=r"backend must be one of torch, cpu, triton, cuda, got 'gpu'"):
        with ops.backend("gpu"):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("some_op", "numpy")


@pytest.mark.skipif(not NO_CUDA, reason="a CUDA device makes cuda and triton available")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_forcing_an_unavailable_backend_is_an_error(no_forcing, name):
    reason = ops.backends()[name].reason
    message = rf"backend '{name}' was forced for logprobs_from_logits but is unavailable"
    with ops.backend(name):
        with pytest.raises(RuntimeError, match=message):
            ops.logprobs_from_logits(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with ops.backend(name), pytest.raises(RuntimeError) as info:
        dispatch.select("gae", CPU)
    assert reason in str(info.value)  # the error says why


def test_forcing_a_backend_without_the_op(no_forcing, torch_only_op):
    assert dispatch.select(torch_only_op, CPU)[0] == "torch"  # the default falls back to the reference
    if NATIVE_BUILT:
        with ops.backend("cpu"), pytest.raises(NotImplementedError, match=rf"{torch_only_op} has no 'cpu' backend"):
            dispatch.select(torch_only_op, CPU)


@pytest.mark.skipif(not NATIVE_BUILT, reason="fastalign._C is not built")
def test_forced_backend_on_the_wrong_device(no_forcing):
    with ops.backend("cpu"), pytest.raises(RuntimeError, match="inputs are on meta"):
        dispatch.select("gae", torch.device("meta"))
    # Not forced: a device with no native backend gets the reference.
    assert dispatch.select("gae", torch.device("meta"))[0] == "torch"


def test_unregistered_op():
    with pytest.raises(KeyError, match="no implementation registered for op 'nope'"):
        dispatch.select("nope", CPU)


def test_fresh_process_without_the_extension_and_with_env_settings():
    """Settings read at startup: FASTALIGN_BACKEND=triton and TRITON_INTERPRET=1 set before import, _C missing."""
    script = r"""
import json, sys
sys.modules["fastalign._C"] = None  # as if the extension were not built
import torch
from fastalign import ops
from fastalign.ops import dispatch

def attempt(fn):
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as exc:
        return type(exc).__name__ + ": " + str(exc)

cpu = torch.device("cpu")
out = {"status": {k: [s.available, s.reason] for k, s in ops.backends().items()},
       "logprobs": attempt(lambda: dispatch.select("logprobs_from_logits", cpu)[0]),
       "gae": attempt(lambda: dispatch.select("gae", cpu)[0])}
with ops.backend("torch"):  # the context wins over the environment
    logp = ops.logprobs_from_logits(torch.randn(3, 5), torch.tensor([0, 4, -100]))
    out["context_finite"] = bool(torch.isfinite(logp).all())
with ops.backend("cpu"):
    out["forced_cpu"] = attempt(lambda: dispatch.select("gae", cpu)[0])
print(json.dumps(out))
"""
    env = dict(os.environ, FASTALIGN_BACKEND="triton", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu_ok, cpu_reason = out["status"]["cpu"]
    assert not cpu_ok and "not built" in cpu_reason and "pip install" in cpu_reason
    assert out["status"]["cuda"][0] is False
    assert out["context_finite"]
    assert out["forced_cpu"].startswith("RuntimeError: backend 'cpu' was forced for gae but is unavailable")
    assert "not built" in out["forced_cpu"]
    if HAS_TRITON:
        assert out["status"]["triton"][0] is True, out["status"]["triton"]
        assert out["logprobs"] == "triton"  # forced by the environment, not the default (torch here)
        assert out["gae"].startswith("NotImplementedError: op gae has no 'triton' backend")
    else:
        assert out["logprobs"].startswith("RuntimeError: backend 'triton' was forced")
