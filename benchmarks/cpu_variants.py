"""The portable CPU build (dispatched at run time) against a -march=native one, A and B interleaved.

    python -m benchmarks.cpu_variants --native ROOT_A --portable ROOT_B [--rounds 15] [--variants avx512,avx2]

ROOT_A, ROOT_B: source folders with a built fastddpm (ROOT_A built with FASTDDPM_CPU_FLAGS=-march=native,
ROOT_B with the default portable flags). A process loads one CPU kernel build, so each build gets a worker
process that stays up; the parent asks the workers in turn (the order alternating each round) to time one
op (3 warm-up calls, then the median of --calls calls, one thread), and reports per op the median over
rounds of each build and its ratio to native. Timings on a shared machine drift: only the interleaved
ratios are meant to be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import fastddpm
from fastddpm.ops import _library
g = torch.Generator().manual_seed(0)
sched = fastddpm.NoiseSchedule(1000)
x0, eps = torch.randn(16, 3, 64, 64, generator=g), torch.randn(16, 3, 64, 64, generator=g)
t = torch.randint(0, 1000, (16,), generator=g)
xg = torch.randn(16, 128, 32, 32, generator=g)
xcl = xg.contiguous(memory_format=torch.channels_last)
w, b = torch.randn(128, generator=g), torch.randn(128, generator=g)
s, m, z = (torch.randn(16, 3, 64, 64, generator=g) for _ in range(3))
tt = torch.full((16,), 500)
ops = {
    "q_sample 16x3x64x64": lambda: fastddpm.ops.q_sample(x0, t, eps, sched, backend="cpu"),
    "ddpm_step 16x3x64x64": lambda: fastddpm.ops.ddpm_step(s, m, tt, sched, noise=z, backend="cpu"),
    "group_norm_silu 16x128x32x32": lambda: fastddpm.ops.group_norm_silu(xg, 32, w, b, backend="cpu"),
    "group_norm_silu 16x128x32x32 channels_last":
        lambda: fastddpm.ops.group_norm_silu(xcl, 32, w, b, backend="cpu"),
}
import os
root = os.path.dirname(os.path.dirname(os.path.realpath(fastddpm.__file__)))
print(json.dumps({"variant": _library.CPU_VARIANT, "ops": list(ops), "root": root}), flush=True)
for line in sys.stdin:
    name, calls = line.rsplit(" ", 1)
    fn = ops[name]
    for _ in range(3):
        fn()
    ts = []
    for _ in range(int(calls)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    print(json.dumps(sorted(ts)[len(ts) // 2]), flush=True)
"""


VARIANTS = ("default", "avx2", "avx512")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--native", required=True, help="folder of the FASTDDPM_CPU_FLAGS=-march=native build")
    ap.add_argument("--portable", required=True, help="folder of the portable build")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=21)
    ap.add_argument("--variants", default="", help="portable builds to time (default: the one loaded by default)")
    a = ap.parse_args(argv)
    import platform

    for flag, root in (("--native", a.native), ("--portable", a.portable)):
        if not os.path.isdir(root):
            ap.error(f"{flag}: expected the source folder of a built fastddpm, got {root!r}")
    for flag, n in (("--rounds", a.rounds), ("--calls", a.calls)):
        if n < 1:
            ap.error(f"{flag}: expected a positive integer, got {n}")
    bad = [v for v in a.variants.split(",") if v and v not in VARIANTS]
    if bad:
        ap.error(f"--variants: expected a comma-separated list of {', '.join(VARIANTS)}, got {bad[0]!r}")

    runs = [("native", a.native, None)] + ([(v, a.portable, v) for v in a.variants.split(",") if v]
                                           or [("portable", a.portable, None)])
    workers, loaded, op_names = {}, {}, None
    for label, root, variant in runs:
        env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", FASTDDPM_REQUIRE_EXTENSION="1")
        env.pop("FASTDDPM_CPU_VARIANT", None)
        if variant:
            env["FASTDDPM_CPU_VARIANT"] = variant
        err = tempfile.TemporaryFile(mode="w+")  # (a file, not a pipe: a chatty worker never blocks on it)
        p = subprocess.Popen([sys.executable, "-c", WORKER], cwd=root, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, text=True)
        line = p.stdout.readline()
        if not line:  # the worker could not load that build (or that variant)
            p.wait()
            err.seek(0)
            why = (err.read().strip().splitlines() or ["no output"])[-1]
            flag = "--native" if label == "native" else "--variants" if variant else "--portable"
            ap.error(f"{flag}: the {label} build in {root!r} does not run here ({why})")
        hello = json.loads(line)
        if os.path.realpath(hello["root"]) != os.path.realpath(root):
            # fastddpm imported from elsewhere (an installed or editable copy): the table would compare the
            # same build with itself
            p.kill()
            flag = "--native" if label == "native" else "--portable"
            ap.error(f"{flag}: fastddpm loads from {hello['root']!r}, not from {root!r}: that folder holds no "
                     "built fastddpm package")
        workers[label], loaded[label], op_names = p, hello["variant"], hello["ops"]
    labels = [r[0] for r in runs]
    res: dict[str, dict[str, list[float]]] = {op: {lb: [] for lb in labels} for op in op_names}
    for i in range(a.rounds):
        order = labels if i % 2 == 0 else labels[::-1]
        for op in op_names:
            for lb in order:
                workers[lb].stdin.write(f"{op} {a.calls}\n")
                workers[lb].stdin.flush()
                res[op][lb].append(json.loads(workers[lb].stdout.readline()))
    for p in workers.values():
        p.stdin.close()
        p.wait()
    from fastddpm.bench.timing import cpu_name

    print(f"# {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, 1 thread per worker; load average "
          f"{os.getloadavg()[0]:.1f} at the end (a shared machine: other jobs ran alongside); {a.rounds} "
          f"interleaved rounds of the median of {a.calls} calls; builds loaded: "
          + ", ".join(f"{k} -> {v}" for k, v in loaded.items()))
    print("| op | " + " | ".join(f"{lb} (ms)" for lb in labels) + " | "
          + " | ".join(f"{lb} / native" for lb in labels[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(labels) - 1))
    for op, by in res.items():
        med = {lb: statistics.median(by[lb]) for lb in labels}
        print(f"| {op} | " + " | ".join(f"{med[lb] * 1e3:.3f}" for lb in labels) + " | "
              + " | ".join(f"{med[lb] / med['native']:.3f}" for lb in labels[1:]) + " |")


if __name__ == "__main__":
    main()
