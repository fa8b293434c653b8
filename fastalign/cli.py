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
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_FlowParser)
    p = sub.add_parser("ops", help="table of ops x backends available on this machine")
    p.set_defaults(func=_cmd_ops)
    _add_flow_commands(sub)
    _add_bench_command(sub)
    _add_plan_command(sub)
    _add_experiment_command(sub)
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


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from fastalign.engine.plan import plan_command

    try:
        plan = plan_command(args.flow, args.config, args.overrides, world_size=args.world_size,
                            gpu_gib=args.gpu_gib)
    except (ValueError, TypeError, OSError) as e:
        print(f"fastalign plan: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(plan.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=2, default=str)
    return 0


def _add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU of each role of a flow (weights, gradients, optimizer, "
                                    "activations, logits, KV cache): plan --flow grpo [--config cfg.yaml] "
                                    "[--key value ...] [--world_size N]")
    p.add_argument("--flow", required=True, help="the flow to plan (sft, dpo, grpo, ppo, ...)")
    p.add_argument("--config", default=None, help="the flow's YAML config file (see configs/)")
    p.add_argument("--world_size", type=_positive_int, default=1, help="processes (GPUs); FSDP2 shards over them")
    p.add_argument("--gpu_gib", type=_positive_float, default=0.0,
                   help="memory of one GPU in GiB (e.g. 80): sizes a colocated vLLM engine and says whether it fits")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    p.set_defaults(func=_cmd_plan, takes_overrides=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _cmd_experiment(args: argparse.Namespace) -> int:
    from fastalign.experiments.driver import run_experiment

    try:
        run_experiment(args.name, quick=args.quick, seeds=args.seeds, threads=args.threads, jobs=args.jobs,
                       output_dir=args.output_dir, overwrite=args.overwrite, report_only=args.report_only)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"fastalign experiment: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _add_experiment_command(sub) -> None:
    from fastalign.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="a lecture claim measured over seeds: report.md, results.json, plots",
                       epilog="experiments:\n" + "\n".join(f"  {e.name:<16} {e.help}" for e in EXPERIMENTS.values()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(EXPERIMENTS), metavar="name", help="one of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="a few steps per run (smoke test)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per seed (default 1; 0 = torch's default, and the seeds run one at a time)")
    p.add_argument("--jobs", type=int, default=0,
                   help="seeds run at once, each in its own process (0 = every seed, up to twice cores / threads: "
                        "3 seeds on 2 cores share them; 1 when --threads is 0)")
    p.add_argument("--output_dir", default="runs/experiments", help="the experiment writes <output_dir>/<name>/")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: report.md and plots from the seeds in an existing results.json (a stopped run)")
    p.set_defaults(func=_cmd_experiment)


class _FlowParser(argparse.ArgumentParser):
    """A flow's parser: the epilog listing its config keys is built when its help is printed, so parsing a command
    imports no flow module but the one it runs."""

    def __init__(self, *args, flow=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flow = flow

    def format_help(self):
        if self.flow is not None and self.epilog is None:
            from fastalign.engine.config import describe

            self.epilog = ("config keys (in the YAML file or as --key value overrides):\n"
                           + describe(self.flow.config_class()))
        return super().format_help()


def _cmd_flow(args: argparse.Namespace) -> int:
    from fastalign.engine import config as cfgmod
    from fastalign.engine.trainer import TrainingDiverged
    from fastalign.flows import FLOWS

    flow = FLOWS[args.command]
    try:
        cfg = cfgmod.load_config(flow.config_class(), args.config, args.overrides)
        flow.run(cfg)
    except (ValueError, TypeError, OSError, ImportError, TrainingDiverged) as e:
        print(f"fastalign {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def one_line(error: BaseException) -> str:
    """An error message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split())


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from fastalign.pipeline import run_pipeline

    if args.overrides:
        print(f"fastalign pipeline: error: unknown arguments {args.overrides}", file=sys.stderr)
        return 2
    try:
        run_pipeline(name=args.name, output_dir=args.output_dir, quick=args.quick, seed=args.seed, seeds=args.seeds,
                     threads=args.threads, config=args.config, overwrite=args.overwrite, jobs=args.jobs)
    except (ValueError, TypeError, OSError) as e:
        print(f"fastalign pipeline: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def _add_flow_commands(sub) -> None:
    """``<flow> --config cfg.yaml [--key value ...]`` for every registered flow, and ``pipeline``."""
    from fastalign.flows import FLOWS

    for flow in FLOWS.values():
        p = sub.add_parser(flow.name, help=f"{flow.help}: --config cfg.yaml, then --key value overrides",
                           formatter_class=argparse.RawDescriptionHelpFormatter, flow=flow)
        p.add_argument("--config", default=None, help="YAML file of config keys (see configs/)")
        p.set_defaults(func=_cmd_flow, takes_overrides=True)
    p = sub.add_parser("pipeline", help="every flow on the tiny default model + results table and report.md")
    p.add_argument("--name", default="pipeline", help="run folder name under --output_dir")
    p.add_argument("--output_dir", default="runs")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    seeding = p.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=0, help="run the pipeline for this one seed")
    seeding.add_argument("--seeds", type=int, default=None,
                         help="run it for seeds 0..N-1 and report mean ± sd and each seed's value")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--jobs", type=int, default=0,
                   help="with --seeds: seeds run at once, each in its own process (0 = every seed, up to twice cores "
                        "/ threads: 3 seeds with --threads 1 on 2 cores share them; 1 when --threads is 0)")
    p.add_argument("--config", default=None, help="YAML of per-stage overrides: {sft: {max_steps: 300}, ...}")
    p.add_argument("--overwrite", action="store_true", help="replace the stages of an existing pipeline folder")
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
