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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
