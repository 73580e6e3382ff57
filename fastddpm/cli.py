"""The `fastddpm` command: `info`, `demo`, and the subcommands other modules register.

Exit codes: 0 on success, 2 on bad usage or bad input (one line on stderr, no traceback; ``--debug`` or
FASTDDPM_DEBUG=1 adds the traceback, for bug reports), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from ._errors import is_out_of_memory, one_line


class UsageError(ValueError):
    """Bad usage or bad input: reported in one line with exit code 2."""


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed < 2**63:
        raise UsageError(f"{flag}: expected an integer in [0, 2**63), got {seed}")


def check_paths_given(args, *flags: str) -> None:
    """An empty string for a path flag (an unset shell variable: ``--npz "$FILE"``) is a usage error naming
    the flag; read for truth it would silently fall back to the default."""
    for flag in flags:
        if getattr(args, flag.lstrip("-").replace("-", "_")) == "":
            raise UsageError(f"{flag}: expected a path, got ''")


def check_threads(threads: int, flag: str = "--threads") -> None:
    """0 (torch's default) up to 4 threads per core: torch starts every thread it is told to, and tens of
    thousands exhaust the process's memory map before any work starts."""
    most = 4 * (os.cpu_count() or 1)
    if not 0 <= threads <= most:
        raise UsageError(f"{flag}: expected 0 (torch's default) or a number of threads up to {most} (4 per core "
                         f"of this machine's {os.cpu_count()}), got {threads}")


def parse_device(name: str, flag: str = "--device"):
    """``name`` as a torch.device this library runs on: cpu, or cuda[:N] where that GPU is visible."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:  # "Invalid device string: 'cuda:x'"
        raise UsageError(f"{flag}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag}: expected cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag}: {name} requested but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag}: {name} requested but {torch.cuda.device_count()} GPU(s) are visible")
    return dev


# Optional packages a command may import, and the pip command that installs each.
_PIP = {
    "safetensors": "pip install safetensors",
    "sklearn": "pip install scikit-learn",
    "matplotlib": "pip install matplotlib",
    "diffusers": "pip install diffusers",
    "triton": "pip install triton",
    "torchvision": "pip install torchvision",
    "PIL": "pip install pillow",
    "tqdm": "pip install tqdm",
    "numpy": "pip install numpy",
    "denoising_diffusion_pytorch": "pip install denoising-diffusion-pytorch",
    "pytest": "pip install pytest",
    "pytest_benchmark": "pip install pytest-benchmark",
}


def require(module: str, what: str) -> None:
    """Fail before any long work when an optional package ``module`` is missing (``what`` needs it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{what} needs the package {module!r}, which is not installed: "
                         f"{_PIP.get(module, 'pip install ' + module)}")


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
    if not ts:
        raise UsageError(f"--timesteps: expected at least one timestep, got {args.timesteps!r}")
    if not all(0 <= t < 1000 for t in ts):  # the demo's schedule is DDPM's 1000 steps
        raise UsageError(f"--timesteps: expected timesteps in [0, 1000), got {args.timesteps!r}")
    if not 8 <= args.image_size <= 1024:  # the strip of 8 images 1024 pixels high is 64 MiB of floats
        raise UsageError(f"--image-size: expected 8 to 1024, got {args.image_size}")
    from .ops import check_backend

    try:
        check_backend(args.backend, "--backend")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_seed(args.seed)
    from PIL import Image

    from ._io import IMAGE_FORMATS, check_output_file
    from .demo import strip_size

    w, h = strip_size(len(ts), args.image_size)
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if limit is not None and w * h > limit:  # Image.open refuses such a file as a decompression bomb
        raise UsageError(f"--timesteps: a strip of {len(ts)} images of {args.image_size} pixels would be {w} x {h} "
                         f"pixels, more than PIL opens ({limit:,}); give fewer timesteps or a smaller --image-size")
    check_output_file(args.out, "--out", tuple(IMAGE_FORMATS))
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


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type) are one line and exit status
    2, like every other mistake on the command line; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    from . import __version__

    parser = _Parser(prog="fastddpm", description="DDPM training and sampling on fused kernels.")
    parser.add_argument("--version", action="version", version=f"fastddpm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also FASTDDPM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error (also FASTDDPM_DEBUG=1)")
        p.set_defaults(_run=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .ops import _library

    if _library.REQUIRED_ERROR:  # FASTDDPM_REQUIRE_EXTENSION=1 and the C++ kernels did not load
        print(_library.REQUIRED_ERROR, file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("FASTDDPM_DEBUG", "") not in ("", "0")

    def fail(exc: BaseException, text: str | None = None) -> int:
        if debug:
            traceback.print_exc()
        print(f"fastddpm {args.command}: error: {text or one_line(exc)}", file=sys.stderr)
        return 2

    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        return fail(exc)
    except ModuleNotFoundError as exc:
        # An optional dependency that a code path imports late (the early checks name most of them).
        top = (exc.name or "").split(".")[0]
        if top not in _PIP:
            raise
        return fail(exc, f"needs the package {top!r}, which is not installed: {_PIP[top]}")
    except (ValueError, TypeError, OSError) as exc:
        # Bad input found deeper down (the library's errors name the argument), or a file that cannot be
        # read or written.
        return fail(exc)
    except (MemoryError, RuntimeError) as exc:
        from .ops._dispatch import BackendNotSupported

        if isinstance(exc, BackendNotSupported):
            # a backend that was asked for (--backend, or FASTDDPM_BACKEND in place of auto) cannot run here
            asked = ("--backend" if getattr(args, "backend", "auto") != "auto"
                     else "FASTDDPM_BACKEND" if os.environ.get("FASTDDPM_BACKEND") else "backend")
            return fail(exc, f"{asked}: {one_line(exc)}")
        # An allocation the machine cannot make (CPU: "can't allocate memory", CUDA: torch.OutOfMemoryError),
        # e.g. from --image-size or --batch-size far too large: one line, not a traceback.
        if not is_out_of_memory(exc):
            raise
        sizes = {"train": "--batch-size or --image-size", "sample": "--batch-size (or --n, --scale)",
                 "eval": "--batch-size or --n"}.get(args.command, "the sizes that set it")
        return fail(exc, f"not enough memory: {one_line(exc)}; lower {sizes}")
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
