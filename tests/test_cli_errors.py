"""Every user mistake the command line can make, driven through the real CLI in a subprocess: one line on
stderr, exit status 2, no traceback, found before any long work; --debug / FASTDDPM_DEBUG=1 add the
traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, cwd=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, (env or {}).pop("PYTHONPATH_FIRST", None),
                                                  os.environ.get("PYTHONPATH")) if p)
    e.pop("FASTDDPM_DEBUG", None)
    e.update(env or {})
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fastddpm", *map(str, args)], cwd=cwd or ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    r.seconds = time.perf_counter() - t0
    return r


def _usage_error(r, *must_contain: str) -> str:
    """The one error line of a usage mistake (stderr may hold nothing else but warnings before it)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("fastddpm ")]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    assert ": error: " in line, line
    for s in must_contain:
        assert s in line, (s, line)
    return line


# A sample run that would take long (2,000 images, all 1000 DDPM steps): each mistake must be found first.
LONG = ["sample", "--n", "2000", "--sampler", "ddpm", "--steps", "1000", "--no-progress"]


def _quick(r):
    assert r.seconds < 60, f"the mistake was found only after {r.seconds:.0f} s (after the work?)"


def test_sample_out_unknown_image_type(tmp_path):
    r = _cli(*LONG, "--out", tmp_path / "a.txt")
    _usage_error(r, "--out: expected a file name ending in .png", "a.txt")
    _quick(r)
    assert not (tmp_path / "a.txt").exists()


def test_sample_out_is_a_folder(tmp_path):
    r = _cli(*LONG, "--out", tmp_path)
    _usage_error(r, "--out:", "is a folder; expected a file name")
    _quick(r)
    (tmp_path / "d.png").mkdir()
    _usage_error(_cli(*LONG, "--out", tmp_path / "d.png"), "--out:", "is a folder; expected a file name")


def test_sample_png_dir_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    r = _cli(*LONG, "--png-dir", f)
    _usage_error(r, "--png-dir:", "is a file; expected a folder")
    _quick(r)


def test_sample_npz_bad_name_and_folder(tmp_path):
    _usage_error(_cli(*LONG, "--npz", tmp_path / "x.png"), "--npz: expected a file name ending in .npz")
    d = tmp_path / "d.npz"
    d.mkdir()
    _usage_error(_cli(*LONG, "--npz", d), "--npz:", "is a folder")


def test_sample_out_unwritable_folder(tmp_path):
    # /proc takes no new files, even for root (os.access would say yes to root).
    r = _cli(*LONG, "--out", "/proc/a.png")
    line = _usage_error(r, "--out: cannot write in the folder '/proc'")
    assert ".tmp" not in line  # the user's folder, not a temporary file, is named
    _quick(r)
    f = tmp_path / "file"
    f.write_text("x")
    _usage_error(_cli(*LONG, "--out", f / "sub" / "a.png"), "--out:", "is a file, so the folder")


@pytest.mark.parametrize("flag, value", [("--nrow", "0"), ("--nrow", "-2"), ("--scale", "0"), ("--scale", "-3")])
def test_sample_grid_layout_not_positive(flag, value, tmp_path):
    # before: --nrow 0 and --scale <= 0 were taken silently, --nrow -2 failed in numpy naming no argument
    r = _cli(*LONG, "--out", tmp_path / "a.png", flag, value)
    _usage_error(r, f"{flag}: expected a positive integer, got {value}")
    _quick(r)


def test_sample_grid_too_large(tmp_path):
    # 2,000 16x16 images (45 per row: 812 x 812 pixels before scaling) at scale 1000: 812,000 x 812,000 pixels,
    # which filled the memory until the process was killed; PIL refuses to open more than 2 x MAX_IMAGE_PIXELS.
    from PIL import Image

    r = _cli(*LONG, "--out", tmp_path / "a.png", "--scale", "1000")
    _usage_error(r, "--out: the grid of 2000 images at scale 1000 would be", f"{2 * Image.MAX_IMAGE_PIXELS:,}",
                 "--npz")
    _quick(r)
    assert not (tmp_path / "a.png").exists()
    # a row wider than the images it holds has no empty columns: 4 images in a row of 100,000,000 is one row of 4
    r = _cli(*LONG, "--n", "4", "--steps", "1", "--out", tmp_path / "b.png", "--nrow", "100000000")
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "b.png") as im:
        assert im.size == ((4 * 18 + 2) * 4, 20 * 4)  # 16x16 digits, 2-pixel gaps, scale 64 // 16


def test_train_bad_device_string(tmp_path):
    # before: torch's RuntimeError as a traceback, exit status 1
    r = _cli("train", "--model", "tiny", "--image-size", "8", "--steps", "100000", "--device", "cuda:x",
             "--out", tmp_path / "o")
    _usage_error(r, "--device:", "cuda:x")
    _quick(r)


