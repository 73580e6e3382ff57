"""`fastddpm bench`: the benchmark suite from the command line (also `python -m benchmarks.run`)."""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import UsageError, check_threads, command

DEFAULT_CSV_DIR = os.path.join("benchmarks", "results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_const", dest="suite", const="full",
                      help="the long suite: every per-op shape, CIFAR-10 end to end, 1000-step sampling (hours "
                           "on a 2-core CPU)")
    size.add_argument("--smoke", action="store_const", dest="suite", const="smoke",
                      help="the quick suite at its smallest setting (tiny shapes and network, two rounds): "
                           "proves that everything runs, measures nothing worth quoting")
    p.set_defaults(suite="quick")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only the cases whose name contains NAME (case-insensitive; repeat for more; see --list)")
    p.add_argument("--list", action="store_true", help="list the cases of the suite and exit")
    p.add_argument("--csv", nargs="?", const=DEFAULT_CSV_DIR, default=None, metavar="DIR",
                   help=f"append the rows (with machine, versions, date) to DIR/bench_timings.csv and "
                        f"DIR/bench_counts.csv (default DIR: {DEFAULT_CSV_DIR})")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the report to FILE (markdown)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch.set_num_threads(N) (default 0: torch's choice)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")


def execute(args: argparse.Namespace, log=None) -> tuple[list[dict], dict, str]:
    """Run the suite the arguments ask for; print and write what they ask for. Returns (rows, header, text)."""
    import torch

    from . import suite as S
    from .timing import append_csv, check_appendable, stamp

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    only = [s.strip() for s in args.only]
    if "" in only:  # an empty NAME is contained in every case name: it would run the whole suite
        raise UsageError("--only: expected part of a case name, got an empty string (see --list)")
    check_threads(args.threads)
    all_cases = S.cases(args.suite, compile=not args.no_compile)
    chosen = S.select(all_cases, only)
    if only and not chosen:
        raise UsageError(f"--only: no case of the {args.suite} suite matches "
                         f"{' or '.join(repr(s) for s in only)} (see --list)")
    if args.list:
        print("\n".join(c.name for c in chosen))
        return [], {}, ""
    from .._io import check_output_dir, check_output_file

    try:  # before the suite runs (minutes, hours with --full), not after
        if args.csv is not None:
            check_output_dir(args.csv, "--csv")
            for name in ("bench_timings.csv", "bench_counts.csv"):
                check_appendable(os.path.join(args.csv, name), "--csv")
        if args.markdown is not None:
            check_output_file(args.markdown, "--markdown", (".md", ".markdown", ".txt"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"fastddpm bench: {args.suite} suite, {len(chosen)} cases")
    rows, header = S.run(args.suite, only=only or None, compile=not args.no_compile, log=log)
    text = S.render(rows, header)
    print(text, flush=True)
    if args.markdown is not None:
        from .._io import atomic_path

        with atomic_path(args.markdown) as tmp, open(tmp, "w") as f:
            f.write(text + "\n")
        log(f"wrote {args.markdown}")
    if args.csv is not None:
        s = stamp()
        timings = [{**r, **s} for r in rows if r["kind"] != "counts"]
        counts = [{**r, **s} for r in rows if r["kind"] == "counts"]
        for name, rs in (("bench_timings.csv", timings), ("bench_counts.csv", counts)):
            if rs:
                path = os.path.join(args.csv, name)
                append_csv(path, rs)
                log(f"appended {len(rs)} rows to {path}")
    return rows, header, text


@command("bench", "benchmark suite: fastddpm against torch, torch.compile, diffusers, denoising-diffusion-pytorch",
         add_arguments)
def _bench(args: argparse.Namespace) -> int:
    from . import ReferenceRunError

    try:
        execute(args)
    except ReferenceRunError as exc:
        raise UsageError(str(exc)) from exc
    return 0
