"""Peak memory of one fused D²O step (K samples + 1 negative) against one fused DPO pair, CPU.

    python bench/d2o_memory.py d2o --k 8     # one process per measurement
    python bench/d2o_memory.py dpo

Shapes of the issue's target: T = 512, H = 1024, V = 32000, fp32, reference from hidden states,
one prompt. Prints JSON: the peak RSS growth over forward + backward (inputs already allocated),
and the inputs' own size. The K samples go through the chunk loop like a pair does, so the
growth should stay near DPO's; the hidden states themselves are K+1 rows instead of 2.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastalign.bench.common import PeakMemory
from fastalign.losses import FusedLinearD2OLoss, FusedLinearDPOLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loss", choices=["d2o", "dpo"])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--t", type=int, default=512)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32000)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = args.k + 1 if args.loss == "d2o" else 2
    hidden = (torch.randn(rows, args.t, args.h) * 0.5).requires_grad_()
    ref_hidden = hidden.detach() + 0.01 * torch.randn_like(hidden)
    weight = (torch.randn(args.v, args.h) / args.h ** 0.5).requires_grad_()
    labels = torch.randint(0, args.v, (rows, args.t))
    labels[:, : args.t // 8] = -100  # a prompt
    loss_fn = FusedLinearD2OLoss(num_samples=args.k) if args.loss == "d2o" else FusedLinearDPOLoss()
    with PeakMemory("cpu") as mem:
        loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        loss.backward()
    inputs_mb = sum(t.numel() * 4 for t in (hidden, ref_hidden, weight)) / 2**20
    print(json.dumps({"loss": args.loss, "k": args.k if args.loss == "d2o" else None, "rows": rows, "t": args.t,
                      "h": args.h, "v": args.v, "peak_growth_mib": round(mem.peak_mb, 1),
                      "inputs_mib": round(inputs_mb, 1), "threads": torch.get_num_threads(),
                      "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
