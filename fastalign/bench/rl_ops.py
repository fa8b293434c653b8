"""The native ``cpu`` backend of the RL and preference ops against naive PyTorch, on CPU.

    python -m fastalign.bench.rl_ops [--quick] [--json out.json]

Per op: forward + backward time of the ``cpu`` backend and of the ``torch`` backend (the
reference, i.e. the plain PyTorch code a trainer would write), from the same run, as
``speedup = torch / cpu``. Plus the issue's target: GAE at B=64, T=1024 against TRL's
per-timestep loop (``for t in reversed(range(T))``, vectorized over the batch), forward only,
at least 50x faster with bit-identical advantages and returns. ``fastalign bench losses`` calls
:func:`run` and includes the rows in its report.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from fastalign.bench.common import time_calls

GAE_TARGET = {"batch": 64, "length": 1024, "min_speedup": 50.0}


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """TRL PPOTrainer's GAE: a Python loop over time, vectorized over the batch."""
    length = rewards.shape[1]
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _gae_target(iters: int) -> dict:
    from fastalign import ops

    b, t = GAE_TARGET["batch"], GAE_TARGET["length"]
    rewards, values, mask = torch.randn(b, t), torch.randn(b, t), torch.ones(b, t)
    gamma, lam = 1.0, 0.95  # TRL PPO defaults

    def native():
        with ops.backend("cpu"):
            return ops.gae(rewards, values, mask, gamma=gamma, lam=lam)

    adv, ret = native()
    want_adv, want_ret = trl_gae(rewards, values, gamma, lam)
    fast = time_calls(native, iters, "cpu")
    loop = time_calls(lambda: trl_gae(rewards, values, gamma, lam), max(1, iters // 4), "cpu")
    speedup = loop["seconds"] / fast["seconds"]
    return {"op": "gae", "case": f"B={b} T={t} forward vs TRL loop", "backend": "cpu", "baseline": "trl_loop",
            "ms": fast["seconds"] * 1e3, "baseline_ms": loop["seconds"] * 1e3, "speedup": speedup,
            "target_speedup": GAE_TARGET["min_speedup"], "met": speedup >= GAE_TARGET["min_speedup"],
            "identical": bool(torch.equal(adv, want_adv) and torch.equal(ret, want_ret)),
            "max_abs_diff": float(torch.maximum((adv - want_adv).abs().max(), (ret - want_ret).abs().max())),
            "threads": fast["threads"]}


def _cases(quick: bool) -> list[tuple[str, str, Callable[[], tuple[list[torch.Tensor], Callable]]]]:
    """(op, shape label, factory) where factory() gives (inputs needing grad, step(*inputs) -> loss)."""
    from fastalign import ops

    b, t = (64, 1024) if quick else (256, 4096)
    pairs = 4096 if quick else 65536
    groups, g = (256, 16) if quick else (4096, 16)

    def tokens(*shifts):
        return [(torch.randn(b, t) * 0.5 + s) for s in shifts]

    def mask():
        return torch.rand(b, t) > 0.2

    def policy():
        logp, old, ref = tokens(-1.0, -1.0, -1.0)
        adv, m = torch.randn(b), mask()
        return [logp], lambda x: ops.policy_loss(x, old, adv, m, ref_logp=ref, beta=0.04, loss_type="grpo")[0]

    def value():
        (v,), old, ret, m = tokens(0.0), torch.randn(b, t), torch.randn(b, t), mask()
        return [v], lambda x: ops.value_loss(x, old, ret, m)[0]

    def kl():
        logp, ref = tokens(-1.0, -1.0)
        return [logp], lambda x: ops.kl_penalty(x, ref, kind="k3").sum()

    def whiten():
        (x,), m = tokens(0.0), mask()
        return [x], lambda y: ops.whiten(y, m).sum()

    def sequence():
        (lp,), m = tokens(-1.0), mask()
        return [lp], lambda y: ops.sequence_logprobs(y, m, average=True).sum()

    def gae():
        r, v = tokens(0.0, 0.0)
        m = mask()

        def step(rr, vv):
            adv, ret = ops.gae(rr, vv, m)
            return adv.sum() + ret.sum()

        return [r, v], step

    def group():
        return [torch.randn(groups * g)], lambda r: ops.group_advantages(r, g).pow(2).sum()

    def rloo():
        return [torch.randn(groups * g)], lambda r: ops.rloo_advantages(r, g).pow(2).sum()

    def dpo():
        xs = [torch.randn(pairs) - 50 for _ in range(4)]
        return xs[:2], lambda c, r: ops.dpo_loss(c, r, xs[2], xs[3])[0].mean()

    def simpo():
        return [torch.randn(pairs) - 1, torch.randn(pairs) - 1], lambda c, r: ops.simpo_loss(c, r)[0].mean()

    def bt():
        return [torch.randn(pairs), torch.randn(pairs)], lambda c, r: ops.bradley_terry_loss(c, r, center_coef=0.01)[0]

    tok, grp, pair = f"B={b} T={t}", f"{groups} groups x {g}", f"{pairs} pairs"
    return [("policy_loss", tok, policy), ("value_loss", tok, value), ("kl_penalty", tok, kl), ("whiten", tok, whiten),
            ("sequence_logprobs", tok, sequence), ("gae", tok, gae), ("group_advantages", grp, group),
            ("rloo_advantages", grp, rloo), ("dpo_loss", pair, dpo), ("simpo_loss", pair, simpo),
            ("bradley_terry_loss", pair, bt)]


def _fwd_bwd(step: Callable, inputs: list[torch.Tensor], backend: str) -> Callable[[], None]:
    from fastalign import ops

    leaves = [x.detach().requires_grad_(True) for x in inputs]

    def call():
        with ops.backend(backend):
            loss = step(*leaves)
        loss.backward()
        for x in leaves:
            x.grad = None

    return call


def run(quick: bool = False) -> list[dict]:
    """Time every op's ``cpu`` backend against the ``torch`` backend; one dict per op, plus the GAE target."""
    from fastalign import ops

    if not ops.backends()["cpu"].available:
        return [{"skipped": ops.backends()["cpu"].reason}]
    iters = 5 if quick else 20
    rows = [_gae_target(iters)]
    for op, shape, factory in _cases(quick):
        inputs, step = factory()
        # The torch GAE backend loops over time in Python: fewer calls keep the suite short.
        times = {name: time_calls(_fwd_bwd(step, inputs, name), iters if name == "cpu" or op != "gae" else 2, "cpu")
                 for name in ("torch", "cpu")}
        rows.append({"op": op, "case": f"{shape} forward+backward", "backend": "cpu", "baseline": "torch",
                     "ms": times["cpu"]["seconds"] * 1e3, "baseline_ms": times["torch"]["seconds"] * 1e3,
                     "speedup": times["torch"]["seconds"] / times["cpu"]["seconds"],
                     "threads": times["cpu"]["threads"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 timed calls")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(f"{'op':<20} {'case':<34} {'cpu ms':>9} {'baseline ms':>12} {'speedup':>8}")
    for r in rows:
        if "op" not in r:
            print(r)
            continue
        extra = f"  target >= {r['target_speedup']:.0f}x met={r['met']} identical={r['identical']}" \
            if "target_speedup" in r else ""
        print(f"{r['op']:<20} {r['case']:<34} {r['ms']:>9.3f} {r['baseline_ms']:>12.3f} {r['speedup']:>7.1f}x{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
