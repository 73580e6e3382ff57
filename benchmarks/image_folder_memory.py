"""Peak memory of reading an image folder for training: the streaming ImageFolder (what `fastddpm train
--data FOLDER` does) against decoding the whole folder first (what the loader did before).

    python benchmarks/image_folder_memory.py [--n 20000] [--side 256] [--size 32] [--folder DIR]

Makes a synthetic folder of N side x side RGB JPEGs (smooth random images; kept in --folder if given), then
runs each reader in a fresh process and reports its peak resident memory (ru_maxrss of the process, and of
its largest DataLoader worker: a forked worker's figure counts the pages it shares with its parent, torch's
libraries among them), and the time for one pass over the folder:

* ``decode all, then resize``: every image decoded at full resolution and kept, then cropped and resized
  into one array (the loader before streaming);
* ``load_dataset (in memory)``: fastddpm.train.load_dataset: each image decoded and resized on its own, only
  the resized (N, C, S, S) float32 tensor kept (the path for arrays and for the Python API);
* ``streaming, W workers``: ImageFolder + stream_batches, one epoch of batches of 64 as training draws
  them; nothing but the batches in flight is held.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

READERS = {
    "decode all, then resize": """
from PIL import Image
import numpy as np
from fastddpm.train.data import ImageFolder
ds = ImageFolder(folder, size)
imgs = []
for fn in ds.files:
    with Image.open(fn) as im:
        im.load()
        imgs.append(im.copy())
out = np.empty((len(imgs), size, size, 3), dtype=np.uint8)
for i, im in enumerate(imgs):
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    out[i] = np.asarray(im.resize((size, size), Image.LANCZOS))
""",
    "load_dataset (in memory)": """
from fastddpm.train import load_dataset
x = load_dataset(folder, size)
""",
    "streaming, 0 workers": """
from fastddpm.train.data import ImageFolder, stream_batches
ds = ImageFolder(folder, size)
steps = (len(ds) + 63) // 64
for b in stream_batches(ds, 0, 0, steps, 64, 0, 64, 0):
    pass
""",
    "streaming, 2 workers": """
from fastddpm.train.data import ImageFolder, stream_batches
ds = ImageFolder(folder, size)
steps = (len(ds) + 63) // 64
for i, b in enumerate(stream_batches(ds, 0, 0, steps, 64, 0, 64, 2)):
    if i % 20 == 10:
        worker_peak = max(worker_peak, children_peak_kib())
""",
}

MEASURE = """
import resource, sys, time
import torch
torch.set_num_threads(1)
folder, size = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worker_peak = 0


def children_peak_kib():
    # VmHWM of this process's children (the DataLoader workers), read while they run
    import os
    best = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/" + pid + "/status") as f:
                st = dict(ln.split(":", 1) for ln in f if ":" in ln)
        except OSError:
            continue
        if int(st.get("PPid", "0")) == os.getpid():
            best = max(best, int(st.get("VmHWM", "0 kB").split()[0]))
    return best


t0 = time.perf_counter()
{code}
dt = time.perf_counter() - t0
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, me, worker_peak, dt)
"""


def make_folder(folder: str, n: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    have = {f for f in os.listdir(folder) if f.endswith(".jpg")}
    for i in range(n):
        name = f"{i:06d}.jpg"
        if name in have:
            continue
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        im.save(os.path.join(folder, name), quality=90)


def _sides_are(path: str, side: int) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.size == (side, side)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--folder", help="where the synthetic images go (default: a temporary folder)")
    ap.add_argument("--only", action="append", default=[], help="run only readers whose name contains this")
    a = ap.parse_args(argv)
    from fastddpm.bench.timing import machine

    for flag, v in (("--n", a.n), ("--side", a.side), ("--size", a.size)):
        if v < 1:
            ap.error(f"{flag}: expected a positive integer, got {v}")
    readers = [r for r in READERS if not a.only or any(o.lower() in r.lower() for o in a.only)]
    if not readers:
        ap.error(f"--only: no reader matches {a.only}; readers: {', '.join(READERS)}")
    if a.folder is not None:
        if os.path.exists(a.folder) and not os.path.isdir(a.folder):
            ap.error(f"--folder: {a.folder!r} is a file; expected a folder")
        have = sorted(f for f in os.listdir(a.folder) if f.endswith(".jpg")) if os.path.isdir(a.folder) else []
        want = [f"{i:06d}.jpg" for i in range(a.n)]
        if have and (have != want[: len(have)] or not _sides_are(os.path.join(a.folder, have[0]), a.side)):
            # the readers read every image of the folder: the header would describe another set than they read
            ap.error(f"--folder: {a.folder!r} holds {len(have)} other JPEGs than this run's {a.n} of "
                     f"{a.side}x{a.side}; give an empty folder or one an earlier run with the same --n and --side made")
    tmp = None
    folder = a.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = tmp.name
    t0 = time.perf_counter()
    make_folder(folder, a.n, a.side)
    files = [f for f in os.listdir(folder) if f.endswith(".jpg")][: a.n]
    disk = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    print(f"# {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"# {len(files)} {a.side}x{a.side} RGB JPEGs ({disk / 2**20:.0f} MiB on disk, made in "
          f"{time.perf_counter() - t0:.0f} s), read at {a.size}x{a.size}; decoded at full size they are "
          f"{len(files) * a.side * a.side * 3 / 2**30:.2f} GiB", flush=True)
    print("| reader | peak RSS, process (MiB) | above the interpreter with torch (MiB) | peak RSS, largest "
          "worker (MiB) | time for one pass (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in readers:
        code = READERS[name]
        r = subprocess.run([sys.executable, "-c", MEASURE.format(code=code), folder, str(a.size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {name} | failed: {r.stderr.strip().splitlines()[-1]} | | | |", flush=True)
            continue
        base, me, kids, dt = r.stdout.split()
        base, me, kids = int(base) / 1024, int(me) / 1024, int(kids) / 1024
        print(f"| {name} | {me:.0f} | {me - base:.0f} | {f'{kids:.0f}' if kids else '-'} | {float(dt):.1f} |",
              flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
