"""The training loop: read it top to bottom.

    cfg = TrainConfig(data="digits", steps=2000, out="runs/digits")
    train(cfg)

Every random draw of step k (which images, their timesteps, noise and flips, dropout) is a function of
(seed, k), so a run resumed from a checkpoint at step k is bitwise identical on the CPU to one that never
stopped, and N processes under torchrun compute the same global batch as one process.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from .. import ops
from .._errors import is_out_of_memory, one_line
from .._fields import env_int
from .._io import atomic_path, check_output_dir, has_ext, lock_folder
from ..models.unet import UNet, UNetConfig
from ..schedule import SETTINGS, NoiseSchedule
from . import checkpoint as ckpt_mod
from .config import PREDICTION_TYPE, TrainConfig
from .data import ImageFolder, _mix, batch_indices, open_dataset, step_generator, stream_batches

PRESETS = {"digits": UNet.digits, "tiny": UNet.tiny, "ddpm_cifar10": UNet.ddpm_cifar10,
           "cifar10": UNet.ddpm_cifar10}
# Settings that may change when a run resumes; every other one is taken from the checkpoint.
RESUMABLE_OVERRIDES = {"steps", "save_every", "keep", "sample_every", "sample_n", "sample_sampler",
                       "sample_steps", "log_every", "out", "device", "threads", "progress", "workers"}


class TrainingError(RuntimeError):
    """Training stopped (a non-finite loss, gradient or weight): the message says why and which checkpoint
    was kept."""


@torch.no_grad()
def unhealthy(model: torch.nn.Module, probe: tuple[torch.Tensor, torch.Tensor]) -> str | None:
    """Why ``model`` must not be saved (a non-finite parameter or buffer, or non-finite outputs on the
    random ``probe`` input), or None. Finite weights are not enough: after a huge step (lr 1e12) the
    weights are finite near 1e12 and the activations overflow a few layers on."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"parameter {name} is not finite"
    was_training = model.training
    model.eval()
    try:
        out = model(*probe)
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        return "its output on random input is not finite"
    return None


def unet_config(cfg: TrainConfig, channels: int, image_size: int) -> UNetConfig:
    data = {"sample_size": image_size, "in_channels": channels}  # what the data say, where nothing else does
    over = {**data, **cfg.unet}
    if has_ext(cfg.model, ".json"):
        if not os.path.isfile(cfg.model):
            raise ValueError(f"--model: no such file {cfg.model!r}")
        try:
            with open(cfg.model, "rb") as f:
                d = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--model: {cfg.model} is not a JSON file of UNetConfig fields ({exc})") from exc
        if not isinstance(d, dict):
            raise ValueError(f"--model: {cfg.model}: expected a JSON object of UNetConfig fields, got a "
                             f"{type(d).__name__}")
        d.update(over)  # the data's size and channels, as for a preset (an out_channels of its own is checked)
        try:
            return UNetConfig.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise (TypeError if isinstance(exc, TypeError) else ValueError)(f"--model {cfg.model}: {exc}") from exc
    if cfg.model not in PRESETS:
        raise ValueError(f"--model: expected a preset ({', '.join(PRESETS)}) or a UNetConfig .json file, "
                         f"got {cfg.model!r}")
    preset = PRESETS[cfg.model]
    try:
        return preset(**over).config
    except ValueError as exc:
        at_fault = f"--unet {', '.join(sorted(cfg.unet))} with --model {cfg.model}: {exc}"
        if "sample_size" in cfg.unet:
            raise ValueError(at_fault) from exc
        # the error path only: the preset's own size, and whether the preset would build at it
        native = preset().config.sample_size
        try:
            preset(**{**over, "sample_size": native})
        except ValueError:  # not the size: a --unet override is at fault
            raise (ValueError(at_fault) if cfg.unet else exc) from exc
        raise ValueError(f"--model: the {cfg.model} preset is built for {native}x{native} images and does not fit the "
                         f"data's {image_size}x{image_size} ({exc}); pass --image-size {native}, or adjust the "
                         "preset with --unet") from exc


