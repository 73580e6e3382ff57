"""PNG plots from the CSVs that `fastddpm bench --csv` appends to (needs matplotlib).

    python -m fastddpm.bench.plot [--timings CSV] [--counts CSV] [--out DIR] [--run RUN_ID]

One run is plotted (default: the latest in the file, by its run_id):

* ``bench_speedup.png``: each fastddpm provider's speed-up against the best peer of its case, with the
  interquartile range of the per-round ratios (log scale, 1 = as fast as the best peer);
* ``bench_end_to_end.png``: images/s of the sampling cases and it/s of the training cases, every provider;
* ``bench_counts.png``: the GPU cost proxy: aten operators and MB allocated per step, every provider.
"""

from __future__ import annotations

import math
import os

PLOTS = ("bench_speedup.png", "bench_end_to_end.png", "bench_counts.png")
COLORS = {"ours": "#1f77b4", "peer": "#ff7f0e", "other": "#999999", "bound": "#cccccc"}
KEY = "blue: fastddpm, orange: peers, grey: own U-Net"


def read_rows(path: str | None, flag: str = "") -> list[dict]:
    """The rows of the CSV at ``path`` (none where there is no file); a file that is no CSV is a ValueError
    naming it and ``flag``."""
    from .timing import _read_csv

    return _read_csv(path, flag)[1] if path else []


def _f(r: dict, key: str) -> float:
    try:
        return float(r.get(key, "nan") or "nan")
    except ValueError:
        return float("nan")


def latest_run(rows: list[dict]) -> str | None:
    ids = [r.get("run_id", "") for r in rows if r.get("run_id")]
    return max(ids) if ids else None


def _of_run(rows: list[dict], run: str | None) -> list[dict]:
    run = run or latest_run(rows)
    return [r for r in rows if r.get("run_id") == run] if run else rows


def _save(fig, path: str) -> str:
    """Write ``fig`` to ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    from .._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(timings: str | list[dict] | None, counts: str | list[dict] | None, out_dir: str, run: str | None = None
         ) -> list[str]:
    """Draw the plots of one run from the two CSVs (their paths, or their rows as read_rows gives them);
    returns the paths written (a plot with no data is not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    timings = _of_run(read_rows(timings) if isinstance(timings, (str, type(None))) else timings, run)
    counts = _of_run(read_rows(counts) if isinstance(counts, (str, type(None))) else counts, run)
    written = []
    title_run = f" ({timings[0].get('suite', '')} suite, {timings[0].get('run_id', '')})" if timings else ""

    # 1. speed-up of fastddpm's providers against the best peer of each case
    sp = [r for r in timings if r.get("role") == "ours" and math.isfinite(_f(r, "speedup"))]
    if sp:
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(sp) + 1.2))
        y = list(range(len(sp)))[::-1]
        v = [_f(r, "speedup") for r in sp]
        lo = [max(0.0, x - _f(r, "speedup_q1")) for x, r in zip(v, sp)]
        hi = [max(0.0, _f(r, "speedup_q3") - x) for x, r in zip(v, sp)]
        ax.barh(y, v, xerr=[lo, hi], color=[COLORS["ours"] if x >= 1 else "#d62728" for x in v], capsize=2)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(y, [f"{r['workload']} {r['shape']}: {r['provider']}" for r in sp], fontsize=7)
        ax.set_xlabel("speed-up vs the best peer (x; > 1 faster), IQR of per-round ratios")
        ax.set_title("fastddpm against the best peer" + title_run, fontsize=9)
        written.append(_save(fig, os.path.join(out_dir, PLOTS[0])))

    # 2. end to end: images/s and it/s, every provider
    e2e = [r for r in timings if r.get("kind") in ("sampling", "training") and math.isfinite(_f(r, "rate"))]
    if e2e:
        groups: dict[str, list[dict]] = {}
        for r in e2e:
            groups.setdefault(f"{r['workload']}, {r['shape']}", []).append(r)
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + 0.9 * sum(len(g) for g in groups.values()) / 3),
                                 squeeze=False)
        for ax, (name, rs) in zip(axes[:, 0], groups.items()):
            ys = list(range(len(rs)))[::-1]
            ax.barh(ys, [_f(r, "rate") for r in rs], color=[COLORS.get(r.get("role", "peer"), "#999999") for r in rs])
            for y, r in zip(ys, rs):  # training: the peak memory next to the bar
                if math.isfinite(_f(r, "peak_mib")):
                    ax.text(_f(r, "rate"), y, f" {_f(r, 'peak_mib'):,.0f} MiB", va="center", fontsize=6)
            ax.set_yticks(range(len(rs))[::-1], [r["provider"] for r in rs], fontsize=7)
            ax.set_title(name, fontsize=8, loc="left")
            ax.set_xlabel(rs[0].get("rate_unit", ""), fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
        fig.suptitle(f"End to end ({KEY}; training: peak MiB at the bar)" + title_run, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out_dir, PLOTS[1])))

    # 3. the GPU cost proxy
    cs = [r for r in counts if math.isfinite(_f(r, "ops"))]
    if cs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 0.3 * len(cs) + 1.2), sharey=True)
        y = list(range(len(cs)))[::-1]
        col = [COLORS.get(r.get("role", "peer"), "#999999") for r in cs]
        a1.barh(y, [_f(r, "ops") for r in cs], color=col)
        a2.barh(y, [_f(r, "bytes") / 1e6 for r in cs], color=col)
        a1.set_yticks(y, [f"{r['workload']} {r['shape']}: {r['provider']}" for r in cs], fontsize=7)
        a1.set_xlabel("aten operators dispatched", fontsize=8)
        a2.set_xlabel("MB of tensors allocated", fontsize=8)
        fig.suptitle(f"GPU cost proxy per step ({KEY})" + title_run, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out_dir, PLOTS[2])))
    return written


