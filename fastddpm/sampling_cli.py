"""`fastddpm sample` (and `fastddpm export`): images from a built-in model, a training checkpoint, or a
diffusers UNet2DModel folder, as a PNG grid, individual PNGs and/or an .npz.

Batch i of the n images is drawn with seed ``seed + i``, so the images do not depend on how many
processes share the work: under torchrun each process samples its share of batches and rank 0 writes.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

from ._fields import env_int
from .cli import UsageError, check_paths_given, check_seed, check_threads, command, parse_device


def _args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model",
                     help="a built-in model (digits) or an exported .safetensors (default: digits)")
    src.add_argument("--ckpt", metavar="DIR",
                     help="a training run or checkpoint folder, or a local diffusers DDPMPipeline folder "
                          "(model_index.json, unet/, scheduler/: sampled with its scheduler config) or "
                          "UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin)")
    p.add_argument("--weights", default=None, choices=("ema", "model"),
                   help="which weights of a training checkpoint --ckpt (default: ema)")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=64,
                   help="number of images (default: 64; under torchrun spell it --num-images: "
                        "torchrun's own parser reads --n as an abbreviation of its options)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++2m"),
                   help="default: the model's (ddim for digits); dpm++2m: DPM-Solver++(2M), 20 steps by default")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; 50 for digits)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: 1 for images up to 16x16, else torch's default)")
    p.add_argument("--out",
                   help="PNG grid to write (default: samples.png unless --npz or --png-dir is given)")
    p.add_argument("--nrow", type=int, help="images per row of the grid (default: about sqrt(n))")
    p.add_argument("--scale", type=int, help="upscale factor of the grid (default: 64 // image size, >= 1)")
    p.add_argument("--npz", metavar="FILE.npz", help="also write the images as uint8 (N, H, W, C) 'images'")
    p.add_argument("--png-dir", metavar="DIR", help="also write every image as DIR/000000.png ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def default_steps(lm, sampler: str, steps: int | None) -> int:
    """The number of steps fastddpm.sample takes for ``steps`` (None: the sampler's default)."""
    from .samplers.sample import plan_sampling

    return plan_sampling((1, 1), steps=steps, sampler=sampler, schedule=lm.schedule).num_steps


def generate(lm, n: int, batch_size: int, sampler: str, steps: int | None, seed: int, device,
             eta: float = 0.0,              progress: bool = True, rank: int = 0, world: int = 1):
    """This process's share of the n images, as a dict {batch index: (b, C, H, W) tensor in [-1, 1]}."""
    import torch

    from .samplers import sample

    C, H, W = lm.image_shape
    out = {}
    nb = math.ceil(n / batch_size)
    model = lm.model.to(device)
    if getattr(lm, "scheduler", None) is not None:
        # A diffusers folder: its scheduler config (every field honoured) in diffusers' pipeline loop, so
        # batch i equals diffusers.DDPMPipeline(batch_size=b, generator=Generator().manual_seed(seed + i)).
        from .compat.folder import switch_scheduler
        from .samplers.pipeline import denoise

        sched = switch_scheduler(lm.scheduler, sampler)
        T = lm.schedule.num_train_timesteps
        nsteps = steps or (T if sampler == "ddpm" else min(50, T))
        bar = None
        if progress:
            from tqdm.auto import tqdm as bar
        for i in range(rank, nb, world):
            b = min(batch_size, n - i * batch_size)
            x = denoise(model, sched, (b, C, H, W), torch.Generator().manual_seed(seed + i), nsteps, device,
                        eta=eta if sampler == "ddim" else None, progress=bar)
            out[i] = _finite(x, lm, i)
        return out
    for i in range(rank, nb, world):
        b = min(batch_size, n - i * batch_size)
        x = sample(model, (b, C, H, W), steps=steps, sampler=sampler, eta=eta, schedule=lm.schedule,
                   generator=torch.Generator().manual_seed(seed + i), prediction_type=lm.prediction_type,
                   progress=progress, device=device)
        out[i] = _finite(x, lm, i)
    return out


def _finite(x, lm, i: int):
    """``x`` on the CPU, or a ValueError where the model sampled NaN or inf (quantised, they were black images
    that the evaluation scored)."""
    import torch

    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{lm.source or 'the model'}: the images of batch {i} hold NaN or inf: the model's output "
                         "is not finite (diverged or damaged weights); nothing is written")
    return x.cpu()


