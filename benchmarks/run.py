"""The benchmark suite from a checkout: `python -m benchmarks.run [options]`.

The same suite and options as `fastddpm bench` (its core lives in the package, fastddpm/bench/, so that
the command works from an installed fastddpm), plus what only makes sense in the repository:

    --plot      draw benchmarks/results/bench_*.png from the CSVs after the run
    --readme    put the report into README.md between the `fastddpm-bench` markers

`bash scripts/run.sh bench` runs the quick suite with --csv --plot --readme: the one command that
regenerates the README's Performance table and plots.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:
    from fastddpm.bench.cli import add_arguments, execute
    from fastddpm.cli import UsageError
except RuntimeError as _exc:  # FASTDDPM_CPU_VARIANT naming a build this CPU cannot run (raised at import)
    if type(_exc).__name__ != "CpuVariantError":
        raise
    print(f"python -m benchmarks.run: error: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None

BEGIN, END = "<!-- fastddpm-bench:begin -->", "<!-- fastddpm-bench:end -->"


def replace_between_markers(text: str, body: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with what lies between the markers replaced by ``body`` (ValueError if they are missing)."""
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"README.md: the markers {begin} ... {end} are missing")
    return text[: i + len(begin)] + "\n" + body.strip() + "\n" + text[j:]


def update_readme(path: str, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace what lies between the markers of the file at ``path``, atomically (ValueError if missing)."""
    from fastddpm._io import atomic_path

    with open(path) as f:
        new = replace_between_markers(f.read(), body, begin, end)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--plot", action="store_true", help="draw benchmarks/results/bench_*.png after the run")
    ap.add_argument("--readme", action="store_true", help="put the report into README.md between the markers")
    args = ap.parse_args(argv)
    if (args.plot or args.readme) and args.list:
        ap.error("--list: not with --plot or --readme")
    if args.readme and (args.suite != "quick" or args.only):  # the README's prose reads the quick suite's rows
        ap.error("--readme: only with the whole quick suite (not with --smoke, --full or --only)")
    if args.plot and args.csv is None:
        ap.error("--plot: draws from the CSVs, so it needs --csv")
    readme = os.path.join(ROOT, "README.md")
    if args.readme:
        with open(readme) as f:
            if BEGIN not in f.read():
                ap.error(f"--readme: {readme} has no {BEGIN} marker")
    from fastddpm._errors import one_line
    from fastddpm.bench import ReferenceRunError

    try:
        rows, header, text = execute(args)
    except (UsageError, ReferenceRunError, ValueError, OSError) as exc:
        # as `fastddpm bench` reports them: a usage mistake, a reference run that cannot be made
        # (FASTDDPM_BACKEND=torch), a bad setting found deeper down (FASTDDPM_BACKEND=junk), an unwritable file
        print(f"python -m benchmarks.run: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.list:
        return 0
    if args.plot:
        from fastddpm.bench.plot import plot

        for p in plot(os.path.join(args.csv, "bench_timings.csv"), os.path.join(args.csv, "bench_counts.csv"),
                      args.csv, run=header.get("date")):
            print(f"wrote {p}", file=sys.stderr)
    if args.readme:
        update_readme(readme, text)
        print(f"updated {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