def main(argv=None) -> int:
    import argparse

    from .._io import check_output_dir

    ap = argparse.ArgumentParser(description="PNG plots from the benchmark CSVs")
    default = os.path.join("benchmarks", "results")
    ap.add_argument("--timings", default=None, metavar="CSV",
                    help=f"default: bench_timings.csv beside --counts, else in {default}")
    ap.add_argument("--counts", default=None, metavar="CSV",
                    help=f"default: bench_counts.csv beside --timings, else in {default}")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help=f"folder of the PNGs (default: the CSVs' folder, else {default})")
    ap.add_argument("--run", default=None, metavar="RUN_ID", help="the run to plot (default: the latest)")
    a = ap.parse_args(argv)
    given = [f for f, v in (("--timings", a.timings), ("--counts", a.counts)) if v is not None]
    # the two files of one `fastddpm bench --csv DIR`: a file given alone is read with its sibling, never with
    # the repository's (which holds other runs)
    folder = os.path.dirname(a.timings or a.counts) if given else default
    a.timings = a.timings if a.timings is not None else os.path.join(folder, "bench_timings.csv")
    a.counts = a.counts if a.counts is not None else os.path.join(folder, "bench_counts.csv")
    a.out = a.out if a.out is not None else folder  # (never over the repository's plots for other CSVs)
    for flag in given:
        path = getattr(a, flag[2:])
        if not os.path.isfile(path):
            ap.error(f"{flag}: no such file {path!r}")
    missing = [p for p in (a.timings, a.counts) if not os.path.exists(p)]
    if len(missing) == 2:
        ap.error(f"--timings, --counts: neither {a.timings!r} nor {a.counts!r} exists "
                 "(write them with `fastddpm bench --csv`)")
    try:  # each file read once: a file that is no CSV is named here
        rows = [read_rows(p, flag) for flag, p in (("--timings", a.timings), ("--counts", a.counts))]
        check_output_dir(a.out, "--out")
    except ValueError as exc:
        ap.error(str(exc))
    if a.run is not None:
        runs = {r.get("run_id") for rs in rows for r in rs}
        if a.run not in runs:
            ap.error(f"--run: no run {a.run!r} in {a.timings!r} or {a.counts!r}; the latest is "
                     f"{max((r for r in runs if r), default='none')!r}")
    for path in plot(*rows, a.out, a.run):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
