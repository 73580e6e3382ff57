"""fastddpm train end to end through the command line (tiny model, 8x8 digits, a handful of steps).

Independent checks: resumed and killed runs are compared bitwise with runs that never stopped; the
2-process gloo run is compared with a 1-process run of the same global batch; files are read back with
PIL / safetensors / csv, not with the code that wrote them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _utils import repo_env
from PIL import Image
from safetensors.torch import load_file

from fastddpm.cli import main
from fastddpm.train import TrainConfig, load_dataset
from fastddpm.train import checkpoint as ck
from fastddpm.train.data import batch_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny 8x8 model on the digits, with dropout and flips on so that every source of randomness is exercised.
PLAIN = ["train", "--model", "tiny", "--image-size", "8", "--batch-size", "8", "--sample-every", "0",
         "--no-progress", "--threads", "1"]
BASE = PLAIN + ["--unet", '{"dropout": 0.1}', "--flip", "--lr", "1e-3", "--warmup", "2"]


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on 2 shared cores two threads are several times slower, and the subprocesses
    # compared bitwise with in-process runs use the same count.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(out, *extra):
    return main(BASE + ["--out", str(out), *extra])


def _latest(out) -> tuple[int, str]:
    path = ck.resolve(str(out))
    return ck.read_state(path)["step"], path


def _assert_same_checkpoint(a: str, b: str) -> None:
    for fn in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(os.path.join(a, fn)), load_file(os.path.join(b, fn))
        assert ta.keys() == tb.keys(), fn
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{fn}: {k} differs"


def _spawn(out, *extra, new_session: bool = False):
    cmd = [sys.executable, "-m", "fastddpm"] + BASE + ["--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)


def _wait_for_metrics(proc, out, timeout: float = 120) -> None:
    """Until the loop runs (a metrics row is written every 10 steps)."""
    deadline = time.time() + timeout
    while not (out / "metrics.csv").exists() or os.path.getsize(out / "metrics.csv") < 60:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training too slow to start"
        time.sleep(0.05)


def _wait_for_checkpoint(proc, out, min_step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            step, _ = _latest(out)
            if step >= min_step:
                return step
        except ck.CheckpointError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared in time")


def test_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    rc = main(PLAIN + ["--out", str(out), "--steps", "4", "--save-every", "2", "--sample-every", "4",
                       "--sample-n", "4", "--sample-steps", "2", "--log-every", "2"])
    assert rc == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(np.isfinite(float(r["loss"])) and float(r["it_per_s"]) > 0 for r in rows)
    for png in ("loss.png", "samples/step-00000004.png"):
        with Image.open(out / png) as im:
            im.verify()
    step, path = _latest(out)
    assert step == 4 and path.endswith("step-00000004")
    meta = ck.read_state(path)
    assert meta["config"]["steps"] == 4 and meta["unet_config"]["sample_size"] == 8
    assert set(meta["rng"]) == {"torch", "numpy", "python", "cuda"}
    assert json.loads((out / "config.json").read_text())["model"] == "tiny"


def test_resume_is_bitwise_identical(tmp_path):
    assert _run(tmp_path / "a", "--steps", "6", "--save-every", "3") == 0
    assert _run(tmp_path / "b", "--steps", "3", "--save-every", "3") == 0
    assert _latest(tmp_path / "b")[0] == 3
    # "latest" resumes the run under --out; --steps raises the total.
    assert main(["train", "--resume", "latest", "--out", str(tmp_path / "b"), "--steps", "6"]) == 0
    sa, pa = _latest(tmp_path / "a")
    sb, pb = _latest(tmp_path / "b")
    assert sa == sb == 6
    _assert_same_checkpoint(pa, pb)
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 6]


def test_resume_latest_starts_a_new_run_where_there_is_no_checkpoint(tmp_path, capsys):
    """One command starts a run and, rerun after an interruption, resumes it: with no checkpoint under --out
    (no folder, or only the hidden folder of a save that was interrupted) --resume latest starts there, and
    the result is bitwise the run started without it. A damaged run is not silently started over."""
    assert _run(tmp_path / "plain", "--steps", "2") == 0
    assert _run(tmp_path / "r", "--steps", "2", "--resume", "latest") == 0
    assert "no checkpoint under" in capsys.readouterr().err
    _assert_same_checkpoint(_latest(tmp_path / "plain")[1], _latest(tmp_path / "r")[1])
    assert _run(tmp_path / "r", "--steps", "3", "--resume", "latest") == 0  # the same command resumes
    assert "resuming from" in capsys.readouterr().err and _latest(tmp_path / "r")[0] == 3
    (tmp_path / "i" / "checkpoints" / ".tmp-abc").mkdir(parents=True)  # killed during its first save
    assert _run(tmp_path / "i", "--steps", "1", "--resume", "latest") == 0
    assert _latest(tmp_path / "i")[0] == 1
    (tmp_path / "d" / "checkpoints" / "step-00000005").mkdir(parents=True)  # a step folder without state.json
    assert _run(tmp_path / "d", "--steps", "1", "--resume", "latest") == 2
    assert f"--out: no fastddpm training checkpoint in '{tmp_path / 'd'}'" in capsys.readouterr().err  # (named)
    assert os.listdir(tmp_path / "d" / "checkpoints") == ["step-00000005"]


def test_auto_device_refuses_a_process_without_a_gpu(monkeypatch):
    """torchrun with more processes than GPUs: --device auto would hand process 1 a cuda:1 that does not exist
    (a CUDA error deep in the first step); it is refused up front, naming the fix."""
    from fastddpm.train.loop import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto", 0) == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 .*cuda:1.* 1 GPU\(s\) are visible.*--device cpu"):
        pick_device("auto", 1)


def test_resume_refuses_changing_the_run(tmp_path, capsys):
    assert _run(tmp_path / "a", "--steps", "1") == 0
    rc = main(["train", "--resume", str(tmp_path / "a"), "--batch-size", "16", "--steps", "2"])
    assert rc == 2 and "--batch-size" in capsys.readouterr().err
    # what the run worked out for itself is no change: the data's size (8x8 digits) where no --image-size
    # was given, and --unet fields equal to its network's (both were refused as changes)
    i = PLAIN.index("--image-size")
    plain = PLAIN[:i] + PLAIN[i + 2:]
    np.save(tmp_path / "d.npy", np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8))
    assert main(plain + ["--data", str(tmp_path / "d.npy"), "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    for i, (extra, ok) in enumerate([(["--image-size", "8"], True), (["--unet", '{"sample_size": 8}'], True),
                                     (["--image-size", "16"], False), (["--unet", '{"base_channels": 32}'], False)]):
        rc = main(["train", "--resume", str(tmp_path / "b"), "--steps", str(2 + i), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc == (0 if ok else 2), (extra, err)
        if not ok:
            assert f"{extra[0]}: the run being resumed used" in err, err


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    out = tmp_path / "k"
    proc = _spawn(out, "--steps", "100000", "--save-every", "2", "--keep", "3")
    try:
        _wait_for_checkpoint(proc, out, 4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step, path = _latest(out)  # loadable: checksums verified
    assert step >= 4 and step % 2 == 0
    assert not [n for n in os.listdir(out / "checkpoints") if not n.startswith((".tmp-", "step-", "latest"))]
    total = step + 2
    assert main(["train", "--resume", str(out), "--steps", str(total), "--no-progress"]) == 0
    assert _run(tmp_path / "ref", "--steps", str(total), "--save-every", "0") == 0
    _assert_same_checkpoint(_latest(out)[1], _latest(tmp_path / "ref")[1])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "t"
    proc = _spawn(out, "--steps", "100000", "--save-every", "1000")
    try:
        _wait_for_metrics(proc, out)  # the loop runs; then ask it to stop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    step, _ = _latest(out)
    assert 10 <= step < 100000


def test_a_signal_during_the_preview_stops_it_at_once(tmp_path, monkeypatch, capsys):
    """The preview grid can take minutes (64 images of 32x32, 50 steps, on a CPU); a SIGINT or SIGTERM only set
    the flag read at the next training step, so the run ignored Ctrl-C until the grid was done. A stand-in for
    the sampler signals the process and then takes 200 sampling steps of 0.1 s, calling the sampler's callback
    after each as fastddpm.sample does: the preview must be cut short, and the run must stop, saved, at the end
    of the next training step."""
    import fastddpm.samplers

    calls = []

    def long_preview(*args, callback=None, **kwargs):
        calls.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)
        for i in range(200):
            time.sleep(0.1)
            if callback is not None:
                callback(i, 0, None)
        raise AssertionError("the preview was not interrupted")

    monkeypatch.setattr(fastddpm.samplers, "sample", long_preview)
    out = tmp_path / "p"
    t0 = time.monotonic()
    assert _run(out, "--steps", "50", "--sample-every", "3", "--save-every", "0") == 0
    err = capsys.readouterr().err
    assert len(calls) == 1 and time.monotonic() - t0 < 15, err
    assert "the preview of step 3 is cut short by SIGINT" in err and "stopped by SIGINT" in err
    assert _latest(out)[0] == 4  # the next step, saved as for a signal during a step


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    out = tmp_path / "c"
    assert _run(out, "--steps", "1") == 0
    _, path = _latest(out)
    model = os.path.join(path, "model.safetensors")
    data = open(model, "rb").read()
    with open(model, "wb") as f:
        f.write(data[: len(data) // 2])
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 2
    assert "model.safetensors is truncated or corrupt" in capsys.readouterr().err
    png = str(tmp_path / "x.png")
    assert main(["sample", "--ckpt", str(out), "--n", "1", "--steps", "1", "--out", png]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    with open(os.path.join(path, "state.json"), "w") as f:
        f.write('{"step": 1, "config"')
    assert main(["train", "--resume", str(path), "--steps", "2"]) == 2
    assert "state.json is truncated or not JSON" in capsys.readouterr().err
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"step": 1, "weights": "elsewhere"}, f)
    assert main(["train", "--resume", str(path), "--steps", "2"]) == 2
    assert "not a fastddpm training checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing-here"), "--steps", "2"]) == 2
    assert f"--resume: no such folder '{tmp_path / 'nothing-here'}'" in capsys.readouterr().err  # was "checkpoint:"


def _outputs_finite_on_random_input(ckpt_path: str) -> bool:
    """Load a checkpoint's model and EMA as a user would (fastddpm sample's loader) and run them on random
    input: the guard's own probe is not reused, so this is an independent check of usability."""
    from fastddpm import pretrained

    g = torch.Generator().manual_seed(1234)
    for weights in ("model", "ema"):
        lm = pretrained.load_training_checkpoint(ckpt_path, weights)
        C, H, W = lm.image_shape
        x = torch.randn((3, C, H, W), generator=g)
        t = torch.randint(0, lm.schedule.num_train_timesteps, (3,), generator=g)
        with torch.no_grad():
            if not torch.isfinite(lm.model(x, t)).all():
                return False
    return True


