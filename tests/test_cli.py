"""fastddpm sample / export / eval through the command line, and the Frechet distance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import pretrained
from fastddpm.cli import main
from fastddpm.eval.metrics import frechet_distance
from fastddpm.train.loop import grid_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on 2 shared cores are several times slower
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--model", "tiny", "--image-size", "8", "--batch-size", "4", "--steps", "2",
               "--sample-every", "0", "--no-progress", "--out", str(out)])
    assert rc == 0
    return out


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.size, im.mode


def test_sample_from_checkpoint_writes_png_and_npz(run_dir, tmp_path):
    png, npz = tmp_path / "g.png", tmp_path / "g.npz"
    rc = main(["sample", "--ckpt", str(run_dir), "--n", "7", "--batch-size", "3", "--steps", "3",
               "--seed", "1", "--out", str(png), "--npz", str(npz), "--png-dir", str(tmp_path / "each"),
               "--no-progress"])
    assert rc == 0
    assert _png(png) == (grid_size(7, 8, 8, scale=8), "L")  # 3 x 3 grid of 8x8 images, x8
    imgs = np.load(npz)["images"]
    assert imgs.shape == (7, 8, 8, 1) and imgs.dtype == np.uint8 and imgs.std() > 0
    assert sorted(os.listdir(tmp_path / "each")) == [f"{i:06d}.png" for i in range(7)]
    # Batch i uses seed + i: the images do not depend on the batch size.
    rc = main(["sample", "--ckpt", str(run_dir), "--n", "7", "--batch-size", "3", "--steps", "3",
               "--seed", "1", "--npz", str(tmp_path / "h.npz"), "--no-progress"])
    assert rc == 0 and np.array_equal(np.load(tmp_path / "h.npz")["images"], imgs)


def test_export_then_sample_by_path(run_dir, tmp_path):
    w = tmp_path / "m.safetensors"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(w), "--steps", "2"]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["format"] == "fastddpm-model" and meta["steps"] == 2
    png = str(tmp_path / "e.png")
    assert main(["sample", "--model", str(w), "--n", "2", "--out", png, "--no-progress"]) == 0
    assert _png(tmp_path / "e.png")[0] == grid_size(2, 8, 8, scale=8)


def test_sample_builtin_digits(tmp_path):
    if not os.path.isfile(os.path.join(pretrained.ASSETS, "digits.safetensors")):
        pytest.skip("the digits model is not shipped in this checkout")
    out = tmp_path / "d.png"
    args = ["sample", "--model", "digits", "--n", "4", "--steps", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert _png(out) == (grid_size(4, 16, 16, scale=4), "L")


def test_sample_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    out = tmp_path / "u.png"
    rc = main(["sample", "--ckpt", str(tmp_path / "unet"), "--n", "2", "--steps", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert _png(out) == (grid_size(2, 8, 8, scale=8), "RGB")


def test_sample_bad_usage(run_dir, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(run_dir), "--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "missing"), "--n", "1"]) == 2
    assert main(["sample", "--model", "no-such-model", "--n", "1"]) == 2
    assert "unknown built-in model" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(run_dir), "--steps", "5000", "--n", "1"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", "digits", "--ckpt", str(run_dir)])
    assert e.value.code == 2


def test_help_of_every_subcommand():
    for cmd in ("train", "sample", "eval", "export"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0


def test_console_entry_point_runs(run_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastddpm", "sample", "--ckpt", str(run_dir), "--n", "1",
                        "--steps", "1", "--out", str(tmp_path / "p.png"), "--no-progress"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and _png(tmp_path / "p.png")[0] == grid_size(1, 8, 8, scale=8)


def test_frechet_distance_against_closed_form():
    # Independent route: FD between two Gaussians in closed form, for diagonal covariances
    # FD = |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)), against the estimate on large samples.
    rng = np.random.default_rng(0)
    d, n = 4, 200_000
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 0.5, 0.5, 1.0])
    mu = np.array([0.5, -0.25, 0.0, 1.0])
    a = rng.standard_normal((n, d)) * np.sqrt(s1)
    b = rng.standard_normal((n, d)) * np.sqrt(s2) + mu
    exact = (mu ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert abs(frechet_distance(a, b) - exact) < 0.02
    assert abs(frechet_distance(a, a)) < 1e-4


def test_eval_baselines_and_npz(tmp_path, capsys):
    j1, j2 = tmp_path / "floor.json", tmp_path / "noise.json"
    assert main(["eval", "--real", "train", "--n", "100", "--json", str(j1)]) == 0
    assert main(["eval", "--real", "noise", "--n", "100", "--json", str(j2)]) == 0
    floor, noise = json.loads(j1.read_text()), json.loads(j2.read_text())
    assert floor["fd"] < noise["fd"] / 10 and floor["confidence"] > 0.95 > noise["confidence"]
    imgs = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=imgs)
    assert main(["eval", "--npz", str(tmp_path / "x.npz")]) == 0
    assert main(["eval", "--real", "train", "--n", "1"]) == 2
