"""FusedLinearDPOLoss(head_metrics=True): TRL's logits/* and mean_token_accuracy from the loss's own logits.

Checked against full logits on both of the pair loop's paths: pairs whose logits are kept (one GEMM) and
pairs too long for the memory budget (token-chunked, where the metrics cost one more no-grad GEMM).
"""

from __future__ import annotations

import pytest
import torch

from fastalign.losses import FusedLinearDPOLoss


@pytest.mark.parametrize("mem_budget", [None, 1024], ids=["kept-logits", "token-chunked"])  # 1 KiB < one pair
def test_head_metrics_equal_full_logits(mem_budget):
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 3, 9, 16, 40
    hidden, weight = torch.randn(2 * b, t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    hidden[0, 4] = weight[labels[0, 4]] * 50  # one chosen token that is surely its row's argmax
    loss_fn = FusedLinearDPOLoss(beta=0.1, head_metrics=True, mem_budget=mem_budget)
    loss, metrics = loss_fn(hidden, weight, labels, ref_hidden=hidden + 0.1)
    _, plain = FusedLinearDPOLoss(beta=0.1, mem_budget=mem_budget)(hidden, weight, labels, ref_hidden=hidden + 0.1)

    logits = hidden @ weight.t()
    valid = labels != -100
    top1 = (logits.argmax(-1) == labels) & valid
    want = {"logits/chosen": logits[:b].mean(-1)[valid[:b]].mean(),
            "logits/rejected": logits[b:].mean(-1)[valid[b:]].mean(),
            "mean_token_accuracy": top1[:b].sum() / valid[:b].sum()}
    for name, value in want.items():
        assert torch.allclose(metrics[name].float(), value.float(), atol=1e-5), (name, metrics[name], value)
    assert float(want["mean_token_accuracy"]) > 0  # the planted token counts
    assert set(metrics) - set(plain) == set(want)  # without head_metrics the loss does not report them
    assert all(torch.equal(metrics[k], plain[k]) for k in plain)