def test_nan_guard_huge_lr_keeps_no_broken_checkpoint(tmp_path, capsys):
    # The case: lr 1e12 makes the weights of step 1 finite (|w| near 1e12) but the outputs not.
    out = tmp_path / "n"
    rc = _run(out, "--steps", "50", "--save-every", "1", "--lr", "1e12", "--warmup", "0")
    err = capsys.readouterr().err
    assert rc == 1 and "NaN guard" in err and "Traceback" not in err
    assert err.count("NaN guard") == 1, err  # once on the screen (it was printed twice), and in train.log
    for _, path in ck.list_checkpoints(str(out / "checkpoints")):
        assert _outputs_finite_on_random_input(path), path
    assert "NaN guard" in (out / "train.log").read_text()


def test_nan_guard_non_finite_weights_keep_last_usable_checkpoint(tmp_path, capsys, monkeypatch):
    # Fault injection: after the 3rd optimiser step one weight becomes infinite (and the rest huge, as a
    # divergence leaves them). Step 3 must not be written; step 2 is kept and works.
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        r = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                ps = [p for g in self.param_groups for p in g["params"]]
                ps[0].view(-1)[0] = float("inf")
        return r

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "w"
    rc = _run(out, "--steps", "10", "--save-every", "1", "--keep", "10")
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "after step 3" in err and "not finite" in err and "kept checkpoint step-00000002" in err
    assert [s for s, _ in ck.list_checkpoints(str(out / "checkpoints"))] == [1, 2]
    step, path = _latest(out)
    assert step == 2 and _outputs_finite_on_random_input(path)
    assert "kept checkpoint step-00000002" in (out / "train.log").read_text()


