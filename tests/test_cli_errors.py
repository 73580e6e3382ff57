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


# --- fastddpm eval: the classifier, the model's image shape, --npz, --n and --seeds are checked before the work.
# A default eval that would sample long (2,000 images, all 1000 DDPM steps of the shipped model).
EVAL_LONG = ["eval", "--n", "2000", "--sampler", "ddpm", "--steps", "1000"]


def _exported_unet(path, sample_size=8, in_channels=1):
    """An exported model (NAME.safetensors + NAME.json, as fastddpm export writes) of a small random U-Net."""
    import json

    from safetensors.torch import save_file

    from fastddpm.models.unet import UNet, UNetConfig

    cfg = UNetConfig(sample_size=sample_size, in_channels=in_channels, base_channels=8, channel_mult=(1, 2),
                     layers_per_block=1, attention_resolutions=(), norm_num_groups=4)
    save_file({k: v.contiguous() for k, v in UNet(cfg).state_dict().items()}, str(path))
    meta = {"format": "fastddpm-model", "unet_config": cfg.to_dict(), "sampler": "ddim", "steps": 50}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_eval_classifier_that_is_not_a_digit_classifier(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fastddpm.eval.metrics import DigitClassifier

    garbage = tmp_path / "bad.safetensors"
    garbage.write_text("garbage\n")
    unet = _exported_unet(tmp_path / "unet.safetensors")
    sd = {k: v.contiguous() for k, v in DigitClassifier().state_dict().items()}
    sd["fc.weight"] = torch.zeros(64, 10)
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(sd, str(reshaped))
    folder = tmp_path / "adir"
    folder.mkdir()
    for path, why in [(garbage, "is not a readable safetensors file"),
                      (unet, "is not a digit classifier's weights"),
                      (reshaped, "'fc.weight' is (64, 10), expected (64, 1024)"),
                      (folder, "is a folder"),
                      (tmp_path / "none.safetensors", "no such file")]:
        r = _cli(*EVAL_LONG, "--classifier", path)
        _usage_error(r, "--classifier:", str(path.name), why)
        _quick(r)
    # the shipped classifier, named explicitly, still loads (the checks refuse only what is wrong)
    from fastddpm.eval.metrics import ASSET

    r = _cli("eval", "--real", "noise", "--n", "4", "--classifier", ASSET)
    assert r.returncode == 0 and "Gaussian noise: FD" in r.stdout, r.stderr


def test_eval_model_of_other_images_is_refused_before_sampling(tmp_path):
    # an 8x8 exported model, a 3-channel 16x16 one, and an 8x8 training run (as `fastddpm train` writes it)
    small = _exported_unet(tmp_path / "small.safetensors")
    rgb = _exported_unet(tmp_path / "rgb.safetensors", sample_size=16, in_channels=3)
    for path, shape in [(small, "1x8x8"), (rgb, "3x16x16")]:
        r = _cli(*EVAL_LONG, "--model", path)
        _usage_error(r, "--model:", path.name, f"makes {shape} images", "needs 1x16x16")
        _quick(r)
    r = _cli("train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--steps", "2",
             "--out", tmp_path / "t", "--sample-every", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(*EVAL_LONG, "--ckpt", tmp_path / "t")
    _usage_error(r, "--ckpt:", "makes 1x8x8 images", "needs 1x16x16")
    _quick(r)


def test_eval_npz_must_be_uint8_digits(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"float.npz": (rng.random((4, 16, 16, 1)), "got dtype float64"),
             "nan.npz": (np.full((4, 16, 16, 1), np.nan, np.float32), "got dtype float32"),
             "int64.npz": (rng.integers(0, 255, (4, 16, 16, 1)), "got dtype int64"),
             "small.npz": (rng.integers(0, 255, (4, 8, 8, 1), np.uint8), "got shape (4, 8, 8, 1)"),
             "one.npz": (rng.integers(0, 255, (1, 16, 16, 1), np.uint8), "at least 2")}
    for name, (a, why) in cases.items():
        np.savez(tmp_path / name, images=a)
        r = _cli("eval", "--npz", tmp_path / name)
        _usage_error(r, "--npz:", why)
        if "dtype" in why or "shape" in why:
            _usage_error(r, "(N, 16, 16, 1) uint8")


def test_eval_outputs_never_overwrite_its_inputs(tmp_path, capsys):
    """`eval --npz x.npz --json x.npz` replaced the samples with the JSON (exit 0), and --json beside an
    exported model could replace the model's description; --json took any extension."""
    import json
    import shutil

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", images=rng.integers(0, 255, (4, 16, 16, 1), np.uint8))
    before = (tmp_path / "x.npz").read_bytes()
    src = os.path.join(ROOT, "fastddpm", "assets", "digits")
    for ext in (".safetensors", ".json"):
        shutil.copy(src + ext, tmp_path / ("m" + ext))
    ext = "--json: expected a file name ending in .json"
    cases = [(["--npz", tmp_path / "x.npz", "--json", tmp_path / "x.npz"], ext),
             (["--npz", tmp_path / "x.npz", "--json", tmp_path / "r.txt"], ext),
             (["--model", tmp_path / "m.safetensors", "--n", "4", "--json", tmp_path / "m.json"],
              f"--json: '{tmp_path / 'm.json'}' is the --model (its .json) file: writing it would destroy the input"),
             (["--train-classifier", tmp_path / "m.safetensors", "--model", tmp_path / "m.safetensors"],
              "--train-classifier: ", "is the --model file")]
    for argv, *text in cases:
        r = _in_process(capsys, "eval", *argv)
        _usage_error(r, *text)
    assert (tmp_path / "x.npz").read_bytes() == before
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "fastddpm-model"


def test_eval_refuses_sampling_options_it_would_ignore(tmp_path, capsys):
    """With --npz or --real nothing is sampled: --sampler/--steps/--batch-size were ignored (exit 0, even with
    --steps -3), and --batch-size made --real noise --seeds refuse seeds for batches it never draws."""
    import json
    import math

    np.savez(tmp_path / "c.npz", images=np.zeros((4, 16, 16, 1), np.uint8))
    for argv, text in [(["--real", "train", "--n", "3", "--sampler", "ddpm", "--steps", "99999"],
                        "--sampler, --steps: sampling options, not used with --real train (nothing is sampled)"),
                       (["--npz", tmp_path / "c.npz", "--steps", "-3"],
                        "--steps: a sampling option, not used with --npz (its images are already drawn)"),
                       (["--real", "noise", "--seeds", "0,1", "--n", "4", "--batch-size", "2"],
                        "--batch-size: a sampling option, not used with --real noise"),
                       # recorded as "seed": 5 in the result, as if it had drawn the file's images
                       (["--npz", tmp_path / "c.npz", "--seed", "5"], "--seed: --npz images are already drawn")]:
        _usage_error(_in_process(capsys, "eval", *argv), text)
    # one class everywhere: an entropy of 0 bits, printed and written as 0, not -0
    r = _in_process(capsys, "eval", "--npz", tmp_path / "c.npz", "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "c.json").read_text())["class_entropy_bits"]
    assert v == 0 and math.copysign(1.0, v) == 1.0


def test_eval_npz_honours_n_up_to_the_files_count(tmp_path):
    import json

    imgs = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "ten.npz", images=imgs)
    np.savez(tmp_path / "five.npz", images=imgs[:5])
    r = _cli("eval", "--npz", tmp_path / "ten.npz", "--n", "50")
    _usage_error(r, "--n:", "holds 10 images, asked for 50")
    out = {}
    for name, extra in [("ten_n5", ["--npz", tmp_path / "ten.npz", "--n", "5"]),
                        ("five", ["--npz", tmp_path / "five.npz"]), ("ten", ["--npz", tmp_path / "ten.npz"])]:
        r = _cli("eval", *extra, "--json", tmp_path / f"{name}.json")
        assert r.returncode == 0, r.stderr
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    # --n 5: the file's first five images, the same figures as a file of just those five
    assert out["ten_n5"]["n"] == 5 and out["ten_n5"]["fd"] == pytest.approx(out["five"]["fd"], rel=1e-9)
    assert out["ten_n5"]["class_counts"] == out["five"]["class_counts"]
    assert out["ten"]["n"] == 10 and out["ten"]["fd"] != pytest.approx(out["five"]["fd"])  # no --n: all ten
    r = _cli("eval", "--npz", tmp_path / "ten.npz", "--seeds", "1,2")
    _usage_error(r, "--seeds:", "--npz")


@pytest.mark.parametrize("seeds, why", [("1", "at least two seeds"), ("1,,2", "no empty item"),
                                        ("1,2,", "no empty item"), ("1,2,1", "1 more than once"),
                                        ("1,x", "comma-separated integers")])
def test_eval_seeds_need_two_distinct(seeds, why):
    r = _cli(*EVAL_LONG, "--seeds", seeds)
    _usage_error(r, "--seeds:", why, repr(seeds))
    _quick(r)


def test_eval_summarize_needs_two_runs():
    from fastddpm.eval.cli import summarize

    run = {"what": "x", "n": 2, "seconds": 1.0, "fd": 1.0, "confidence": 0.5, "confident_0.9": 0.0,
           "class_entropy_bits": 1.0}
    with pytest.raises(ValueError, match="at least two"):
        summarize([run], [1])
    s = summarize([run, dict(run, fd=3.0)], [1, 2])
    assert s["fd"]["std"] == pytest.approx(2 ** 0.5) and s["fd"]["mean"] == 2.0


# ----------------------------------------------------------------------------- values of the right type, wrong
TRAIN_TINY = ["train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--sample-every", "0",
              "--no-progress"]


@pytest.mark.parametrize("toml, line", [('flip = "no"', 'c.toml: flip: expected true or false, got \'no\''),
                                        ('lr = inf', "c.toml: lr: expected a finite number, got inf")])
def test_train_config_values_of_the_wrong_type(toml, line, tmp_path):
    """TOML's "no" is a non-empty string: read as a truth value it would turn flips on. The message names the
    file and its key (a value in the file is checked even where a flag replaces it)."""
    (tmp_path / "c.toml").write_text(toml + "\nsteps = 1\n")
    r = _cli(*TRAIN_TINY, "--out", tmp_path / "run", "--config", tmp_path / "c.toml")
    _usage_error(r, line)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("unet, line", [('{"mid_attention": "no"}', "--unet mid_attention: expected true or false"),
                                        ('{"channel_mult": "12"}', "--unet channel_mult: expected a list of integers"),
                                        ('{"dropout": "a"}', "--unet dropout: expected a finite number")])
def test_train_unet_overrides_of_the_wrong_type(unet, line, tmp_path):
    r = _cli(*TRAIN_TINY, "--out", tmp_path / "run", "--unet", unet)
    _usage_error(r, line)


_OUT_OF_RANGE = [("--seed", "99999999999999999999999", "--seed: expected an integer in [0, 2**63)"),
                 ("--threads", "100000", "--threads: expected 0 (torch's default) or a number of threads up to"),
                 ("--device", "meta", "--device: expected cpu or cuda[:N], got 'meta'")]


@pytest.mark.parametrize("cmd, flag, value, line", [(c, *x) for c in ("sample", "train") for x in _OUT_OF_RANGE]
                         + [("eval", *x) for x in _OUT_OF_RANGE[:2]]  # eval samples on the CPU: no --device
                         + [("demo", *_OUT_OF_RANGE[0])])  # demo has a --seed, no --threads or --device
def test_numbers_and_devices_out_of_range(cmd, flag, value, line, tmp_path):
    """A seed torch cannot take, a thread count that exhausts the process's memory map, a device the
    library does not run on: named before any work (train leaves no run folder)."""
    argv = {"sample": [*LONG, "--out", tmp_path / "a.png"], "train": [*TRAIN_TINY, "--out", tmp_path / "run"],
            "demo": ["demo", "--out", tmp_path / "d.png"], "eval": EVAL_LONG}[cmd]
    r = _cli(*argv, flag, value)
    _usage_error(r, line)
    _quick(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, line", [(["--out", ""], "--out: expected a file name, got ''"),
                                         (["--png-dir", ""], "--png-dir: expected a folder name, got ''"),
                                         (["--model", ""], "--model: expected a path, got ''"),
                                         (["--eta", "inf", "--sampler", "ddim"], "--eta: expected a finite number")])
def test_sample_empty_paths_and_infinite_eta(extra, line, tmp_path):
    """Each of these used to end in success having written nothing, sampled the built-in model, or black
    (NaN) images."""
    r = _cli(*[a for a in LONG if a not in ("--sampler", "ddpm")], *extra, cwd=tmp_path)
    _usage_error(r, line)
    _quick(r)
    assert os.listdir(tmp_path) == []


def test_a_backend_that_cannot_run_names_where_it_was_asked_for(tmp_path):
    r = _cli("demo", "--out", tmp_path / "d.png", "--backend", "cuda")  # CPU tensors: the CUDA kernels cannot
    _usage_error(r, "--backend: q_sample: backend 'cuda' cannot serve this input")
    r = _cli(*LONG, "--out", tmp_path / "a.png", env={"FASTDDPM_BACKEND": "cuda"})
    _usage_error(r, "FASTDDPM_BACKEND:", "backend 'cuda' cannot serve this input")


def test_demo_without_timesteps(tmp_path):
    _usage_error(_cli("demo", "--out", tmp_path / "d.png", "--timesteps", ""),
                 "--timesteps: expected at least one timestep")


def test_bench_markdown_is_checked_before_the_timing(tmp_path):
    r = _cli("bench", "--smoke", "--only", "q_sample", "--markdown", tmp_path)
    _usage_error(r, "--markdown:", "is a folder")
    _quick(r)
    assert "|" not in r.stdout  # no table: nothing was timed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = _cli(*TRAIN_TINY, "--steps", "2", "--save-every", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("extra, line", [(["--steps", "0"], "--steps: expected a positive integer, got 0"),
                                         (["--steps", "5000"], "--steps: expected the model's default number of "
                                          "sampling steps, 1 to its 1000 training timesteps, got 5000"),
                                         (["--out", "/proc/x.safetensors"], "--out: cannot write in the folder")])
