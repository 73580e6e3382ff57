"""Files written by fastddpm honour the umask (as open() would) and are still written atomically."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from fastddpm import _io
from fastddpm.cli import main


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(m):
        os.umask(m)

    yield set_
    os.umask(old)


def _modes(root) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_path_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    assert _io.umask() == mask
    ref = tmp_path / "plain.txt"
    with open(ref, "w") as f:  # the independent answer: what open() gives under this umask
        f.write("x")
    p = tmp_path / "a.bin"
    with _io.atomic_path(p) as tmp, open(tmp, "wb") as f:
        f.write(b"data")
    assert p.read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(p).st_mode) == stat.S_IMODE(os.stat(ref).st_mode) == 0o666 & ~mask
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "keep.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), _io.atomic_path(p) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed half-way")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_training_run_and_samples_are_0644_under_umask_022(tmp_path, umask):
    umask(0o022)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--image-size", "8", "--batch-size", "4", "--steps", "2",
                 "--sample-every", "2", "--sample-n", "2", "--sample-steps", "2", "--save-every", "1",
                 "--no-progress", "--out", str(out)]) == 0
    s = tmp_path / "s"
    assert main(["sample", "--ckpt", str(out), "--n", "2", "--steps", "1", "--no-progress",
                 "--out", str(s / "g.png"), "--npz", str(s / "g.npz"), "--png-dir", str(s / "each")]) == 0
    assert main(["export", "--ckpt", str(out), "--out", str(s / "m.safetensors")]) == 0
    modes = {**_modes(out), **{"s/" + k: v for k, v in _modes(s).items()}}
    files = {k: v for k, v in modes.items() if not os.path.isdir(os.path.join(tmp_path, k) if k.startswith("s/")
                                                                     else os.path.join(out, k))}
    # What was written: checkpoints (weights, state.json, the latest pointer), metrics, config, samples,
    # the loss plot, the sampled grid/npz/PNGs and the exported model.
    for must in ("checkpoints/latest", "checkpoints/step-00000002/state.json",
                 "checkpoints/step-00000002/model.safetensors", "config.json", "metrics.csv", "loss.png",
                 "samples/step-00000002.png", "s/g.png", "s/g.npz", "s/each/000000.png", "s/m.safetensors",
                 "s/m.json"):
        assert must in files, must
    assert {k: oct(v) for k, v in files.items() if v != 0o644} == {}
    dirs = {k: v for k, v in modes.items() if k not in files}
    assert "checkpoints/step-00000002" in dirs
    assert {k: oct(v) for k, v in dirs.items() if v != 0o755} == {}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_scheduler_and_pipeline_files_follow_umask(tmp_path, umask, mask):
    # scheduler_config.json, model_index.json and the UNet's config.json go through the same atomic writer.
    umask(mask)
    ref = tmp_path / "plain.txt"
    ref.write_text("x")
    want = stat.S_IMODE(os.stat(ref).st_mode)
    from fastddpm import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet
    from fastddpm.models.unet import UNetConfig

    DDPMScheduler().save_config(tmp_path / "ddpm")
    DDIMScheduler().save_config(tmp_path / "ddim")
    cfg = UNetConfig(sample_size=8, base_channels=32, channel_mult=(1,), layers_per_block=1, attention_resolutions=())
    DDPMPipeline(UNet(cfg), DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    files = {k: v for k, v in _modes(tmp_path).items() if k.endswith(".json")}
    assert {"ddpm/scheduler_config.json", "ddim/scheduler_config.json", "pipe/model_index.json",
            "pipe/scheduler/scheduler_config.json"} <= set(files)
    assert all(m == want for m in files.values()), files
