"""The ``fastalign`` command."""

from __future__ import annotations

import argparse
import sys


def _cmd_ops(args: argparse.Namespace) -> int:
    from fastalign.ops import dispatch

    status = dispatch.backends()
    names = list(dispatch.BACKENDS)
    rows = [[op] + [("yes" if b in dispatch.implementations(op) and status[b].available
                     else ("-" if b not in dispatch.implementations(op) else "unavailable"))
                    for b in names] for op in dispatch.registered_ops()]
    width = max(len(r[0]) for r in rows)
    print(f"{'op':<{width}}  " + "  ".join(f"{b:<11}" for b in names))
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{c:<11}" for c in r[1:]))
    print("\nbackends on this machine:")
    for b in names:
        s = status[b]
        print(f"  {b:<7} {'available  ' if s.available else 'unavailable'}  {s.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastalign import __version__

    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    p = sub.add_parser("ops", help="table of ops x backends available on this machine")
    p.set_defaults(func=_cmd_ops)
    _add_flow_commands(sub)
    _add_bench_command(sub)
    return parser


def _bench_suites() -> list[str]:
    import pkgutil

    import fastalign.bench

    return sorted(m.name for m in pkgutil.iter_modules(fastalign.bench.__path__) if m.name != "common")


def _cmd_bench(args: argparse.Namespace) -> int:
    """``fastalign bench <suite> [args]`` -> ``fastalign.bench.<suite>.main(args)``."""
    import importlib

    suites = _bench_suites()
    if args.suite not in suites:
        print(f"fastalign bench: error: suite must be one of {', '.join(suites)}, got {args.suite!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fastalign.bench.{args.suite}")
    if not callable(getattr(module, "main", None)):
        print(f"fastalign bench: error: fastalign.bench.{args.suite} has no main(argv)", file=sys.stderr)
        return 2
    return module.main([*args.suite_args, *args.overrides]) or 0


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="speed and peak memory vs naive PyTorch and peers: fastalign bench <suite> "
                                     "[--quick] (e.g. logprobs, losses)")
    p.add_argument("suite", help="benchmark suite: a module of fastalign.bench (logprobs, losses, ...)")
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="arguments of the suite (see its --help)")
    p.set_defaults(func=_cmd_bench, takes_overrides=True)


FLOW_HELP = {"sft": "supervised fine-tuning", "reward": "reward model (Bradley-Terry)",
             "dpo": "DPO (sigmoid | hinge | ipo | robust)", "simpo": "SimPO (reference-free)",
             "d2o": "D²O: human negatives only, K reference samples as the positive (objective: d2o | ga)",
             "kto": "KTO: unpaired desirable/undesirable completions",
             "orpo": "ORPO (odds ratio + NLL, reference-free)",
             "cpo": "CPO (contrastive + NLL, reference-free)",
             "ppo": "PPO, classic RLHF (policy, reference, reward and value models)",
             "grpo": "GRPO (G samples per prompt, group-relative advantages, verifier/model/function rewards)",
             "icl": "in-context alignment: --mode instruct | forgetting | steer | picle | reflect | all"}


def _flow_config_classes() -> dict:
    """Each flow's config class (its fields are the flow's knobs)."""
    from fastalign.engine import config as cfgmod

    return {"sft": cfgmod.SFTConfig, "reward": cfgmod.RewardConfig, "dpo": cfgmod.DPOConfig,
            "simpo": cfgmod.SimPOConfig, "ppo": cfgmod.PPOConfig, "grpo": cfgmod.GRPOConfig,
            "icl": cfgmod.ICLConfig, "d2o": cfgmod.D2OConfig, "kto": cfgmod.KTOConfig, "orpo": cfgmod.ORPOConfig,
            "cpo": cfgmod.CPOConfig}


def _cmd_flow(args: argparse.Namespace) -> int:
    import importlib

    from fastalign.engine import config as cfgmod
    from fastalign.engine.trainer import TrainingDiverged

    try:
        cfg = cfgmod.load_config(_flow_config_classes()[args.command], args.config, args.overrides)
        importlib.import_module(f"fastalign.flows.{args.command}").run(cfg)
    except (ValueError, TypeError, OSError, ImportError, TrainingDiverged) as e:
        print(f"fastalign {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from fastalign.pipeline import run_pipeline

    if args.overrides:
        print(f"fastalign pipeline: error: unknown arguments {args.overrides}", file=sys.stderr)
        return 2
    try:
        run_pipeline(name=args.name, output_dir=args.output_dir, quick=args.quick, seed=args.seed,
                     threads=args.threads, config=args.config)
    except (ValueError, TypeError, OSError) as e:
        print(f"fastalign pipeline: error: {e}", file=sys.stderr)
        return 1
    return 0


def _add_flow_commands(sub) -> None:
    """``sft|reward|dpo|simpo --config cfg.yaml [--key value ...]`` and ``pipeline``."""
    from fastalign.engine.config import describe

    classes = _flow_config_classes()
    for flow, text in FLOW_HELP.items():
        p = sub.add_parser(flow, help=f"{text}: --config cfg.yaml, then --key value overrides",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="config keys (in the YAML file or as --key value overrides):\n"
                                  + describe(classes[flow]))
        p.add_argument("--config", default=None, help="YAML file of config keys (see configs/)")
        p.set_defaults(func=_cmd_flow, takes_overrides=True)
    p = sub.add_parser("pipeline", help="every flow on the tiny default model + results table and report.md")
    p.add_argument("--name", default="pipeline", help="run folder name under --output_dir")
    p.add_argument("--output_dir", default="runs")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--config", default=None, help="YAML of per-stage overrides: {sft: {max_steps: 300}, ...}")
    p.set_defaults(func=_cmd_pipeline, takes_overrides=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