def test_export_steps_and_out(extra, line, tiny_run, tmp_path):
    argv = ["export", "--ckpt", tiny_run, "--out", tmp_path / "m.safetensors", *extra]
    _usage_error(_cli(*argv), line)
    assert not (tmp_path / "m.safetensors").exists()


def test_resume_with_steps_at_or_below_the_checkpoint(tiny_run):
    """--steps is the run's total: below the checkpoint's step is a mistake; equal to it (the same command
    again after the run finished) has nothing to do. Both used to report "loss nan"."""
    r = _cli(*TRAIN_TINY, "--steps", "1", "--out", tiny_run, "--resume", "latest")
    _usage_error(r, "--steps: 1 is below the step of the checkpoint resumed from (2)")
    r = _cli(*TRAIN_TINY, "--steps", "2", "--out", tiny_run, "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "nothing to train" in r.stderr and "nan" not in r.stderr, r.stderr


def test_sample_eta_with_a_sampler_that_has_none(tmp_path):
    """--eta is DDIM's: with DDPM or DPM-Solver++ it used to be ignored without a word."""
    r = _cli(*LONG, "--eta", "0.5", "--out", tmp_path / "a.png")
    _usage_error(r, "--eta: DDIM's eta applies to --sampler ddim only; this run samples with ddpm")
    _quick(r)


def test_default_steps_of_a_model_with_few_timesteps(tmp_path):
    """A training run with fewer timesteps than --sample-steps samples with as many steps as its previews took
    (min of the two); an exported model whose own default exceeds its timesteps is refused naming that
    default, not a --steps the user never typed."""
    import json

    r = _cli("train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--steps", "1",
             "--num-train-timesteps", "3", "--out", tmp_path / "t", "--sample-every", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli("sample", "--ckpt", tmp_path / "t", "--n", "2", "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(ddim, 3 steps)" in r.stdout + r.stderr
    model = _exported_unet(tmp_path / "m.safetensors")
    meta = json.loads(model.with_suffix(".json").read_text())
    meta["schedule"] = {"num_train_timesteps": 10}
    model.with_suffix(".json").write_text(json.dumps(meta))
    r = _cli("sample", "--model", model, "--n", "2", "--out", tmp_path / "b.png")
    _usage_error(r, "--steps:", "the model's default of 50 sampling steps", "10 training timesteps", "pass --steps")
    r = _cli("sample", "--model", model, "--n", "2", "--steps", "10", "--out", tmp_path / "b.png")
    assert r.returncode == 0, r.stderr[-2000:]


def test_argparse_errors_are_one_line():
    # a value of the wrong type, an unknown choice or flag: argparse printed its usage block (19 lines for
    # train) above the error; now the one error line, exit 2, as every other mistake
    for args, must in [(("train", "--steps", "nan"), "argument --steps: invalid int value: 'nan'"),
                       (("train", "--image-size", "8.5"), "argument --image-size: invalid int value"),
                       (("sample", "--sampler", "x"), "argument --sampler: invalid choice: 'x'"),
                       (("train", "--bogus", "1"), "unrecognized arguments: --bogus 1"),
                       (("bogus",), "invalid choice: 'bogus'")]:
        r = _cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(("fastddpm: error: ", f"fastddpm {args[0]}: error: ")), lines[0]
        assert must in lines[0] and "--help" in lines[0], lines[0]
        _quick(r)


def test_damaged_checkpoints_and_exports_are_one_line(tmp_path):
    """Checkpoints whose state.json lost its step, weights of another network under a valid checksum, an
    exported .safetensors beside another export's .json, and an export whose .json name is a folder: each was a
    KeyError or load_state_dict traceback (or named a temporary file); now one line naming the file."""
    import hashlib
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    def train(out, *extra):
        r = _cli("train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--steps", "2",
                 "--sample-every", "0", "--no-progress", "--out", out, *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        return out / "checkpoints" / "step-00000002"

    ck = train(tmp_path / "run")
    nostep, foreign = tmp_path / "nostep", tmp_path / "foreign"
    shutil.copytree(ck, nostep)
    state = json.loads((nostep / "state.json").read_text())
    del state["step"]
    (nostep / "state.json").write_text(json.dumps(state))
    for args in (("train", "--resume", nostep, "--steps", "4", "--out", tmp_path / "o1"),
                 ("export", "--ckpt", nostep, "--out", tmp_path / "e.safetensors")):
        _usage_error(_cli(*args), "state.json holds no step")
    shutil.copytree(ck, foreign)
    save_file({"w": torch.zeros(3)}, str(foreign / "model.safetensors"))
    state = json.loads((foreign / "state.json").read_text())
    state["files"]["model.safetensors"] = hashlib.sha256((foreign / "model.safetensors").read_bytes()).hexdigest()
    (foreign / "state.json").write_text(json.dumps(state))
    for args in (("train", "--resume", foreign, "--steps", "4", "--out", tmp_path / "o2"),
                 ("sample", "--ckpt", foreign, "--weights", "model", "--n", "2", "--out", tmp_path / "s.png")):
        _usage_error(_cli(*args), "model.safetensors does not hold the weights of the network")

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _cli("export", "--ckpt", ck, "--out", a).returncode == 0
    ck_b = train(tmp_path / "run_b", "--unet", '{"base_channels": 8}')
    assert _cli("export", "--ckpt", ck_b, "--out", b).returncode == 0
    shutil.copy(tmp_path / "b.json", tmp_path / "a.json")
    _usage_error(_cli("sample", "--model", a, "--n", "2", "--out", tmp_path / "s.png"),
                 "a.safetensors: the weights are not those of the network", "a.json describes")
    (tmp_path / "c.json").mkdir()
    r = _cli("export", "--ckpt", ck, "--out", tmp_path / "c.safetensors")
    _usage_error(r, "--out (its .json):", "is a folder")
    assert not (tmp_path / "c.safetensors").exists() and not list(tmp_path.glob(".tmp-*"))


def test_damaged_state_tables_run_folders_and_model_files_are_one_line(tmp_path):
    """A state.json that kept its format tag, step and network but lost a table (config, rng, optimizer, files)
    or part of one, a run folder that saved no checkpoint (taken for a diffusers folder: "'NoneType' object is
    not iterable"), and a --model .json that is a list or not JSON: each was a traceback or a message naming
    nothing; now one line naming the file or flag."""
    import json
    import shutil

    r = _cli("train", "--data", "digits", "--model", "tiny", "--image-size", "8", "--steps", "2",
             "--sample-every", "0", "--no-progress", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    damage = {"config": lambda s: s.pop("config"), "rng": lambda s: s.pop("rng"),
              "optimizer": lambda s: s.pop("optimizer"), "files": lambda s: s.pop("files"),
              "rng.torch": lambda s: s["rng"].pop("torch"),
              "optimizer.param_groups": lambda s: s["optimizer"].pop("param_groups")}
    expect = {"config": "state.json holds no config table", "rng": "state.json holds no rng table",
              "optimizer": "state.json holds no optimizer table", "files": "state.json holds no files table",
              "rng.torch": "state.json's rng table is damaged",
              "optimizer.param_groups": "state.json's optimizer table is damaged"}
    for i, (what, hurt) in enumerate(damage.items()):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(ck, bad)
        state = json.loads((bad / "state.json").read_text())
        hurt(state)
        (bad / "state.json").write_text(json.dumps(state))
        _usage_error(_cli("train", "--resume", bad, "--steps", "4", "--out", tmp_path / f"o{i}", "--no-progress"),
                     f"checkpoint {bad}", expect[what])

    unsaved = tmp_path / "unsaved"  # what a run that stopped before its first checkpoint leaves
    unsaved.mkdir()
    shutil.copy(tmp_path / "run" / "config.json", unsaved / "config.json")
    shutil.copy(tmp_path / "run" / "train.log", unsaved / "train.log")
    for cmd in (("sample", "--n", "2", "--out", tmp_path / "s.png"), ("eval", "--n", "4")):
        _usage_error(_cli(*cmd[:1], "--ckpt", unsaved, *cmd[1:]), f"--ckpt: '{unsaved}' is a training run that "
                     "has saved no checkpoint")

    for text, want in (("[1, 2]", "expected a JSON object of UNetConfig fields, got a list"),
                       ("{not json", "is not a JSON file of UNetConfig fields"),
                       ('{"bogus": 1}', "--model " + str(tmp_path / "m.json") + ": UNetConfig: unknown keys")):
        (tmp_path / "m.json").write_text(text)
        _usage_error(_cli("train", "--model", tmp_path / "m.json", "--image-size", "8", "--steps", "1",
                          "--sample-every", "0", "--no-progress", "--out", tmp_path / "om"), want)


def _in_process(capsys, *argv):
    """main() in this process (faster than a subprocess), with _usage_error's result shape."""
    import types

    from fastddpm.cli import main

    t0 = time.perf_counter()
    rc = main([str(a) for a in argv])
    r = types.SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err, seconds=time.perf_counter() - t0)
    return r


def test_more_mistakes_are_named_before_the_work(tmp_path, capsys):
    """Each was found late, named no flag or file, or was a traceback (a review of the command line):
    --png-dir over --out (found after sampling, as "File exists"), --n images that cannot fit in memory with
    --npz (ran until killed), --workers beyond the machine, an object array in an .npz, an exported .json's
    steps or schedule of the wrong type, the schedule's Python names for the train flags, demo's range and
    backend, and --model / --ckpt given a path of the other kind."""
    import json
    import shutil

    import numpy as np

    def check(argv, *text):
        r = _in_process(capsys, *argv)
        _usage_error(r, *text)
        _quick(r)

    check(LONG + ["--out", tmp_path / "x.png", "--png-dir", tmp_path / "x.png"],
          f"--png-dir: '{tmp_path / 'x.png'}' would write over --out")
    check(LONG + ["--out", tmp_path / "p" / "000001.png", "--png-dir", tmp_path / "p"], "would write over --out")
    check(["sample", "--n", str(10**12), "--steps", "1", "--no-progress", "--npz", tmp_path / "h.npz"],
          f"--n: {10**12} images of 1x16x16 are held in memory until written", "GiB is available; lower --n")
    assert not (tmp_path / "h.npz").exists()
    check(TRAIN_TINY + ["--steps", "1", "--workers", str(4 * (os.cpu_count() or 1) + 1), "--out", tmp_path / "w"],
          "--workers: expected 0 (decode in the training process) up to")
    np.savez(tmp_path / "obj.npz", images=np.array([1, "x", None], dtype=object))
    check(["train", "--data", tmp_path / "obj.npz", "--model", "tiny", "--image-size", "8", "--steps", "1",
           "--sample-every", "0", "--no-progress", "--out", tmp_path / "o"],
          f"data: {tmp_path / 'obj.npz'}: the array 'images' cannot be read as images")
    check(TRAIN_TINY + ["--steps", "1", "--beta-schedule", "cosine", "--out", tmp_path / "b"],
          "--beta-schedule: expected one of linear")
    check(TRAIN_TINY + ["--steps", "1", "--num-train-timesteps", "20000", "--out", tmp_path / "u"],
          "--num-train-timesteps/--beta-start/--beta-end: alphas_cumprod underflows float32")

    base = "digits"  # the built-in model's files, copied with one field damaged
    src = os.path.join(os.path.dirname(__import__("fastddpm").__file__), "assets", base)
    meta = json.loads(open(src + ".json").read())
    for i, (key, value, text) in enumerate([
            ("steps", "50", "steps: expected the model's default number of sampling steps"),
            ("schedule", {"num_train_timesteps": "abc"},
             "schedule.num_train_timesteps: expected an integer, got 'abc'"),
            ("schedule", {"beta_start": "0.1"}, "schedule.beta_start: expected a number, got '0.1'")]):
        shutil.copy(src + ".safetensors", tmp_path / f"m{i}.safetensors")
        (tmp_path / f"m{i}.json").write_text(json.dumps({**meta, key: value}))
        check(["sample", "--model", tmp_path / f"m{i}.safetensors", "--n", "2", "--out", tmp_path / "s.png"],
              f"m{i}.json: {text}")

    check(["demo", "--timesteps", "0,5000", "--out", tmp_path / "d.png"],
          "--timesteps: expected timesteps in [0, 1000)")
    check(["demo", "--backend", "foo", "--out", tmp_path / "d.png"], "--backend: expected one of auto")
    check(["demo", "--image-size", "100000", "--out", tmp_path / "d.png"], "--image-size: expected 8 to 1024")
    (tmp_path / "notes.txt").write_text("x")
    check(["sample", "--model", tmp_path / "notes.txt", "--n", "2", "--out", tmp_path / "s.png"],
          "is not an exported model", "is --ckpt")
    check(["sample", "--ckpt", tmp_path / "m0.safetensors", "--n", "2", "--out", tmp_path / "s.png"],
          "is a file; expected a training run, checkpoint or diffusers folder (an exported model is --model)")


def test_eval_json_never_replaces_a_file_of_the_model(tmp_path, capsys):
    """--json over a checkpoint's state.json (or a run's config.json, or the built-in model's description)
    wrote the result there, exit 0, and the model no longer loaded."""
    from fastddpm.pretrained import ASSETS

    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    (tmp_path / "run" / "config.json").write_text("{}")
    builtin = os.path.join(ASSETS, "digits.json")
    before = open(builtin, "rb").read()
    for argv, text in [(["--ckpt", ck, "--json", tmp_path / "run" / "config.json"],
                        f"--json: '{tmp_path / 'run' / 'config.json'}' is a file of the training run of --ckpt"),
                       (["--ckpt", tmp_path / "run", "--json", ck / "state.json"],
                        f"--json: '{ck / 'state.json'}' is a file of the --ckpt folder"),
                       (["--json", builtin], "is a file of the built-in models: writing it would destroy the input"),
                       (["--model", "digits", "--json", builtin], "is a file of the built-in models")]:
        _usage_error(_in_process(capsys, "eval", *argv), text)
    assert open(builtin, "rb").read() == before and (ck / "state.json").read_text() == "{}"
    # a new file beside the run, or an earlier result, is no input: the check lets them through (the fake
    # checkpoint then fails to load, naming itself)
    (tmp_path / "run" / "old.json").write_text('{"fd": 1.0, "confidence": 0.5}')
    for out in ("new.json", "old.json"):
        r = _in_process(capsys, "eval", "--ckpt", ck, "--json", tmp_path / "run" / out)
        assert r.returncode == 2 and "--json" not in r.stderr and "checkpoint" in r.stderr, r.stderr


def test_eval_train_classifier_refuses_the_options_it_ignores(tmp_path, capsys, monkeypatch):
    """--train-classifier returned before any other option was read: --seed 7 trained with seed 0, --json was
    never written, --n 0 and a corrupt --npz passed (exit 0)."""
    from fastddpm.eval import metrics

    out = tmp_path / "c.safetensors"
    for argv, text in [(["--n", "0"], "--n: not used with --train-classifier"),
                       (["--json", tmp_path / "r.json", "--steps", "-4"],
                        "--steps, --json: not used with --train-classifier")]:
        _usage_error(_in_process(capsys, "eval", "--train-classifier", out, *argv), text)
    seeds = []
    monkeypatch.setattr(metrics, "train_classifier", lambda seed=0, log=print: seeds.append(seed) or (None, 0.9))
    monkeypatch.setattr(metrics, "save_classifier", lambda model, path: None)
    assert _in_process(capsys, "eval", "--train-classifier", out, "--seed", "7").returncode == 0
    assert seeds == [7]


def test_sampled_nan_images_are_refused_not_written_black(tmp_path, capsys):
    """A model whose output is NaN: `sample --npz` wrote black images (NaN cast to uint8 is 0), exit 0, and
    `eval` scored them (FD 2235), or failed in scipy ("Internal error in scipy.linalg.sqrtm: -102")."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from fastddpm.pretrained import ASSETS

    sd = load_file(os.path.join(ASSETS, "digits.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if "out" in k else v for k, v in sd.items()},
              tmp_path / "nan.safetensors", metadata={"format": "fastddpm-model"})
    shutil.copy(os.path.join(ASSETS, "digits.json"), tmp_path / "nan.json")
    for cmd, argv in (("sample", ["--npz", tmp_path / "s.npz", "--out", tmp_path / "s.png"]), ("eval", [])):
        r = _in_process(capsys, cmd, "--model", tmp_path / "nan.safetensors", "--n", "2", "--steps", "2", *argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # (after the sampling's progress bar)
        assert f"fastddpm {cmd}: error: {tmp_path / 'nan.safetensors'}: the images of batch 0 hold NaN or inf" \
            in r.stderr, r.stderr
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()