def test_train_preset_that_does_not_fit_the_images(tmp_path):
    # the tiny preset (8x8, attention at 4x4) on the digits at their default 16x16
    r = _cli("train", "--model", "tiny", "--steps", "100000", "--out", tmp_path / "o")
    _usage_error(r, "--model: the tiny preset is built for 8x8 images", "16x16", "--image-size 8")
    _quick(r)
    # a --unet override at fault (at 8x8 too) is named as it is, without advice about the size
    r = _cli("train", "--model", "tiny", "--unet", '{"norm_num_groups": 5, "attention_resolutions": [8]}',
             "--steps", "100000", "--out", tmp_path / "o")
    line = _usage_error(r, "norm_num_groups")
    assert "--image-size" not in line, line


def test_train_out_of_memory_is_one_line(tmp_path):
    """The digits at --image-size 100000 would take 57 TB: the allocator's refusal is one line naming the
    sizes to lower, exit status 2, not a traceback."""
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":  # every allocation succeeds, and the kernel kills the process later
            pytest.skip("vm.overcommit_memory = 1: a 57 TB allocation is not refused")
    r = _cli("train", "--image-size", "100000", "--steps", "2", "--out", tmp_path / "o")
    _usage_error(r, "fastddpm train: error: not enough memory:", "can't allocate memory",
                 "lower --batch-size or --image-size")
    _quick(r)


@pytest.mark.parametrize("cmd", ["sample", "eval", "train"])
def test_negative_threads(cmd, tmp_path):
    extra = ["--out", tmp_path / "o"] if cmd == "train" else []
    r = _cli(cmd, "--threads", "-1", *extra)
    _usage_error(r, "--threads", "-1")
    _quick(r)


def test_train_out_is_an_existing_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    r = _cli("train", "--model", "tiny", "--image-size", "8", "--steps", "100000", "--out", f)
    _usage_error(r, "--out:", "is a file; expected a folder")
    _quick(r)
    assert f.read_text() == "not a folder"


def test_sample_without_safetensors(tmp_path):
    # An install without safetensors: a package of that name that fails to import as a missing one would.
    shadow = tmp_path / "shadow" / "safetensors"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'safetensors'\", name='safetensors')\n")
    env = {"PYTHONPATH_FIRST": str(tmp_path / "shadow")}
    r = _cli(*LONG, "--out", tmp_path / "a.png", env=dict(env))
    # find_spec sees the shadow package, so the early check passes; the import then fails before sampling.
    _usage_error(r, "'safetensors'", "pip install safetensors")
    _quick(r)
    empty = tmp_path / "nothing"
    empty.mkdir()
    # And with safetensors truly absent from the path (find_spec finds nothing): the early check.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'safetensors' or name.startswith('safetensors.'):\n"
        "            raise ModuleNotFoundError(f\"No module named {name!r}\", name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n")
    r = _cli(*LONG, "--out", tmp_path / "b.png", env={"PYTHONPATH_FIRST": str(hide)})
    _usage_error(r, "needs the package 'safetensors'", "pip install safetensors")
    _quick(r)


def test_corrupt_npz_never_advises_allow_pickle(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file" * 20)
    r = _cli("eval", "--npz", bad)
    line = _usage_error(r, "--npz:", "is not a .npz or .npy file")
    assert "allow_pickle" not in r.stderr, line
    r = _cli("train", "--data", bad, "--out", tmp_path / "o", "--model", "tiny")
    _usage_error(r, "data:", "is not a .npz or .npy file")
    assert "allow_pickle" not in r.stderr
    # A real zip whose member is cut short.
    good = tmp_path / "good.npz"
    np.savez_compressed(good, images=np.random.default_rng(0).integers(0, 255, (50, 16, 16, 1), np.uint8))
    data = good.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    r = _cli("eval", "--npz", cut)
    _usage_error(r, "--npz:", "truncated or corrupt")
    assert "allow_pickle" not in r.stderr


def test_unet_unknown_key_lists_the_valid_ones(tmp_path):
    r = _cli("train", "--unet", '{"base_chanels": 16}', "--out", tmp_path / "o")
    line = _usage_error(r, "--unet: unknown UNetConfig field(s) 'base_chanels'", "known:", "base_channels")
    _quick(r)
    assert not (tmp_path / "o").exists(), line


def test_model_path_missing_names_the_weights(tmp_path):
    r = _cli(*LONG, "--model", tmp_path / "x.safetensors")
    line = _usage_error(r, "--model: no such file", "x.safetensors")
    assert "metadata" not in line
    _quick(r)


@pytest.mark.parametrize("how", ["flag", "flag-first", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
    args = [*LONG, "--out", tmp_path / "a.txt"]
    env = {}
    if how == "flag":
        args.append("--debug")
    elif how == "flag-first":
        args = ["--debug", *args]
    else:
        env["FASTDDPM_DEBUG"] = "1"
    r = _cli(*args, env=env)
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr and "UsageError" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("fastddpm sample: error: --out:")
