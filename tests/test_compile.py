"""torch.compile through ops.logprobs_from_logits on the native cpu backend: forward and backward.

The native op is a torch custom op with fake (meta) implementations, so AOTAutograd and Inductor
trace it into the graph instead of running it at trace time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_rel, logprobs64, logprobs_grad64

from fastalign import ops
from fastalign.ops import dispatch

pytestmark = [
    pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="fastalign._C is not built"),
    # Dynamo explains every graph break in the validation code with a UserWarning.
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

VOCAB, TEMPERATURE = 37, 0.9


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with ops.backend("cpu"):
        yield
    torch._dynamo.reset()


def _objective(logits, labels, weights, inplace_backward=False):
    logp, entropy = ops.logprobs_from_logits(logits, labels, temperature=TEMPERATURE, return_entropy=True,
                                             inplace_backward=inplace_backward)
    return (logp * weights).sum() + 0.5 * entropy.sum(), logp, entropy


def _inputs(shape=(3, 5)):
    logits = torch.randn(*shape, VOCAB)
    labels = torch.randint(0, VOCAB, shape)
    labels[0, 0] = -100
    return logits, labels, torch.randn(shape)


def _check(compiled, logits, labels, weights, inplace_backward=False):
    leaf = logits.clone().requires_grad_()
    # Scaling first makes the op's input a graph intermediate, as the logits of a model are.
    loss, logp, entropy = compiled(leaf * 2.0, labels, weights, inplace_backward)
    loss.backward()
    scaled = 2.0 * logits.double()
    exp_logp, exp_ent = logprobs64(scaled, labels, TEMPERATURE)
    assert_rel(logp, exp_logp, TOL[torch.float32], "logp")
    assert_rel(entropy, exp_ent, TOL[torch.float32], "entropy")
    dz = logprobs_grad64(scaled, labels, weights, torch.full(labels.shape, 0.5), TEMPERATURE)
    assert_rel(leaf.grad, 2.0 * dz, TOL[torch.float32], "d logits")


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_aot_eager_forward_and_backward(inplace_backward):
    compiled = torch.compile(_objective, backend="aot_eager")
    for _ in range(2):  # the second call reuses the compiled graphs
        _check(compiled, *_inputs(), inplace_backward=inplace_backward)


def test_the_custom_op_is_traced_into_the_graph():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_objective, backend=recording_backend)
    _check(compiled, *_inputs((4, 2)))
    targets = [str(node.target) for gm in graphs for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"]
    assert any("fastalign.logprobs_fwd" in t for t in targets), targets


def test_inductor_forward_and_backward():
    compiled = torch.compile(_objective, backend="inductor")
    _check(compiled, *_inputs((2, 3)))
