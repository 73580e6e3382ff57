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


def test_frechet_distance_against_scipy_float64():
    """A ridge inside sqrtm alone biased the distance by -2 D 1e-6: identical sets gave -0.000128 and small
    features were off by 20%. Against the plain float64 formula (scipy's sqrtm, no ridge), at every scale."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(200, 16)) * 1.3 + 0.2

    def reference(x, y):
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        return ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)

    for scale in (1.0, 1e-2, 1e-3):
        assert frechet_distance(a * scale, b * scale) == pytest.approx(reference(a * scale, b * scale), rel=1e-5)
        assert frechet_distance(a * scale, a * scale) == pytest.approx(0.0, abs=1e-12 * scale**2)
        assert frechet_distance(a * scale, a * scale) >= 0
    dead = np.concatenate([a, np.zeros((300, 4))], 1)  # dead units: a singular covariance
    assert frechet_distance(dead, dead) == pytest.approx(0.0, abs=1e-9)
    for x, y, text in [(a[:1], b, "a: expected a numpy array (N, D) of finite features, N >= 2, got shape (1, 16)"),
                       (a, b[:, :8], "a, b: expected features of the same width D, got 16 and 8"),
                       (a[:, 0], b, "a: expected a numpy array"), (a, np.full_like(b, np.nan), "with NaN or inf")]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
            frechet_distance(x, y)


def test_evaluate_refuses_images_outside_its_range():
    """uint8 digits scored an FD of 3e7, NaN images failed in scipy, a numpy array had no .dim."""
    from fastddpm.eval.metrics import evaluate
    from fastddpm.train.data import digits_split

    x, _ = digits_split("test", 16)
    x = x[:4]
    for bad, err, text in [(((x + 1) * 127.5).to(torch.uint8), TypeError, "got a torch.uint8 tensor"),
                           ((x + 1) * 127.5, ValueError, "expected finite values in [-1, 1], got values in [0, 255]"),
                           (x.clone().fill_(float("nan")), ValueError, "expected finite values in [-1, 1]"),
                           (x.numpy(), TypeError, "got ndarray")]:
        with pytest.raises(err, match=text.replace("[", r"\[").replace("]", r"\]")):
            evaluate(bad)


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


# ----------------------------------------------------------------------------- mistakes found by probing the CLI
def _one_line_error(capsys, *must: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("fastddpm ")]
    assert len(lines) == 1, err
    for s in must:
        assert s in lines[0], (s, lines[0])
    return lines[0]


def test_diffusers_folder_with_a_broken_bin_is_one_line(tmp_path, capsys):
    """A half-downloaded diffusion_pytorch_model.bin ended in torch.load's traceback (exit 1)."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    whole = weights.read_bytes()
    for content in (whole[: len(whole) // 2], b"", b"not a torch file at all"):
        weights.write_bytes(content)
        assert main(["sample", "--ckpt", str(tmp_path / "unet"), "--n", "1", "--steps", "1", "--no-progress",
                     "--out", str(tmp_path / "x.png")]) == 2
        _one_line_error(capsys, "diffusion_pytorch_model.bin: not a readable PyTorch weights file")
    torch.save([1, 2], weights)  # a readable file that is no state dict
    assert main(["sample", "--ckpt", str(tmp_path / "unet"), "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "x.png")]) == 2
    _one_line_error(capsys, "expected a state dict (names to tensors), got list")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("flag", ["--model", "--ckpt", "--npz", "--classifier", "--json", "--train-classifier"])
def test_eval_refuses_an_empty_path(flag, capsys):
    """An unset shell variable (--npz "$FILE") fell back to the default: the built-in model was scored instead."""
    assert main(["eval", flag, "", "--n", "2"]) == 2
    _one_line_error(capsys, f"{flag}: expected a path, got ''")


def test_export_refuses_to_write_over_its_input(run_dir, tmp_path, capsys):
    """export --out inside the checkpoint folder overwrote model.safetensors (the checkpoint then failed its
    checksum); its .json could overwrite state.json or the run's config.json."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    ck = pretrained.load(ckpt=str(run)).source
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for out in (os.path.join(ck, "model.safetensors"), os.path.join(ck, "state.safetensors"),
                os.path.join(ck, "new.safetensors"), run / "config.safetensors"):
        assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 2
        _one_line_error(capsys, "--out: ", "writing it would destroy the input")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a new file in the run folder is fine, and so is replacing that export later (it is no input)
    for _ in range(2):
        assert main(["export", "--ckpt", str(run), "--out", str(run / "model.safetensors")]) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert main(["sample", "--model", str(run / "model.safetensors"), "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "t.png")]) == 0
    # another checkpoint of the run is guarded as well: exporting one over another destroyed it
    other = ck.rsplit("step-", 1)[0] + "step-99999999"
    os.makedirs(other)
    assert main(["export", "--ckpt", ck, "--out", os.path.join(other, "model.safetensors")]) == 2
    _one_line_error(capsys, "--out: ", "among the run's checkpoints")


def test_export_full_disk_is_one_line_and_leaves_nothing(run_dir, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "m.safetensors")]) == 2
    _one_line_error(capsys, "m.safetensors: cannot write the exported model", "StorageFull")
    assert os.listdir(tmp_path) == []


def test_export_name_in_capitals_is_read_back(run_dir, tmp_path):
    """export wrote E.SAFETENSORS (the output check reads extensions in any case); sample --model refused it."""
    out = tmp_path / "E.SAFETENSORS"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out)]) == 0
    assert (tmp_path / "E.json").is_file()
    assert main(["sample", "--model", str(out), "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_export_of_a_checkpoint_without_a_schedule_entry(run_dir, tmp_path):
    """state.json without "schedule" (sample reads it with the default schedule) made export fail (KeyError)."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    ck = pretrained.load(ckpt=str(run)).source
    state = json.loads(open(os.path.join(ck, "state.json")).read())
    written = state.pop("schedule")
    with open(os.path.join(ck, "state.json"), "w") as f:
        json.dump(state, f)
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["schedule"] == {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                                "beta_end": 0.02}
    assert meta["schedule"] == written  # (this run trained with the default schedule: the same)


def test_a_missing_latest_checkpoint_names_the_flag(run_dir, tmp_path, capsys):
    """The error named the step folder read from checkpoints/latest instead of --ckpt."""
    import shutil

    run = tmp_path / "c"
    shutil.copytree(run_dir, run)
    for d in (run / "checkpoints").iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    assert main(["sample", "--ckpt", str(run), "--n", "1"]) == 2
    line = _one_line_error(capsys, "--ckpt: no fastddpm training checkpoint in")
    assert line.startswith("fastddpm sample: error: --ckpt: "), line


def test_png_dir_of_an_earlier_run_is_refused(tmp_path, capsys):
    """A second run into the same --png-dir overwrote some images and left the rest of the first run's."""
    pd = tmp_path / "pd"
    assert main(["sample", "--model", "digits", "--n", "4", "--steps", "1", "--png-dir", str(pd),
                 "--no-progress"]) == 0
    first = {p.name: p.read_bytes() for p in pd.iterdir()}
    assert sorted(first) == [f"{i:06d}.png" for i in range(4)]
    assert main(["sample", "--model", "digits", "--n", "2", "--steps", "1", "--png-dir", str(pd), "--seed", "3",
                 "--no-progress"]) == 2
    _one_line_error(capsys, "--png-dir: ", "already holds 4 numbered images")
    assert {p.name: p.read_bytes() for p in pd.iterdir()} == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    assert main(["sample", "--model", "digits", "--n", "2", "--steps", "1", "--png-dir", str(tmp_path / "other"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["000000.png", "000001.png", "notes.txt"]


def test_a_write_error_leaves_no_output_at_all(tmp_path, capsys, monkeypatch):
    """A full disk while writing the PNGs left the grid, the .npz and part of the PNG set, with a message naming
    no file."""
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    out, npz, pd = tmp_path / "g.png", tmp_path / "g.npz", tmp_path / "pd"
    assert main(["sample", "--model", "digits", "--n", "6", "--steps", "1", "--out", str(out), "--npz", str(npz),
                 "--png-dir", str(pd), "--no-progress"]) == 2
    _one_line_error(capsys, f"cannot write {out}, {npz}, {pd}/", "No space left on device", "none of them")
    assert len(calls) == 4 and os.listdir(tmp_path) == []


def test_outputs_move_into_place_only_once_all_are_on_disk(tmp_path, capsys, monkeypatch):
    """The renames come after every file is flushed: a flush that fails (a quota, NFS) leaves no output,
    where the PNGs used to be in place before the .npz and the grid were written."""
    import fastddpm._io as io

    real = io._sync_file
    calls = []

    def sync(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(122, "Disk quota exceeded")
        real(path)

    monkeypatch.setattr(io, "_sync_file", sync)
    out, npz, pd = tmp_path / "g.png", tmp_path / "g.npz", tmp_path / "pd"
    pd.mkdir()  # an existing (empty) folder: the PNGs are staged inside it
    assert main(["sample", "--model", "digits", "--n", "3", "--steps", "1", "--out", str(out), "--npz", str(npz),
                 "--png-dir", str(pd), "--no-progress"]) == 2
    _one_line_error(capsys, "Disk quota exceeded")
    assert len(calls) == 3 and sorted(os.listdir(tmp_path)) == ["pd"] and os.listdir(pd) == []
    monkeypatch.setattr(io, "_sync_file", real)
    assert main(["sample", "--model", "digits", "--n", "3", "--steps", "1", "--out", str(out), "--npz", str(npz),
                 "--png-dir", str(pd), "--no-progress"]) == 0
    assert sorted(os.listdir(pd)) == ["000000.png", "000001.png", "000002.png"] and out.is_file() and npz.is_file()
    assert oct(os.stat(pd / "000000.png").st_mode & 0o777) == oct(0o666 & ~io.umask())


def test_demo_refuses_a_strip_larger_than_pil_opens(tmp_path, capsys):
    from PIL import Image as PILImage

    from fastddpm.demo import strip_size

    ts = ",".join(str(t) for t in range(1000))
    w, h = strip_size(1000, 512)
    assert w * h > 2 * PILImage.MAX_IMAGE_PIXELS
    assert main(["demo", "--image-size", "512", "--timesteps", ts, "--out", str(tmp_path / "big.png")]) == 2
    _one_line_error(capsys, "--timesteps: a strip of 1000 images of 512 pixels", "more than PIL opens")
    assert os.listdir(tmp_path) == []
    assert main(["demo", "--out", str(tmp_path / "d.png")]) == 0
    with PILImage.open(tmp_path / "d.png") as im:
        assert im.size == strip_size(8, 32)


def test_torchrun_variables_that_are_not_integers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert main(["sample", "--model", "digits", "--n", "1", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 2
    _one_line_error(capsys, "WORLD_SIZE: expected a non-negative integer in the environment variable, got 'abc'")


def test_python_export_of_dpmpp_steps_that_sampling_would_refuse(run_dir, tmp_path):
    """DPM-Solver++'s spacing repeats a timestep beyond T - 1 steps: such a default was exported and then
    failed at sampling."""
    with pytest.raises(ValueError, match=r"steps: .* 1 to 999 \(DPM-Solver\+\+: fewer than its 1000\)"):
        pretrained.export(str(run_dir), str(tmp_path / "m.safetensors"), sampler="dpm++2m", steps=1000)
    assert pretrained.export(str(run_dir), str(tmp_path / "m.safetensors"), sampler="dpm++2m", steps=999)
    assert pretrained.load(model=str(tmp_path / "m.safetensors")).steps == 999
