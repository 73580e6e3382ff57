"""The `fastddpm` command: `info`, `demo`, and the subcommands other modules register.

Exit codes: 0 on success, 2 on bad usage or bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


class UsageError(Exception):
    """Bad usage or bad input: reported in one line with exit code 2."""


# name -> (help, add_arguments(parser), run(args) -> int)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: decorate its run(args) function."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help, add_arguments, fn)
        return fn

    return deco


def _info_args(p: argparse.ArgumentParser) -> None:
    pass


@command("info", "versions, devices and which backends run here", _info_args)
def _info(args: argparse.Namespace) -> int:
    from .info import report

    print(report())
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_forward.png", help="PNG to write (default: demo_forward.png)")
    p.add_argument("--image-size", type=int, default=32, help="side of each image (default: 32)")
    p.add_argument("--timesteps", default="0,50,100,200,300,500,700,999",
                   help="comma-separated t of the strip (default: 0,50,100,200,300,500,700,999)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")


@command("demo", "forward diffusion demo: a PNG strip of x_t for several t", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from .demo import forward_strip

    try:
        ts = [int(s) for s in args.timesteps.split(",") if s.strip()]
    except ValueError as exc:
        raise UsageError(f"--timesteps: expected comma-separated integers, got {args.timesteps!r}") from exc
    if args.image_size < 8:
        raise UsageError(f"--image-size: expected at least 8, got {args.image_size}")
    path = forward_strip(args.out, ts, image_size=args.image_size, seed=args.seed, backend=args.backend)
    print(f"wrote {path}")
    return 0


def _load_plugins() -> None:
    # Subcommands defined in other modules register themselves on import.
    import importlib

    for mod in ("fastddpm.train.cli", "fastddpm.sampling_cli", "fastddpm.eval.cli", "fastddpm.bench.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name is None or not mod.startswith(exc.name):
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastddpm", description="DDPM training and sampling on fused kernels.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"fastddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Bad input found deeper down (the library's errors name the argument).
        print(f"fastddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