def test_nan_guard_non_finite_gradient_stops_before_the_update(tmp_path, capsys, monkeypatch):
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, *a, **k):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 4:
            params[0].grad.view(-1)[0] = float("nan")
        return real_clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "g"
    rc = _run(out, "--steps", "10", "--save-every", "2")
    err = capsys.readouterr().err
    assert rc == 1 and "gradient norm is nan at step 4" in err and "kept checkpoint step-00000002" in err
    step, path = _latest(out)
    assert step == 2 and _outputs_finite_on_random_input(path)


def test_nan_guard_on_resume_keeps_the_resumed_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert _run(out, "--steps", "2") == 0
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, *a, **k):
        params = list(params)
        params[0].grad.view(-1)[0] = float("inf")
        return real_clip(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 1
    assert "kept checkpoint step-00000002" in capsys.readouterr().err
    assert _latest(out)[0] == 2


def test_amp_refused_on_cpu(tmp_path, capsys):
    assert _run(tmp_path / "amp", "--steps", "1", "--amp", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "--amp" in err and "SIGILL" in err
    assert not (tmp_path / "amp").exists()


def test_bad_data(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tmp_path / "o", "--data", str(empty), "--steps", "1") == 2
    assert "no PNG or JPEG images" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.random.randint(0, 255, (8, 8), dtype=np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert _run(tmp_path / "o", "--data", str(bad), "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err
    assert _run(tmp_path / "o", "--data", str(tmp_path / "missing"), "--steps", "1") == 2
    assert "no such file or folder" in capsys.readouterr().err
    # an array that is not images is named with the shape the file holds (a channels-last array with N = 0 is
    # transposed to (N, C, H, W) before the check: the message must not show that view)
    for shape in [(0, 8, 8, 3), (5, 8, 8, 2), (5, 8)]:
        np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
        assert _run(tmp_path / "o", "--data", str(tmp_path / "a.npy"), "--steps", "1") == 2
        err = capsys.readouterr().err
        assert f"got shape {shape}" in err and err.count("\n") == 1, err


def test_mixed_size_images_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(folder / "c.jpeg")
    x = load_dataset(str(folder), 8)
    assert x.shape == (3, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert _run(tmp_path / "o", "--data", str(folder), "--steps", "2") == 0
    arr = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "d.npy", arr)
    x = load_dataset(str(tmp_path / "d.npy"))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(arr).float() / 127.5 - 1)
    np.savez(tmp_path / "d.npz", images=arr[..., None].repeat(3, -1))
    assert load_dataset(str(tmp_path / "d.npz")).shape == (5, 3, 8, 8)


def _image_folder(folder, n=40, size=8, seed=0):
    """n lossless RGB PNGs already at the training size (so no resize): the same pixels as an .npy."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, a in enumerate(arr):
        sub = folder / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(sub / f"{i:05d}.png")
    # the folder's order: sorted paths
    order = sorted(range(n), key=lambda i: f"d{i % 3}/{i:05d}.png")
    return arr[order]


def test_streaming_folder_equals_the_same_images_in_memory(tmp_path):
    # Independent route: the same pixels written as an .npy go through the in-memory path; the streamed
    # folder (2 DataLoader workers decoding per item) must train to the bitwise-same checkpoint.
    arr = _image_folder(tmp_path / "imgs")
    np.save(tmp_path / "same.npy", arr)
    common = ["--steps", "4", "--batch-size", "8", "--save-every", "4"]
    assert _run(tmp_path / "a", "--data", str(tmp_path / "imgs"), "--workers", "2", *common) == 0
    assert _run(tmp_path / "b", "--data", str(tmp_path / "same.npy"), *common) == 0
    _assert_same_checkpoint(_latest(tmp_path / "a")[1], _latest(tmp_path / "b")[1])
    from fastddpm.train.data import ImageFolder

    ds = ImageFolder(str(tmp_path / "imgs"))
    assert ds.shape == (40, 3, 8, 8)
    torch.testing.assert_close(ds[5], torch.from_numpy(arr[5]).permute(2, 0, 1).float() / 127.5 - 1)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_decoding_workers_saves(tmp_path):
    """`timeout`, SLURM and systemd signal the whole process group: the DataLoader workers got SIGTERM too, died,
    and the trainer raised "DataLoader worker ... is killed by signal: Terminated" with no checkpoint. The
    workers leave the signal to the trainer, which ends its step, saves and exits 0; no worker outlives it."""
    _image_folder(tmp_path / "imgs", n=30)
    out = tmp_path / "g"
    proc = _spawn(out, "--data", str(tmp_path / "imgs"), "--workers", "2", "--steps", "100000", "--save-every",
                  "100000", new_session=True)
    try:
        _wait_for_metrics(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its workers, as `timeout` does
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    assert 10 <= _latest(out)[0] < 100000


def test_streaming_folder_resume_is_bitwise_identical(tmp_path):
    _image_folder(tmp_path / "imgs", n=30)
    data = ["--data", str(tmp_path / "imgs"), "--workers", "1", "--batch-size", "8"]
    assert _run(tmp_path / "ref", *data, "--steps", "6") == 0
    assert _run(tmp_path / "r", *data, "--steps", "3") == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "6", "--no-progress"]) == 0
    _assert_same_checkpoint(_latest(tmp_path / "r")[1], _latest(tmp_path / "ref")[1])


def test_streaming_folder_bad_image_in_a_worker_is_one_line(tmp_path, capsys):
    _image_folder(tmp_path / "imgs", n=10)
    ok = tmp_path / "imgs" / "d0" / "00000.png"
    data = ok.read_bytes()
    (tmp_path / "imgs" / "d2" / "zz-cut.png").write_bytes(data[: len(data) - 40])  # header fine, pixels cut
    rc = _run(tmp_path / "o", "--data", str(tmp_path / "imgs"), "--workers", "2", "--steps", "20",
              "--batch-size", "8")
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if "error" in ln][-1]
    assert "cannot read image" in line and "zz-cut.png" in line and "Traceback" not in err
    # The steps before the batch that holds the file are saved (they were lost): the file is first drawn at
    # step k of the run's batches (seed 0, the training's default) at its place among the 11 sorted paths.
    pos = sorted(str(p.relative_to(tmp_path / "imgs")) for p in (tmp_path / "imgs").rglob("*.png")).index(
        "d2/zz-cut.png")
    k = next(k for k in range(20) if pos in batch_indices(0, k, 8, 11).tolist())
    assert k > 0  # (steps to save: the case this checks)
    assert f"the last checkpoint is {tmp_path / 'o' / 'checkpoints' / f'step-{k:08d}'}" in line, line
    assert _latest(tmp_path / "o")[0] == k


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    """Two runs writing one --out both reported success; the checkpoints and metrics of one were overwritten
    by the other's, and train.log mixed both."""
    out = tmp_path / "busy"
    proc = _spawn(out, "--steps", "100000", "--save-every", "2")
    try:
        _wait_for_checkpoint(proc, out, 2)
        assert main(["train", "--resume", "latest", "--out", str(out), "--steps", "200000", "--no-progress"]) == 2
        assert "is in use by another training run" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    step = _latest(out)[0]
    assert main(["train", "--resume", "latest", "--out", str(out), "--steps", str(step + 1), "--no-progress"]) == 0


def test_image_folder_bomb_and_fifo(tmp_path, capsys, monkeypatch):
    """PIL's DecompressionBombError (a small file of a huge image) was a traceback: it is a ValueError naming
    the file. A FIFO named like an image blocked the header scan forever: it is not an image file, left out."""
    from PIL import Image as PILImage

    _image_folder(tmp_path / "imgs", n=6)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    assert _run(tmp_path / "o", "--data", str(tmp_path / "imgs"), "--steps", "1", "--batch-size", "2") == 0
    capsys.readouterr()
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 16)  # 8x8 = 64 pixels: over twice the limit, a "bomb"
    rc = _run(tmp_path / "b", "--data", str(tmp_path / "imgs"), "--steps", "1", "--batch-size", "2")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "cannot read image" in err and "decompression bomb" in err


def test_damaged_state_fields_are_checkpoint_errors(tmp_path, capsys):
    """Fields of state.json read without a check: a log_window of one number was an IndexError traceback, an
    ema_updates of "x" or a version of "x" a message naming nothing, an empty files table skipped every
    checksum, an ema_updates of -5 weighted the EMA by 1.8, and optimizer scalars that are no table an
    AttributeError traceback on resume."""
    import shutil

    assert _run(tmp_path / "run", "--steps", "2") == 0
    _, good = _latest(tmp_path / "run")
    cases = {"log_window": ([1.0], "log_window is not [loss sum, count, seconds]"),
             "ema_updates": ("x", "ema_updates is not an integer in [0, step]"),
             "version": ("x", "version is not an integer"),
             "files": ({}, "files table has no checksum of model.safetensors, ema.safetensors, optimizer"),
             "ema_updates ": (-5, "ema_updates is not an integer in [0, step] (-5)"),
             "log_window ": ([1.0, 2, -3.0], "log_window is not [loss sum, count, seconds]"),
             "elapsed_s": ("x", "elapsed_s is not a number of seconds ('x')"),
             "optimizer": ({"param_groups": [], "scalars": "x"}, "optimizer table's scalars are not a table")}
    for i, (key, (value, want)) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        state = json.loads((bad / "state.json").read_text())
        state[key.strip()] = value
        (bad / "state.json").write_text(json.dumps(state))
        with pytest.raises(ck.CheckpointError, match=f"checkpoint {bad}: state.json's .*" + want.replace("[", r"\[")
                           .replace("(", r"\(").replace(")", r"\)")):
            ck.read_state(str(bad))
    ck.read_state(good)  # the undamaged one reads
    bad = tmp_path / "badnet"  # a network state.json cannot build was worded as the user's --unet mistake
    shutil.copytree(tmp_path / "run", bad)
    state_file = bad / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["unet_config"]["base_channels"] = 7
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(BASE + ["--out", str(bad), "--steps", "3", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {state_file.parent}: state.json's unet_config does not build a network (norm_num_groups" in err
    assert err.count("\n") == 1, err


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_the_last_one(tmp_path, capsys, monkeypatch):
    """A full disk: safetensors' SafetensorError is no OSError, so it was a traceback, and the half-written
    .tmp- folder stayed on the full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "full"
    assert _run(out, "--steps", "2", "--save-every", "2") == 0
    real = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    capsys.readouterr()
    rc = main(["train", "--resume", str(out), "--steps", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "cannot write the checkpoint of step 4" in err and "No space left on device" in err
    assert "step-00000002, is kept" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000002"]  # no .tmp- left
    assert _latest(out)[0] == 2


@pytest.mark.parametrize("extra, line", [
    (["--batch-size", "9223372036854775807"], "--batch-size/--image-size: a batch of 9223372036854775807 images of "
                                              "8x8 is over"),  # was "IntArrayRef contains an int that cannot be ..."
    # "Storage size calculation overflowed"
    (["--image-size", str(2**62)], f"--batch-size/--image-size: a batch of 8 images of {2**62}x{2**62} is over"),
    (["--resume", ""], "--resume: expected a checkpoint folder, a run folder or 'latest', got ''"),  # a new run
    (["--lr", "1e308"], "--lr: expected a positive number up to 3.4e38"),  # torch's overflow traceback in AdamW
    (["--data", ""], "--data: no such file or folder ''"),  # named the field ("data:"), not the flag
    (["--unet", "null"], "--unet: expected a JSON object of UNetConfig fields, got null"),  # ignored
    (["--unet", '{"out_channels": 3}'], "--model/--unet: the network outputs 3 channels; training predicts the "
                                        "1-channel target"),  # trained on a broadcast loss
    (["--unet", '{"learned_variance": true}'], "--model/--unet: the network outputs 2 channels (learned variance); "
                                               "training predicts the 1-channel target of the data"),
])
def test_train_mistakes_are_one_line_before_any_work(tmp_path, capsys, extra, line):
    rc = _run(tmp_path / "o", "--steps", "2", *extra)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"fastddpm train: error: {line}" in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_model_file_takes_the_data_sizes_and_its_output_is_checked(tmp_path, capsys):
    """A --model .json takes the data's in_channels and sample_size, as a preset does (a 32x32 RGB config trains
    on 8x8 grey digits); an out_channels of its own that is not the data's was trained on a broadcast loss."""
    cfg = {"base_channels": 16, "channel_mult": [1, 2], "attention_resolutions": [], "norm_num_groups": 4,
           "in_channels": 3, "sample_size": 32}
    (tmp_path / "rgb.json").write_text(json.dumps(cfg))
    (tmp_path / "rgb_out.json").write_text(json.dumps({**cfg, "out_channels": 3}))
    assert _run(tmp_path / "a", "--steps", "1", "--model", str(tmp_path / "rgb.json")) == 0
    net = ck.read_state(_latest(tmp_path / "a")[1])["unet_config"]
    assert (net["in_channels"], net["sample_size"]) == (1, 8)
    capsys.readouterr()
    assert _run(tmp_path / "b", "--steps", "1", "--model", str(tmp_path / "rgb_out.json")) == 2
    assert "--model/--unet: the network outputs 3 channels; training predicts the 1-channel" in capsys.readouterr().err


def test_data_folder_guards(tmp_path, capsys, monkeypatch):
    """--out inside --data trained on its own sample grids after a resume; a relative --data could not be
    resumed from another folder (or named other data there); a folder that gained images resumed silently
    with other batches."""
    _image_folder(tmp_path / "imgs", n=12)
    rc = _run(tmp_path / "imgs" / "run", "--data", str(tmp_path / "imgs"), "--steps", "1", "--batch-size", "4")
    assert rc == 2 and "is inside --data" in capsys.readouterr().err
    assert not (tmp_path / "imgs" / "run").exists()
    monkeypatch.chdir(tmp_path)
    assert _run(tmp_path / "r", "--data", "imgs", "--steps", "2", "--batch-size", "4") == 0
    assert ck.read_state(_latest(tmp_path / "r")[1])["config"]["data"] == str(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path / "imgs")
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "3", "--no-progress"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "4", "--no-progress", "--data", "."]) == 0
    monkeypatch.chdir(tmp_path)
    os.rename(tmp_path / "imgs", tmp_path / "moved")  # the data moved (another mount): the new path is taken
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "5", "--no-progress", "--data", "moved"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "6", "--no-progress", "--data", "r"]) == 2
    os.rename(tmp_path / "moved", tmp_path / "imgs")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "new.png")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "7", "--no-progress", "--data", "imgs"]) == 2
    assert "held 12 images when the run saved" in capsys.readouterr().err