def make_schedule(d: dict) -> NoiseSchedule:
    """The run's NoiseSchedule; NoiseSchedule's errors name its arguments, which are these flags here."""
    try:
        return NoiseSchedule(**d)
    except ValueError as exc:
        head, sep, rest = str(exc).partition(": ")
        names = head.split("/")
        if sep and all(n in d for n in names):
            raise ValueError("/".join("--" + n.replace("_", "-") for n in names) + sep + rest) from exc
        raise


def schedule_dict(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in SETTINGS}


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------
class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a no-op otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = env_int("WORLD_SIZE", 1)
        self.rank = env_int("RANK", 0)
        self.local_rank = env_int("LOCAL_RANK", 0)
        self.enabled = self.world > 1
        if self.enabled:
            import torch.distributed as dist

            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"--device: auto gives process LOCAL_RANK={local_rank} the GPU cuda:{local_rank}, but "
                             f"{torch.cuda.device_count()} GPU(s) are visible; start one process per GPU "
                             "(torchrun --nproc_per_node), or pass --device cpu")
        return torch.device(f"cuda:{local_rank}")
    from ..cli import parse_device

    dev = parse_device(name)
    return torch.device(f"cuda:{local_rank}") if dev.type == "cuda" and dev.index is None else dev


class _Interrupted(Exception):
    """A signal arrived during the preview grid (raised by ``_Signals.poll`` between two sampling steps)."""


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops.

    The preview grid, which can take minutes, polls the flag after every sampling step (``poll`` as the
    sampler's callback), so the run does not sit unresponsive until the preview ends. The handler itself only
    sets the flag: an exception raised from it could land anywhere (inside no_grad's exit, a layout restore)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}

    def poll(self, *args) -> None:
        if self.received is not None:
            raise _Interrupted

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Images and plots
# ----------------------------------------------------------------------------------------------
def save_grid(x: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1, pad: int = 2) -> None:
    """(N, C, H, W) in [-1, 1] -> a PNG grid (white padding), written atomically."""
    import numpy as np
    from PIL import Image

    from .._io import save_image

    n, c, h, w = x.shape
    nrow = min(nrow or max(1, math.ceil(math.sqrt(n))), max(n, 1))  # no empty columns
    rows = math.ceil(n / nrow)
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = img[i]
    im = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    save_image(im, path)


def grid_size(n: int, h: int, w: int, nrow: int | None = None, scale: int = 1,
              pad: int = 2) -> tuple[int, int]:
    """(width, height) of save_grid's PNG."""
    nrow = min(nrow or max(1, math.ceil(math.sqrt(n))), max(n, 1))
    rows = math.ceil(n / nrow)
    return (nrow * (w + pad) + pad) * scale, (rows * (h + pad) + pad) * scale


def check_grid(n: int, h: int, w: int, nrow: int | None, scale: int, flag: str, advice: str) -> None:
    """A ValueError (``flag``: ...; ``advice``) where save_grid's PNG of ``n`` h x w images would be larger than PIL
    opens (2 x Image.MAX_IMAGE_PIXELS: Image.open refuses it as a decompression bomb), found before the work."""
    from PIL import Image

    gw, gh = grid_size(n, h, w, nrow, scale)
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if limit is not None and gw * gh > limit:
        raise ValueError(f"{flag}: the grid of {n} images at scale {scale} would be {gw} x {gh} pixels, more than PIL "
                         f"opens ({limit:,}); {advice}")


def plot_loss(csv_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(csv_path) as f:
        for row in filter(_whole_row, csv.DictReader(f)):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, label="loss (mean over the log interval)")
    k = max(1, len(losses) // 20)
    if len(losses) > 2 * k:
        sm = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
              for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_path(png_path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getvalue())


CSV_FIELDS = ["step", "loss", "lr", "grad_norm", "it_per_s", "elapsed_s"]


def _whole_row(r: dict) -> bool:
    """Whether a metrics row is whole: a step and a number in every column (a kill during an append cuts the
    last row short)."""
    try:
        return str(r.get("step")).isdigit() and all(math.isfinite(float(r[k])) or k == "it_per_s"
                                                     for k in CSV_FIELDS[1:])
    except (KeyError, TypeError, ValueError):
        return False


def _truncate_csv(path: str, step: int) -> None:
    """Drop rows after ``step`` (a resumed run rewrites them), and a row cut short."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if _whole_row(r) and int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ep = [p for p in ema.parameters()]
    mp = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ep, mp, 1.0 - decay)


def ema_decay_at(cfg: TrainConfig, n: int) -> float:
    """Decay of the n-th update (n from 0): warm-up (1 + n) / (10 + n) so early weights are forgotten."""
    return min(cfg.ema_decay, (1 + n) / (10 + n)) if cfg.ema_warmup else cfg.ema_decay


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _what_the_run_used(name: str, new, old, meta: dict) -> bool:
    """Whether ``new`` asks for what the run resumed used: the same value, or the value it worked out (an
    --image-size of the data's size where none was given; --unet fields equal to the network's)."""
    if new == old:
        return True
    net = meta["unet_config"]

    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    if name == "image_size":
        return old is None and new == net.get("sample_size")
    if name == "data":  # the same file or folder, however it is spelled; or the data moved (the run's folder
        # copied to another machine or mount): the new path is taken, its image count checked against the run's
        if not (isinstance(new, str) and isinstance(old, str) and os.path.exists(new)) or "digits" in (new, old):
            return False  # ("digits" is the built-in set, no path: a file of the same size is other data)
        return not os.path.exists(old) or os.path.samefile(new, old)
    if name == "unet" and isinstance(new, dict):
        return all(k in net and plain(net[k]) == plain(v) for k, v in new.items())
    return False


def _resume_config(cfg: TrainConfig, given: set[str], meta: dict) -> TrainConfig:
    saved = TrainConfig.from_dict(meta["config"], source="checkpoint")
    for name in given:
        new, old = getattr(cfg, name), getattr(saved, name)
        if name in RESUMABLE_OVERRIDES:
            setattr(saved, name, new)
        elif not _what_the_run_used(name, new, old, meta) and name not in ("resume", "config"):
            raise ValueError(f"--{name.replace('_', '-')}: the run being resumed used {old!r}; "
                             f"it cannot change on resume (start a new run instead)")
        elif name == "data" and new != old:  # the same data, or the data moved: read them where they are now
            saved.data = os.path.abspath(new)
    saved.validate()
    return saved


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def train(cfg: TrainConfig, resume: str | None = None, given: set[str] | None = None, log=print) -> dict:
    """Train; returns a summary dict (final step, checkpoint folder, last loss, stopped_by).

    ``resume``: a checkpoint folder, a run folder, or "latest" (the latest checkpoint under ``cfg.out``; where
    ``cfg.out`` holds none, or only the hidden folder of a save that was interrupted, a new run starts there,
    so that the same command starts a run and, after an interruption, resumes it).
    ``given``: the settings explicitly given for this call (on resume they override the saved ones where
    that is allowed, and are refused where it would change the run).
    """
    cfg.validate()
    meta = None
    if resume == "latest" and not ckpt_mod.any_checkpoint(cfg.out):
        log(f"--resume latest: no checkpoint under {cfg.out}, so a new run starts there")
        resume = None
    if resume:
        path = cfg.out if resume == "latest" else resume
        ck = ckpt_mod.resolve(path, "--out" if resume == "latest" else "--resume")
        meta = ckpt_mod.read_state(ck)
        cfg = _resume_config(cfg, set(given or ()), meta)
        done = int(meta["step"])
        if cfg.steps < done:
            raise ValueError(f"--steps: {cfg.steps} is below the step of the checkpoint resumed from ({done}); "
                             f"--steps is the run's total: pass more than {done} to train further")
        if cfg.steps == done:  # the same command again after the run finished: nothing to do
            log(f"{ck} is at step {done}, the --steps total: nothing to train (pass a larger --steps to go on)")
            return {"step": done, "checkpoint": ck, "loss": None, "stopped_by": None, "out": cfg.out,
                    "config": dataclasses.asdict(cfg)}
        if resume != "latest" and "out" not in (given or ()):
            # Continue in the run folder the checkpoint belongs to.
            parent = os.path.dirname(os.path.abspath(ck))
            cfg.out = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else cfg.out
    elif cfg.data != "digits" and os.path.exists(cfg.data):
        # a new run records where its data are, wherever it is resumed from (a relative path names other data,
        # or none, from another folder)
        cfg.data = os.path.abspath(cfg.data)
    # A run folder holds one run: a new run (or another run's checkpoint) written into a folder that holds
    # checkpoints would prune that run's later checkpoints or its own, and mix their logs.
    if ckpt_mod.any_checkpoint(cfg.out) and (meta is None or not _inside(ck, cfg.out)):
        what = "a new run" if meta is None else f"the run of {ck}"
        raise ValueError(f"--out: {cfg.out} already holds a run's checkpoints; continue that run with --resume "
                         f"latest, or start {what} in another --out")
    if cfg.data != "digits" and os.path.isdir(cfg.data) and _inside(cfg.out, cfg.data):
        # the folder is read recursively: the run's own grids and loss plot would become training images
        raise ValueError(f"--out: {cfg.out} is inside --data {cfg.data}, whose images are read from every "
                         "subfolder: the run's sample grids would join the data; put the run folder elsewhere")
    # Before any long work: the run folder must be (or become) a writable folder.
    check_output_dir(cfg.out, "--out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, env_int("LOCAL_RANK", 0))
    if cfg.amp and device.type != "cuda":
        raise ValueError("--amp: mixed precision runs on CUDA devices only; on this CPU bf16 autocast is "
                         "known "
                         "to kill the process (SIGILL), so it is refused. Train in fp32 (drop --amp).")
    dist = Dist(device)
    if dist.enabled and cfg.batch_size % dist.world:
        raise ValueError(f"--batch-size: the global batch {cfg.batch_size} must be divisible by the "
                         f"{dist.world} processes")
    global _LOCK_FD
    try:
        _LOCK_FD = _lock_run_folder(cfg.out) if dist.main else None
        return _train(cfg, meta, ck if meta else None, device, dist, log)
    finally:
        dist.close()
        if _LOCK_FD is not None:
            os.close(_LOCK_FD)  # (releases the lock)
            _LOCK_FD = None


# The run folder's lock, while a run holds it. A forked child (a decoding worker) closes its copy: it would
# otherwise hold the lock after the trainer is killed, until the worker notices and exits.
_LOCK_FD: int | None = None


def _close_lock_in_child() -> None:
    global _LOCK_FD
    if _LOCK_FD is not None:
        with contextlib.suppress(OSError):
            os.close(_LOCK_FD)
        _LOCK_FD = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_in_child)


def _lock_run_folder(out: str) -> int | None:
    """An exclusive lock on the run folder for the run's duration (_io.lock_folder): two runs writing one
    folder would each report success while their checkpoints and logs overwrite each other."""
    with contextlib.suppress(OSError):  # (a folder that cannot be made is not locked: lock_folder gives None)
        os.makedirs(out, exist_ok=True)
    try:
        return lock_folder(out, wait=False)
    except BlockingIOError:
        raise ValueError(f"--out: {out} is in use by another training run (it holds the folder's lock); wait for "
                         "it to end, or give another --out") from None


def _train(cfg, meta, ck, device, dist, log) -> dict:
    # (N, C, S, S) in [-1, 1]: a tensor in memory, or an image folder decoded batch by batch
    data = open_dataset(cfg.data, cfg.image_size)
    N, C, S = data.shape[0], data.shape[1], data.shape[-1]
    streaming = isinstance(data, ImageFolder)
    if meta is None:
        ucfg = unet_config(cfg, C, S)
    else:
        try:
            ucfg = UNetConfig.from_dict(meta["unet_config"])
        except (TypeError, ValueError) as exc:  # (read as the user's --unet mistake before)
            raise ckpt_mod.CheckpointError(f"checkpoint {ck}: state.json's unet_config does not build a network "
                                           f"({one_line(exc, 200)}; the file is damaged)") from exc
    if meta is not None and isinstance(meta.get("data_size"), int) and meta["data_size"] != N:
        # batches are a function of (seed, step, N): other data would resume as another run, silently
        raise ValueError(f"--data: {cfg.data} held {meta['data_size']} images when the run saved {ck}, now {N}; "
                         "resume with the same data, or start a new run")
    if (ucfg.in_channels, ucfg.sample_size) != (C, S):
        s = ucfg.sample_size
        raise ValueError(f"--model: the network takes {ucfg.in_channels}x{s}x{s} "
                         f"images, the data are {C}x{S}x{S}")
    if ucfg.learned_variance or ucfg.out_channels_resolved != C:
        # the loss compares the output with the data's C-channel target: a wider output would broadcast
        raise ValueError(f"--model/--unet: the network outputs {ucfg.out_channels_resolved} channels"
                         f"{' (learned variance)' if ucfg.learned_variance else ''}; training predicts the "
                         f"{C}-channel target of the data (a learned variance is not trained here): "
                         + ("leave learned_variance out" if ucfg.learned_variance
                            else f"set out_channels to {C} or leave it out"))
    preview_scale = max(1, 64 // S)  # the preview grids are upscaled to about 64 pixels an image
    if cfg.sample_every:  # the preview grids, before any step is spent
        check_grid(cfg.sample_n, S, S, None, preview_scale, "--sample-n",
                   "lower --sample-n, or pass --sample-every 0 for no previews")
    schedule = make_schedule(schedule_dict(cfg))
    torch.manual_seed(cfg.seed)  # initial weights
    model = UNet(ucfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    step, ema_n = 0, 0
    if meta is not None:
        ckpt_mod.load_weights(model, ck, ckpt_mod.MODEL_FILE)
        ckpt_mod.load_weights(ema, ck, ckpt_mod.EMA_FILE)
        ckpt_mod.load_optimizer(ck, meta, opt)
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        ckpt_mod.set_rng_state(meta["rng"], ck)
        step, ema_n = int(meta["step"]), int(meta.get("ema_updates", meta["step"]))
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    B = cfg.batch_size
    local_B = B // dist.world
    lo = dist.rank * local_B
    if not streaming:
        data = data.to(device)

    ck_root = os.path.join(cfg.out, "checkpoints")
    csv_path = os.path.join(cfg.out, "metrics.csv")
    if dist.main:
        os.makedirs(cfg.out, exist_ok=True)
        for folder in (cfg.out, os.path.join(cfg.out, "samples")):  # atomic writes a kill -9 cut short
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if name.startswith(".tmp-") and os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
        log = _run_log(log, os.path.join(cfg.out, "train.log"))
        try:
            with atomic_path(os.path.join(cfg.out, "config.json")) as tmp, open(tmp, "w") as f:
                f.write(cfg.to_json())
            _truncate_csv(csv_path, step)
        except OSError as exc:  # (a full disk: "[Errno 28] No space left on device" named no file)
            raise OSError(f"--out {cfg.out}: cannot write config.json or metrics.csv ({one_line(exc, 200)})"
                          + ("; the checkpoints are untouched" if meta is not None else "")) from exc
        if meta is None:
            log(f"training a {ucfg.sample_size}x{ucfg.sample_size}x{ucfg.in_channels} UNet "
                f"({model.num_parameters():,} parameters) on {N} images from {cfg.data!r}, objective "
                f"{cfg.objective}, {cfg.steps} steps of batch {B}"
                + (f" over {dist.world} processes" if dist.enabled else "") + f", device {device}")
        else:
            log(f"resuming from {ck} at step {step}")

    def state() -> dict:
        return {"config": cfg.to_dict(), "unet_config": ucfg.to_dict(), "schedule": schedule_dict(cfg),
                "prediction_type": PREDICTION_TYPE[cfg.objective], "ema_updates": ema_n, "data_size": N,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "world_size": dist.world,
                # the steps logged since the last metrics row and the seconds they took: a resumed run's next row
                # averages them too; the seconds trained so far (elapsed_s goes on from them)
                "log_window": [acc_loss, acc_n, time.perf_counter() - t_log],
                "elapsed_s": time.perf_counter() - t0}

    # A fixed random input on which a checkpoint's model and EMA must give finite outputs to be saved.
    gp = torch.Generator().manual_seed(_mix(cfg.seed, 4))
    probe = (torch.randn((min(B, 4), C, S, S), generator=gp).to(device),
             torch.randint(0, cfg.num_train_timesteps, (min(B, 4),), generator=gp).to(device))

    def save(reason: str) -> str | None:
        # The NaN guard: the weights of this step are checked before they are written, so the checkpoint
        # kept after a divergence is one whose model works.
        why = None
        for name, m in (("model", model), ("EMA", ema)):
            bad = unhealthy(m, probe)
            if bad:
                why = f"the {name} after step {step}: {bad}"
                break
        bad_flag = torch.tensor([float(why is not None)], device=device)
        if dist.enabled and float(dist.all_reduce_sum(bad_flag)) > 0 and why is None:
            why = f"another process found the weights after step {step} not finite"
        if why:
            fail(f"{why}; checkpoint not written")
        path = None
        if dist.main:
            path = ckpt_mod.save_checkpoint(ck_root, step, model=model, ema=ema, optimizer=opt, state=state(),
                                            keep=cfg.keep)
        dist.barrier()
        return path

    def fail(why: str) -> None:
        if last_saved:
            kept = (f"kept checkpoint {os.path.basename(last_saved)} ({last_saved}): the last one whose "
                    f"weights and outputs were checked finite")
        else:
            kept = "no checkpoint was kept (none was written by this run)"
        msg = f"NaN guard: {why}; training stopped; {kept}. Lower --lr or check the data"
        if dist.main:  # into train.log; the error raised is what reaches the screen (it was printed twice)
            getattr(log, "to_file", log)(msg)
        raise TrainingError(msg)

    sig = _Signals()

    def sample_grid() -> None:
        if not dist.main:
            return
        from ..samplers import sample

        try:
            x = sample(ema, (cfg.sample_n, C, S, S), steps=min(cfg.sample_steps, cfg.num_train_timesteps),
                       sampler=cfg.sample_sampler, schedule=schedule, seed=cfg.seed,
                       prediction_type=PREDICTION_TYPE[cfg.objective], progress=False, device=device,
                       callback=sig.poll)
        except _Interrupted:
            # the other processes of a distributed run learn of the signal at the next step's all-reduce, so
            # the run stops (and saves) at the end of that step, as it would for a signal during a step
            then = "the run is complete (saved)" if step == cfg.steps else "stopping at the end of the next step"
            log(f"the preview of step {step} is cut short by {signal.Signals(sig.received).name}: {then}")
            return
        except (MemoryError, RuntimeError) as exc:  # all in one batch: the checkpoint of this step is saved
            if not is_out_of_memory(exc):
                raise
            raise ValueError(f"--sample-n: the preview of {cfg.sample_n} images, sampled as one batch, does not fit "
                             f"in memory ({one_line(exc, 120)}); lower --sample-n (step {step} is "
                             f"saved: continue with --resume)") from exc
        save_grid(x, os.path.join(cfg.out, "samples", f"step-{step:08d}.png"), scale=preview_scale)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and dist.main), desc="train",
               dynamic_ncols=True, file=sys.stderr)
    stopped_by, last_loss = None, float("nan")
    last_saved = ck if meta is not None else None  # the checkpoint resumed from counts as kept
    window = list(meta.get("log_window", [])) if meta is not None else []
    acc_loss, acc_n = (float(window[0]), int(window[1])) if len(window) >= 2 else (0.0, 0)
    # (the clocks go on from the resumed run's: elapsed_s counts the seconds trained, it_per_s the window's)
    t_log = time.perf_counter() - (float(window[2]) if len(window) >= 3 else 0.0)
    t0 = time.perf_counter() - (float(meta.get("elapsed_s", 0.0)) if meta is not None else 0.0)
    f_csv = open(csv_path, "a", newline="") if dist.main else None
    batches = stream_batches(data, cfg.seed, step, cfg.steps, B, lo, local_B, cfg.workers,
                             pin_memory=device.type == "cuda") if streaming else None
    try:
        writer = csv.DictWriter(f_csv, CSV_FIELDS) if f_csv else None
        if f_csv and f_csv.tell() == 0:
            writer.writeheader()
        with sig:
            while step < cfg.steps:
                # 1. this step's global batch and its randomness, a function of (seed, step) only
                g = step_generator(cfg.seed, step)
                idx = batch_indices(cfg.seed, step, B, N)
                t_all = torch.randint(0, cfg.num_train_timesteps, (B,), generator=g)
                noise_all = torch.randn((B, C, S, S), generator=g)
                flip_all = torch.rand((B,), generator=g) < 0.5
                torch.manual_seed(_mix(cfg.seed, 3, step, dist.rank))  # dropout
                sl = slice(lo, lo + local_B)
                # the images of the same indices, decoded ahead by the workers when streaming
                try:
                    x0 = next(batches).to(device, non_blocking=True) if streaming else data[idx[sl].to(device)]
                except ValueError as exc:  # an image that passed the header scan but not decoding
                    here = ckpt_mod.step_dir_name(step)
                    if not dist.enabled and step > 0 and (last_saved is None or os.path.basename(last_saved) != here):
                        last_saved = save("data error")  # the steps done so far are not lost
                    kept = f"the last checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
                    raise ValueError(f"{exc}; {kept}: repair or replace the file (the same number of images) and "
                                     "continue with --resume") from exc
                if cfg.flip:
                    f = flip_all[sl].to(device)
                    x0 = torch.where(f[:, None, None, None], x0.flip(-1), x0)
                t = t_all[sl].to(device)
                noise = noise_all[sl].to(device)
                lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
                for group in opt.param_groups:
                    group["lr"] = lr
                # 2. forward: x_t and the target in one fused pass, then the network's prediction
                xt, target = ops.q_sample(x0, t, noise, schedule, target=cfg.objective)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    pred = net(xt, t)
                loss = F.mse_loss(pred.float(), target)
                # 3. agree across processes on the mean loss and on whether to stop
                flags = torch.stack([loss.detach().float(),
                                     torch.tensor(float(sig.received is not None), device=device)])
                flags = dist.all_reduce_sum(flags.clone()) if dist.enabled else flags
                mean_loss = float(flags[0]) / dist.world
                if not math.isfinite(mean_loss):
                    fail(f"loss is {mean_loss} at step {step + 1} (lr {lr:g})")
                # 4. backward, clip, step, EMA
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                    cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                # A non-finite gradient (with a finite loss) would turn every weight into NaN: stop
                # before the optimiser applies it. The grad scaler of fp16 AMP skips such steps itself.
                if not scaler.is_enabled() and not math.isfinite(float(gn)):
                    fail(f"the gradient norm is {float(gn)} at step {step + 1} (lr {lr:g})")
                scaler.step(opt)
                scaler.update()
                ema_update(ema, model, ema_decay_at(cfg, ema_n))
                ema_n += 1
                step += 1
                last_loss = mean_loss
                # 5. log, sample, save
                acc_loss += mean_loss
                acc_n += 1
                bar.update(1)
                if dist.main and (step % cfg.log_every == 0 or step == cfg.steps):
                    now = time.perf_counter()
                    row = {"step": step, "loss": f"{acc_loss / acc_n:.6g}", "lr": f"{lr:.6g}",
                           "grad_norm": f"{float(gn):.6g}", "it_per_s": f"{acc_n / (now - t_log):.4g}",
                           "elapsed_s": f"{now - t0:.1f}"}
                    writer.writerow(row)
                    f_csv.flush()
                    bar.set_postfix(loss=f"{acc_loss / acc_n:.4f}", lr=f"{lr:.2g}")
                    acc_loss, acc_n, t_log = 0.0, 0, now
                stop = float(flags[1]) > 0
                # the checkpoint first: a preview that fails (memory) must not cost the steps since the last one
                if stop or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    last_saved = save("signal" if stop else "periodic")
                if cfg.sample_every and step % cfg.sample_every == 0 and not stop:
                    sample_grid()
                if stop:
                    stopped_by = signal.Signals(sig.received).name if sig.received else \
                        "a signal to another process"
                    break
    finally:
        bar.close()
        if f_csv:
            f_csv.close()
        if batches is not None:
            batches.close()  # its decoding workers end with the run (they hold the run folder's lock too)
    if dist.main and stopped_by is None:
        try:
            plot_loss(csv_path, os.path.join(cfg.out, "loss.png"))
        except ImportError:
            log("loss curve not plotted: matplotlib is not installed")
    summary = {"step": step, "checkpoint": last_saved, "loss": last_loss, "stopped_by": stopped_by,
               "out": cfg.out, "config": dataclasses.asdict(cfg)}
    return summary


def _run_log(log, path: str):
    """``log`` that also appends each line, time-stamped, to the run's train.log."""

    def to_file(msg: str) -> None:
        try:
            with open(path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        except OSError:
            pass

    def both(msg: str) -> None:
        log(msg)
        to_file(msg)

    both.to_file = to_file
    return both