def sampler_and_steps(lm, sampler: str | None, steps: int | None) -> tuple[str, int | None]:
    """The sampler (--sampler, else the model's) and its steps (--steps, else the model's default where the
    sampler is the model's own, else None: the sampler's default); --steps outside 1 to the model's training
    timesteps is a UsageError."""
    sampler = sampler or lm.sampler
    T = lm.schedule.num_train_timesteps
    if steps is None and sampler == lm.sampler and lm.steps is not None:
        if not 1 <= lm.steps <= T:  # the model's own default, which the user never typed
            raise UsageError(f"--steps: the model's default of {lm.steps} sampling steps is not within 1 to its {T} "
                             f"training timesteps; pass --steps")
        return sampler, lm.steps
    if steps is not None and not 1 <= steps <= T:
        raise UsageError(f"--steps: expected 1 to the model's {T} training timesteps, got {steps}")
    return sampler, steps


def grid_path(args: argparse.Namespace) -> str | None:
    """The PNG grid to write: --out, or samples.png where neither --npz nor --png-dir is given."""
    return args.out if args.out is not None or args.npz or args.png_dir else "samples.png"


def check_sample_args(args: argparse.Namespace) -> None:
    """Every mistake that can be seen before the model is loaded and sampled, as a UsageError."""
    from ._io import IMAGE_FORMATS, check_output_dir, check_output_file, has_ext

    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: expected a positive integer, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps: expected a positive integer, got {args.steps}")
    check_threads(args.threads)
    check_seed(args.seed)
    if not 0 <= args.eta < math.inf:
        raise UsageError(f"--eta: expected a finite number >= 0, got {args.eta}")
    check_paths_given(args, "--model", "--ckpt")
    for name in ("nrow", "scale"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    try:
        if grid_path(args) is not None:
            check_output_file(grid_path(args), "--out", tuple(IMAGE_FORMATS))
        if args.npz is not None:
            check_output_file(args.npz, "--npz", (".npz",))
        if args.png_dir is not None:
            check_output_dir(args.png_dir, "--png-dir")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.png_dir is not None and os.path.isdir(args.png_dir):
        # the new set would replace some of an earlier run's images and leave the rest beside them
        try:
            names = os.listdir(args.png_dir)
        except OSError as exc:
            raise UsageError(f"--png-dir: cannot read the folder {args.png_dir!r} ({exc.strerror or exc})") from exc
        old = sorted(f for f in names if re.fullmatch(r"\d{6,}\.png", f))
        if old:
            raise UsageError(f"--png-dir: {args.png_dir!r} already holds {len(old)} numbered images ({old[0]} ...) "
                             "from an earlier run; give a new or empty folder, or remove them first")
    if args.png_dir is not None:  # the grid or the .npz written where the PNGs go, or one of them over the other
        png_dir = os.path.abspath(args.png_dir)
        for flag, path in (("--out", grid_path(args)), ("--npz", args.npz)):
            if path is None:
                continue
            p = os.path.abspath(path)
            if p == png_dir or (os.path.dirname(p) == png_dir and re.fullmatch(r"\d{6}\.png", os.path.basename(p))):
                raise UsageError(f"--png-dir: {args.png_dir!r} would write over {flag} {path!r}; give them "
                                 "different names")
    model = args.model if args.model or args.ckpt else "digits"
    if model and has_ext(model, ".safetensors") and not os.path.isfile(model):
        raise UsageError(f"--model: no such file {model!r} (an exported model is NAME.safetensors next to "
                         f"NAME.json)")
    if model:  # built-in and exported models are safetensors files
        from .cli import require

        require("safetensors", "sample (its models are safetensors files)")


def check_grid(n: int, h: int, w: int, nrow: int | None, scale: int) -> None:
    """A UsageError where the PNG grid would be larger than PIL opens, found before sampling."""
    from .train.loop import check_grid as check

    try:
        check(n, h, w, nrow, scale, "--out", "lower --scale, --nrow or --n, or write --npz / --png-dir instead")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def available_memory() -> int | None:
    """The bytes the kernel says can be allocated without swapping (MemAvailable, Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(n: int, image_shape: tuple[int, ...], available: int | None = None) -> None:
    """A UsageError where the ``n`` images, all held in memory until they are written, cannot fit in the memory
    available, found before sampling (it would otherwise end, after all the sampling, out of memory).

    Per value: the float32 batches and their join (8 bytes), the uint8 images and the contiguous copy that
    np.savez / the PNG writer make of a batch-last view (2 bytes)."""
    available = available_memory() if available is None else available
    need = n * math.prod(image_shape) * 10
    if available is not None and need > available:
        raise UsageError(f"--n: {n} images of {'x'.join(map(str, image_shape))} are held in memory until written, "
                         f"about {need / 2**30:.3g} GiB, and {available / 2**30:.3g} GiB is available; lower --n "
                         "(runs with different --seed values add up)")


@command("sample", "sample images from a trained model (PNG grid, PNGs, .npz)", _args)
def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import pretrained
    from ._errors import one_line
    from ._io import output_set
    from .train.checkpoint import CheckpointError
    from .train.loop import save_grid

    check_sample_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{env_int('LOCAL_RANK', 0)}")
    t0 = time.perf_counter()
    try:
        lm = pretrained.load(args.model if args.model or args.ckpt else "digits", args.ckpt, args.weights)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    if not args.threads and device.type == "cpu" and lm.image_shape[-1] <= 16:
        # Per-op work on 16x16 images is too small to split: one thread is faster, and two threads
        # collapse (6x slower measured) when other processes share the cores.
        torch.set_num_threads(1)
    sampler, steps = sampler_and_steps(lm, args.sampler, args.steps)
    if args.eta and sampler != "ddim":
        raise UsageError(f"--eta: DDIM's eta applies to --sampler ddim only; this run samples with {sampler}")
    out = grid_path(args)
    scale = args.scale or max(1, 64 // lm.image_shape[-1])
    if out:
        check_grid(args.n, lm.image_shape[-2], lm.image_shape[-1], args.nrow, scale)
    check_memory(args.n, tuple(lm.image_shape))
    shards = generate(lm, args.n, args.batch_size, sampler, steps, args.seed, device, args.eta,
                      progress=args.progress and rank == 0, rank=rank, world=world)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        gathered = [None] * world
        dist.all_gather_object(gathered, shards)
        shards = {k: v for d in gathered for k, v in d.items()}
        dist.destroy_process_group()
        if rank != 0:
            return 0
    x = torch.cat([shards[i] for i in sorted(shards)])  # (n, C, H, W)
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    written = [p for p in (out, args.npz, args.png_dir and args.png_dir + "/") if p]
    # Every output written to a temporary name first and moved into place only once all are complete and on
    # disk: an error or Ctrl-C while writing leaves none of them, and no partial set of PNGs.
    try:
        files = [p for p in (out, args.npz) if p]
        with output_set(files, args.png_dir) as (tmps, folder):
            tmp = dict(zip(files, tmps))
            if out:
                save_grid(x, tmp[out], nrow=args.nrow, scale=scale)
            if args.npz:
                with open(tmp[args.npz], "wb") as f:
                    np.savez_compressed(f, images=imgs)
            if args.png_dir:
                from PIL import Image

                for i, im in enumerate(imgs):
                    Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(
                        os.path.join(folder, f"{i:06d}.png"), format="PNG")
    except OSError as exc:  # a full disk: name what was being written (none of it is left)
        raise OSError(f"cannot write {', '.join(written)} ({exc.strerror or one_line(exc)}); none of them was "
                      "written") from exc
    dt = time.perf_counter() - t0
    print(f"wrote {', '.join(written)}: {args.n} images {x.shape[-2]}x{x.shape[-1]} from {lm.source} ({sampler}, "
          f"{default_steps(lm, sampler, steps)} steps) in {dt:.1f} s", file=sys.stderr)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a training run or checkpoint folder")
    p.add_argument("--out", required=True, metavar="FILE.safetensors",
                   help="weights (the .json goes next to it)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"), help="default sampler of the model")
    p.add_argument("--steps", type=int, default=50, help="default steps of the model")


@command("export", "export a training checkpoint's weights as a model for `fastddpm sample --model`",
         _export_args)
def run_export(args: argparse.Namespace) -> int:
    from . import pretrained
    from ._io import check_output_file
    from .train.checkpoint import CheckpointError

    if args.steps < 1:
        raise UsageError(f"--steps: expected a positive integer, got {args.steps}")
    try:
        check_output_file(args.out, "--out", (".safetensors",))
        check_output_file(os.path.splitext(args.out)[0] + ".json", "--out (its .json)", (".json",))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        pretrained.export(args.ckpt, args.out, args.weights, args.sampler, args.steps)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:
        if str(exc).startswith(("steps: ", "out: ")):  # export()'s arguments are these flags
            raise UsageError(f"--{exc}") from exc
        raise
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json", file=sys.stderr)
    return 0
