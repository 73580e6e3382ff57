"""The README's examples run: its Python examples ("Use") as written, and its command-line examples ("Train and
sample from the command line") with fewer training steps: each `fastddpm train` line (and the torchrun line,
two processes) for 2 steps, then the `fastddpm sample` line on the run the first line made. The block's last
line, `fastddpm eval`, is the sample-quality measurement of the README's quality table (minutes; its command
line is tested in test_cli.py). Paths are relative, so the runs land in a temporary folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from _utils import repo_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block() -> list[list[str]]:
    """The command lines of the README's block under "## Train and sample from the command line"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Train and sample from the command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(ln.split("#", 1)[0]) for ln in block.splitlines() if ln.split("#", 1)[0].strip()]


def _run(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = repo_env(OMP_NUM_THREADS="1")
    env.pop("FASTDDPM_DEBUG", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _short(args: list[str]) -> list[str]:
    """A train command's arguments with 2 steps and the config file found in the repository."""
    out = list(args)
    if "--steps" in out:
        out[out.index("--steps") + 1] = "2"
    else:
        out += ["--steps", "2"]
    if "--config" in out:
        i = out.index("--config") + 1
        out[i] = os.path.join(ROOT, out[i])
    return out + ["--no-progress"]


def test_the_block_is_what_these_tests_run():
    heads = [" ".join(c[:2]) for c in _block()]
    assert heads == ["fastddpm train", "fastddpm train", "torchrun --nproc_per_node", "fastddpm sample",
                     "fastddpm eval"], heads


def test_train_lines_then_sample(tmp_path):
    cmds = _block()
    for c in (c for c in cmds if c[:2] == ["fastddpm", "train"]):
        r = _run([sys.executable, "-m", "fastddpm", *_short(c[1:])], tmp_path)
        assert r.returncode == 0, (c, r.stderr[-2000:])
    assert (tmp_path / "runs" / "digits").is_dir() and (tmp_path / "runs" / "t").is_dir()
    sample = next(c for c in cmds if c[:2] == ["fastddpm", "sample"])
    r = _run([sys.executable, "-m", "fastddpm", *sample[1:], "--no-progress"], tmp_path)
    assert r.returncode == 0, (sample, r.stderr[-2000:])
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "samples.npz").is_file()


@pytest.mark.slow
@pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="two processes on one GPU: --device auto refuses it")
def test_torchrun_line(tmp_path):
    c = next(c for c in _block() if c[0] == "torchrun")
    i = c.index("-m")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *c[1:i], "-m", "fastddpm",
            *_short(c[i + 2:])]
    r = _run(argv, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "ddp").is_dir()
    assert (r.stdout + r.stderr).count("trained to step") == 1, r.stderr[-3000:]  # rank 0 reports, alone


def _python_blocks() -> list[str]:
    """The Python blocks of the README's "## Use" section, as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_examples_run_as_written():
    """Each Python example of "## Use" runs as written; the one name the text leaves to the reader,
    ``diffusers_unet`` ("an existing UNet2DModel"), is a small one. The results are checked against what the
    comments say they are."""
    diffusers = pytest.importorskip("diffusers")
    blocks = _python_blocks()
    assert len(blocks) == 2
    ns: dict = {}
    exec(compile(blocks[0], "README.md (Use, block 1)", "exec"), ns)
    assert ns["x_t"].shape == ns["v"].shape == ns["x_prev"].shape == (16, 3, 32, 32)
    ns["diffusers_unet"] = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (two threads on 2 shared cores are several times slower)
    try:
        exec(compile(blocks[1], "README.md (Use, block 2)", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    assert sum(p.numel() for p in ns["unet"].parameters()) == 35_746_307  # the comment's count
    assert ns["images"].shape == (4, 3, 32, 32) and torch.isfinite(ns["images"]).all()
