"""The README's sample-quality table and plot, regenerated in one command:

    python -m benchmarks.quality [--seeds 1,2,3,4,5] [--n 359] [--jobs 1] [--force] [--only ddim]

Each row is `fastddpm eval` of the shipped digits model (FD to the 359 held-out digits, classifier confidence),
run once per seed; the table gives mean +- sample standard deviation over the seeds. Per-run results are cached
in benchmarks/results/quality/<row>_s<seed>.json (with the commit and settings that made them) and reused
unless --force or the settings differ; the summary goes to benchmarks/results/quality.json, the table to
quality.md and between the README's quality markers, the plot (FD against steps per sampler) to quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.path.join(RESULTS, "quality")
README = os.path.join(ROOT, "README.md")
START, END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"

# (row id, label, eval arguments, sampler for the plot, steps)
ROWS = [
    ("real_train", "real digits, train split (the floor)", ["--real", "train"], None, None),
    ("ddpm_1000", "DDPM, 1000 steps", ["--sampler", "ddpm", "--steps", "1000"], "DDPM", 1000),
    ("ddim_20", "DDIM, 20 steps", ["--sampler", "ddim", "--steps", "20"], "DDIM", 20),
    ("ddim_50", "DDIM, 50 steps (the model's default)", ["--sampler", "ddim", "--steps", "50"], "DDIM", 50),
    ("ddim_100", "DDIM, 100 steps", ["--sampler", "ddim", "--steps", "100"], "DDIM", 100),
    ("ddim_200", "DDIM, 200 steps", ["--sampler", "ddim", "--steps", "200"], "DDIM", 200),
    ("ddim_1000", "DDIM, 1000 steps", ["--sampler", "ddim", "--steps", "1000"], "DDIM", 1000),
    ("dpmpp_10", "DPM-Solver++(2M), 10 steps", ["--sampler", "dpm++2m", "--steps", "10"], "DPM-Solver++(2M)", 10),
    ("dpmpp_20", "DPM-Solver++(2M), 20 steps", ["--sampler", "dpm++2m", "--steps", "20"], "DPM-Solver++(2M)", 20),
    ("dpmpp_50", "DPM-Solver++(2M), 50 steps", ["--sampler", "dpm++2m", "--steps", "50"], "DPM-Solver++(2M)", 50),
    ("noise", "Gaussian noise clipped to [-1, 1] (the ceiling)", ["--real", "noise"], None, None),
]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"


class EvalUsageError(Exception):
    """`fastddpm eval` refused the settings (exit status 2): its one-line message."""


def _eval(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode == 2:  # a setting of this script passed on (--n, --seeds): eval's line names it
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fastddpm eval: error: ")]
        if lines:
            raise EvalUsageError(lines[-1].removeprefix("fastddpm eval: error: "))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")


def _cached(row, seed: int, n: int) -> dict | None:
    """The cached run of ``row`` with this seed and n, or None."""
    rid, _, eval_args, _, _ = row
    path = os.path.join(CACHE, f"{rid}_s{seed}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        r = json.load(f)
    return r if r.get("settings") == {"eval_args": eval_args, "seed": seed, "n": n} else None


def _run_one(row, seed: int, n: int, force: bool, log) -> dict:
    rid, _, eval_args, _, _ = row
    path = os.path.join(CACHE, f"{rid}_s{seed}.json")
    settings = {"eval_args": eval_args, "seed": seed, "n": n}
    r = None if force else _cached(row, seed, n)
    if r is not None:
        return r
    cmd = [sys.executable, "-m", "fastddpm", "eval", *eval_args, "--seed", str(seed), "--n", str(n), "--threads",
           "1", "--json", path]
    t0 = time.perf_counter()
    _eval(cmd)
    with open(path) as f:
        r = json.load(f)
    r["settings"] = settings
    r["commit"] = _commit()
    from fastddpm._io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(r, f, indent=1)
    log(f"{rid} seed {seed}: FD {r['fd']:.2f} ({time.perf_counter() - t0:.0f} s)")
    return r


def summarize(rows, runs: dict, seeds) -> list[dict]:
    from fastddpm.eval.cli import summarize as summ

    out = []
    for row in rows:
        rid, label, eval_args, sampler, steps = row
        s = summ([runs[(rid, sd)] for sd in seeds], seeds)
        s.update(id=rid, label=label, command="fastddpm eval " + " ".join(eval_args) + " --seeds "
                 + ",".join(map(str, seeds)), sampler=sampler, steps=steps)
        s["commits"] = sorted({r.get("commit", "-") for r in s["runs"]})
        out.append(s)
    return out


def table(summary: list[dict], seeds, n: int) -> str:
    lines = [f"| images (n = {n}), {len(seeds)} seeds | FD to held-out, mean ± std | FD min–max | confidence | "
             "> 0.9 | command |", "|---|---:|---:|---:|---:|---|"]
    for s in summary:
        fd, c, c9 = s["fd"], s["confidence"], s["confident_0.9"]
        lines.append(f"| {s['label']} | {fd['mean']:.2f} ± {fd['std']:.2f} | {fd['min']:.2f}–{fd['max']:.2f} | "
                     f"{c['mean']:.3f} | {c9['mean']:.3f} | `{s['command']}` |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    by = {}
    for s in summary:
        if s["sampler"]:
            by.setdefault(s["sampler"], []).append(s)
    for name, ss in by.items():
        ss = sorted(ss, key=lambda s: s["steps"])
        xs = [s["steps"] for s in ss]
        ys = [s["fd"]["mean"] for s in ss]
        es = [s["fd"]["std"] for s in ss]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    floor = next((s for s in summary if s["id"] == "real_train"), None)
    if floor:
        ax.axhline(floor["fd"]["mean"], color="grey", ls="--", lw=1, label="real digits (floor)")
    ddpm = next((s for s in summary if s["id"] == "ddpm_1000"), None)
    if ddpm:  # the quality targets are read against DDPM 1000's mean: within 10% of it
        ax.axhline(1.1 * ddpm["fd"]["mean"], color="C0", ls=":", lw=1, label="DDPM 1000 + 10%")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (model evaluations)")
    ax.set_ylabel("FD to held-out digits (lower is better)")
    ax.set_title(f"shipped digits model, mean ± std over {len(summary[0]['seeds'])} seeds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from fastddpm._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--n", type=int, default=359)
    ap.add_argument("--jobs", type=int, default=1, help="evaluations run at once (each on one thread)")
    ap.add_argument("--force", action="store_true", help="rerun every evaluation, cached or not")
    ap.add_argument("--only", help="comma-separated row ids to (re)run before the table is rebuilt from the cache")
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        ap.error("--seeds: expected at least two distinct seeds (the table reports a spread)")
    if any(not 0 <= sd < 2**63 for sd in seeds):
        ap.error(f"--seeds: expected integers in [0, 2**63), got {args.seeds!r}")
    if args.n < 2 or args.jobs < 1:
        ap.error("--n: expected >= 2; --jobs: expected >= 1")
    rows = ROWS
    if args.only:
        ids = args.only.split(",")
        unknown = [i for i in ids if i not in {r[0] for r in ROWS}]
        if unknown:
            ap.error(f"--only: unknown rows {unknown}; expected among {[r[0] for r in ROWS]}")
        rows = [r for r in ROWS if r[0] in ids]
    os.makedirs(CACHE, exist_ok=True)
    sys.path.insert(0, ROOT)
    from fastddpm.bench.timing import cpu_name

    def log(s):
        print(s, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    jobs = [(row, sd) for row in rows for sd in seeds]
    ex = ThreadPoolExecutor(args.jobs)
    try:
        results = list(ex.map(lambda j: _run_one(j[0], j[1], args.n, args.force, log), jobs))
    except EvalUsageError as exc:
        ex.shutdown(cancel_futures=True)  # (the queued evaluations would be refused alike)
        print(f"python -m benchmarks.quality: error: {exc}", file=sys.stderr)
        return 2
    ex.shutdown()
    runs = {(row[0], sd): r for (row, sd), r in zip(jobs, results)}
    # the table is always every row: those not rerun come from the cache
    missing = []
    for row in ROWS:
        for sd in seeds:
            if (row[0], sd) not in runs:
                r = _cached(row, sd, args.n)
                if r is None:
                    missing.append(f"{row[0]} seed {sd}")
                runs[(row[0], sd)] = r
    if missing:
        log(f"not in the cache yet: {', '.join(missing)}; table not written (run without --only)")
        return 0
    summary = summarize(ROWS, runs, seeds)
    md = table(summary, seeds, args.n)
    from fastddpm._io import atomic_path

    meta = {"seeds": seeds, "n": args.n, "cpu": cpu_name(), "commit": _commit(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "rows": summary}
    with atomic_path(os.path.join(RESULTS, "quality.json")) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    with atomic_path(os.path.join(RESULTS, "quality.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
    plot(summary, os.path.join(RESULTS, "quality.png"))
    if not args.no_readme:
        from benchmarks.run import update_readme

        try:
            update_readme(README, md, START, END)
        except ValueError as exc:
            log(f"{exc}: table not inserted")
    print(md)
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote benchmarks/results/quality.json, quality.md, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