def test_empty_arrays_and_leftover_pointer_files(tmp_path, capsys):
    """An .npy of empty images was a "min(): Expected reduction dim" traceback; an .npz with no array was called
    "several arrays []"; the .tmp- file of a `latest` pointer whose write was killed stayed forever (the
    cleanup removed only folders)."""
    np.save(tmp_path / "empty.npy", np.zeros((10, 0, 0), dtype=np.uint8))
    np.savez(tmp_path / "none.npz")
    for name, want in (("empty.npy", "N, H, W > 0, got shape (10, 0, 0)"), ("none.npz", "holds no array")):
        assert _run(tmp_path / name.split(".")[0], "--data", str(tmp_path / name), "--steps", "1") == 2
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, err
    out = tmp_path / "run"
    assert _run(out, "--steps", "1") == 0
    (out / "checkpoints" / ".tmp-abc").write_text("step-00000001")  # a pointer write killed before its rename
    assert main(["train", "--resume", str(out), "--steps", "2", "--no-progress"]) == 0
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000001", "step-00000002"]


def test_toml_config_and_command_line_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('model = "tiny"\nimage_size = 8\nsteps = 3\nbatch-size = 4\nsample_every = 0\n'
                    'progress = false\n[unet]\nbase_channels = 8\n')
    assert main(["train", "--config", str(toml), "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    step, path = _latest(tmp_path / "o")
    meta = ck.read_state(path)
    assert step == 2 and meta["config"]["batch_size"] == 4 and meta["unet_config"]["base_channels"] == 8
    # --unet goes over the [unet] table field by field (it replaced the table: the default widths came back)
    assert main(["train", "--config", str(toml), "--unet", '{"dropout": 0.25}', "--steps", "1",
                 "--out", str(tmp_path / "u")]) == 0
    net = ck.read_state(_latest(tmp_path / "u")[1])["unet_config"]
    assert net["base_channels"] == 8 and net["dropout"] == 0.25
    toml.write_text("stepz = 3\n")
    assert main(["train", "--config", str(toml)]) == 2


def test_batches_are_epoch_permutations():
    n, b = 10, 4
    seen = torch.cat([batch_indices(0, s, b, n) for s in range(5)])  # 20 positions: 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(0, 3, b, n), batch_indices(0, 3, b, n))
    assert not torch.equal(batch_indices(0, 0, b, n), batch_indices(1, 0, b, n))
    assert TrainConfig().objective == "eps"


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    args = PLAIN + ["--steps", "3", "--lr", "1e-3", "--warmup", "1"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastddpm"] + args + ["--out", str(tmp_path / "two")]
    env = repo_env()
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s1, p1 = _latest(tmp_path / "one")
    s2, p2 = _latest(tmp_path / "two")
    assert s1 == s2 == 3 and ck.read_state(p2)["world_size"] == 2
    a, b = load_file(os.path.join(p1, "model.safetensors")), load_file(os.path.join(p2, "model.safetensors"))
    # Same data, noise and timesteps; only the order of the fp32 gradient sums differs (per-process means
    # averaged by all-reduce), and Adam's first steps amplify that to about lr * 1e-4.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_run_folder_holds_one_run(tmp_path, capsys):
    """A new run started in a folder that holds a run's checkpoints used to train, prune its own new checkpoint
    (the old run's later steps sort above it), report that deleted checkpoint and truncate the old metrics; now
    it is refused before any work, and so is resuming another run's checkpoint into it."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, "--steps", "3") == 0
    before = {p.name: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _run(a, "--steps", "2", "--lr", "1e-3") == 2
    err = capsys.readouterr().err
    assert "--out:" in err and "already holds a run's checkpoints" in err and "--resume latest" in err, err
    assert {p.name: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before  # nothing touched
    assert _run(b, "--steps", "2") == 0
    assert _run(a, "--steps", "5", "--resume", str(b)) == 2  # b's run into a
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert _run(a, "--steps", "5", "--resume", "latest") == 0  # its own run continues
    assert _latest(a)[0] == 5


def test_sixteen_bit_grey_pngs_are_scaled_not_clipped(tmp_path):
    # PIL's convert("L") clips 16-bit values above 255: a 16-bit PNG decoded to white (or to {-1, 1})
    from fastddpm.train.data import ImageFolder

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    (tmp_path / "grey").mkdir()
    Image.fromarray(arr).save(tmp_path / "grey" / "a.png")
    assert Image.open(tmp_path / "grey" / "a.png").mode.startswith("I")  # a 16-bit PNG, as PIL opens it
    want = torch.from_numpy(arr.astype(np.float64) / 65535 * 2 - 1)
    x = ImageFolder(str(tmp_path / "grey"), 8)[0]
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x[0].double(), want, rtol=0, atol=1e-6)
    # beside an RGB image the folder is RGB: the grey values in every channel
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "grey" / "b.png")
    x = ImageFolder(str(tmp_path / "grey"), 8)[0]
    assert x.shape == (3, 8, 8)
    for c in range(3):
        torch.testing.assert_close(x[c].double(), want, rtol=0, atol=1e-6)
    # resized: within [-1, 1] and close to the mean of the source
    x = ImageFolder(str(tmp_path / "grey"), 4)[0]
    assert x.min() >= -1 and x.max() <= 1 and abs(float(x.mean()) - float(want.mean())) < 0.1


def test_preview_grid_is_checked_first_and_saved_after(tmp_path, capsys, monkeypatch):
    # --sample-n whose grid PIL would refuse failed only at the first preview, after training, naming
    # --batch-size; and a preview that ran out of memory lost the checkpoint of its step (saved after it)
    assert _run(tmp_path / "a", "--steps", "4", "--sample-every", "2", "--sample-n", "1000000000") == 2
    err = capsys.readouterr().err
    assert "--sample-n: the grid of 1000000000 images" in err and not (tmp_path / "a" / "checkpoints").exists()
    import fastddpm.samplers

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")

    monkeypatch.setattr(fastddpm.samplers, "sample", oom)
    assert _run(tmp_path / "b", "--steps", "4", "--sample-every", "2", "--save-every", "2") == 2
    err = capsys.readouterr().err
    assert "--sample-n: the preview of 64 images" in err and "step 2 is saved" in err, err
    assert _latest(tmp_path / "b")[0] == 2


def test_metrics_rows_after_a_crash_and_resume_are_the_uninterrupted_runs(tmp_path, monkeypatch):
    # A crash between two metrics rows lost the steps logged since the last row: the resumed run's next row
    # averaged only the steps after the checkpoint (the weights were bitwise right, the log was not).
    common = ["--steps", "8", "--save-every", "3", "--log-every", "4"]
    assert _run(tmp_path / "a", *common) == 0
    real = ck.save_checkpoint

    def crash_after_step_6(root, step, **kw):
        path = real(root, step, **kw)
        if step == 6:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 6, two steps into a row
        return path

    monkeypatch.setattr(ck, "save_checkpoint", crash_after_step_6)
    assert _run(tmp_path / "b", *common) == 130
    monkeypatch.setattr(ck, "save_checkpoint", real)
    b = tmp_path / "b"
    (b / "samples").mkdir(exist_ok=True)  # temporaries of atomic writes a kill -9 cut short: the resume cleans them
    for p in (b / ".tmp-x1.json", b / ".tmp-x2.csv", b / "samples" / ".tmp-x3.png"):
        p.write_text("half")
    assert _run(tmp_path / "b", *common, "--resume", "latest") == 0

    def rows(run):
        with open(tmp_path / run / "metrics.csv") as f:
            return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)]

    assert rows("b") == rows("a") and [r[0] for r in rows("a")] == ["4", "8"]
    assert not list((tmp_path / "b").rglob(".tmp-*"))


def test_config_file_mistakes_are_named(tmp_path, capsys):
    # each of these ran (with one spelling silently winning, the file ignored, or the bad value hidden by a
    # flag) or named no file
    cases = {"dup.toml": ("batch_size = 4\nbatch-size = 2\n", "'batch_size' and 'batch-size' are the same setting"),
             "bad.toml": ('steps = "two"\n', "steps: expected an integer, got 'two'"),
             "bin.toml": (b"\xff\xfe\x00binary", "is not valid TOML"),
             "unknown.toml": ("stepz = 2\n", "unknown setting 'stepz'")}
    for name, (text, why) in cases.items():
        p = tmp_path / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        assert _run(tmp_path / "o", "--config", str(p), "--steps", "1") == 2, name  # --steps given too
        err = capsys.readouterr().err
        assert f"--config {p}" in err or f"--config: {p}" in err, err
        assert why in err, err
    (tmp_path / "dir.toml").mkdir()
    for arg, why in ((str(tmp_path / "dir.toml"), "is a folder"), ("", "expected a file name, got ''")):
        assert _run(tmp_path / "o", "--config", arg, "--steps", "1") == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_optimiser_and_schedule_flags_are_named(tmp_path, capsys):
    # torch's "Invalid weight_decay value: -1.0" and the schedule's "beta_start/beta_end: ..." named no flag
    for args, why in ((["--weight-decay", "-1"], "--weight-decay: expected >= 0, got -1.0"),
                      (["--beta-start", "-0.1"], "--beta-start: expected a number in (0, 1), got -0.1"),
                      (["--beta-end", "1.5"], "--beta-end: expected a number in (0, 1), got 1.5")):
        assert _run(tmp_path / "o", "--steps", "1", *args) == 2
        assert why in capsys.readouterr().err


def test_unet_overrides_that_do_not_build_are_named(tmp_path, capsys):
    # the UNetConfig's own message ("attention_resolutions: ...") did not say that --unet set it
    for unet, why in (('{"sample_size": 16}', "--unet sample_size with --model tiny: attention_resolutions"),
                      ('{"norm_num_groups": 5}', "--unet norm_num_groups with --model tiny: norm_num_groups")):
        assert _run(tmp_path / "o", "--steps", "1", "--unet", unet) == 2
        assert why in capsys.readouterr().err


def test_resume_refuses_other_data_in_place_of_the_digits(tmp_path, capsys):
    """'digits' is no path: any array of the same size was taken as "the data moved", and the run went on
    training on other images (config.json then named them)."""
    assert _run(tmp_path / "a", "--steps", "1") == 0
    n = len(load_dataset("digits"))
    np.save(tmp_path / "other.npy", np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8))
    assert _run(tmp_path / "a", "--steps", "2", "--resume", "latest", "--data", str(tmp_path / "other.npy")) == 2
    err = capsys.readouterr().err
    assert "--data: the run being resumed used 'digits'" in err, err
    assert _latest(tmp_path / "a")[0] == 1


def test_resuming_an_earlier_checkpoint_keeps_the_ones_it_writes(tmp_path, capsys):
    """--keep counted the checkpoints of later steps (from before the resume) as the newest and deleted the one
    just written: `latest` named a missing folder and the retrained steps were lost."""
    import shutil

    assert _run(tmp_path / "a", "--steps", "4", "--save-every", "2") == 0
    root = tmp_path / "a" / "checkpoints"
    shutil.copytree(root / "step-00000004", tmp_path / "four")
    rc = main(["train", "--resume", str(root / "step-00000002"), "--steps", "3", "--save-every", "1", "--keep", "1",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    step, path = _latest(tmp_path / "a")
    assert step == 3 and os.path.basename(path) == "step-00000003"
    assert not (root / "step-00000002").exists() and (root / "step-00000004").exists()  # the later one left alone
    assert main(["train", "--resume", "latest", "--out", str(tmp_path / "a"), "--steps", "4", "--no-progress"]) == 0
    _assert_same_checkpoint(str(tmp_path / "four"), str(root / "step-00000004"))  # steps 3, 4 again: the same


def test_a_metrics_row_cut_short_is_dropped_on_resume(tmp_path, capsys):
    """A kill during a row's append leaves part of it ("1"); the resumed run trained to the end, then failed
    plotting the loss (exit 2, "could not convert string to float: ''") and kept the broken row."""
    assert _run(tmp_path / "a", "--steps", "2", "--log-every", "1") == 0
    with open(tmp_path / "a" / "metrics.csv", "a") as f:
        f.write("1")
    assert _run(tmp_path / "a", "--steps", "3", "--log-every", "1", "--resume", "latest") == 0, capsys.readouterr().err
    with open(tmp_path / "a" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"] and all(float(r["loss"]) > 0 for r in rows)


def test_a_full_disk_at_the_start_names_the_run_folder(tmp_path, capsys, monkeypatch):
    import errno

    from fastddpm.train import loop

    assert _run(tmp_path / "a", "--steps", "1") == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "_truncate_csv", full)
    assert _run(tmp_path / "a", "--steps", "2", "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert (f"--out {tmp_path / 'a'}: cannot write config.json or metrics.csv ([Errno 28] No space left on device); "
            "the checkpoints are untouched") in err and "Traceback" not in err, err


def test_elapsed_seconds_go_on_across_a_resume(tmp_path, monkeypatch):
    """elapsed_s restarted at 0 in a resumed run, and it_per_s of the row spanning the resume divided the steps
    of both processes by the seconds of the second. The clock is perf_counter in milliseconds (for the
    printed precision), restarted far below the first run's by the resumed process (it is per process)."""
    from fastddpm.train import loop

    class Clock:
        def __init__(self, offset):
            self.offset = offset

        def perf_counter(self):
            return time.perf_counter() * 1e3 + self.offset

        def __getattr__(self, name):
            return getattr(time, name)

    common = ["--steps", "8", "--save-every", "3", "--log-every", "4"]
    real = ck.save_checkpoint

    def crash_after_step_6(root, step, **kw):
        path = real(root, step, **kw)
        if step == 6:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ck, "save_checkpoint", crash_after_step_6)
    monkeypatch.setattr(loop, "time", Clock(1e9))
    assert _run(tmp_path / "b", *common) == 130
    monkeypatch.setattr(ck, "save_checkpoint", real)
    monkeypatch.setattr(loop, "time", Clock(-time.perf_counter() * 1e3))
    assert _run(tmp_path / "b", *common, "--resume", "latest") == 0
    with open(tmp_path / "b" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["4", "8"]
    e4, e8 = float(rows[0]["elapsed_s"]), float(rows[1]["elapsed_s"])
    assert 0 < e4 < e8, rows
    # the row of steps 5-8 spans the two processes: its rate is its 4 steps over the time trained since row 4
    assert abs(float(rows[1]["it_per_s"]) * (e8 - e4) / 4 - 1) < 0.01, rows
