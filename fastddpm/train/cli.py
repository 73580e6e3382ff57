"""`fastddpm train`: every TrainConfig field is a flag; --config FILE.toml supplies defaults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .._fields import env_int
from ..cli import UsageError, command
from .config import FIELDS, TrainConfig

_HELP = {
    "data": "an image folder (PNG/JPEG), an .npy/.npz array, or 'digits' (scikit-learn, train split)",
    "model": "a preset (digits, tiny, ddpm_cifar10) or a UNetConfig .json file",
    "unet": "UNetConfig overrides of the preset as JSON, e.g. '{\"base_channels\": 16}' (over --config's [unet] "
            "table field by field)",
    "image_size": "side of the square training images (default: 16 for digits, else the data's)",
    "objective": "what the network predicts: eps, x0 or v",
    "steps": "total optimiser steps (on resume: the new total)",
    "batch_size": "global batch size (split evenly across torchrun processes)",
    "warmup": "linear learning-rate warm-up steps",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "ema_decay": "EMA decay (with --ema-warmup: min(decay, (1+n)/(10+n)))",
    "amp": "mixed precision (CUDA only; refused on the CPU, where bf16 autocast crashes this machine)",
    "save_every": "write a checkpoint every N steps (and always at the end)",
    "keep": "number of newest checkpoints kept",
    "sample_every": "write a grid of EMA samples every N steps (0: never)",
    "out": "run folder: checkpoints/, samples/, metrics.csv, loss.png, config.json",
    "device": "auto, cpu, cuda, cuda:1 ...",
    "threads": "torch intra-op threads (0: torch's default)",
    "workers": "processes that decode and resize an image folder's images as batches need them (0: the "
               "training process)",
    "flip": "random horizontal flips",
}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    p.add_argument("--resume", metavar="DIR|latest",
                   help="continue from a checkpoint folder, a run folder, or 'latest' (under --out; where --out "
                        "holds no checkpoint yet, a new run starts there)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        h = _HELP.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        h = (h + f" (default: {default})").strip() if f.name != "unet" and "(default:" not in h else h
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif f.name == "unet":
            p.add_argument(flag, default=None, metavar="JSON", help=h)
        else:
            typ = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, type=typ, default=None, help=h)


@command("train", "train a DDPM (single process, or several under torchrun)", _add_arguments)
def run(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .config import build_config
    from .loop import TrainingError, train

    cli = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if "unet" in cli:
        try:
            cli["unet"] = json.loads(cli["unet"])
        except json.JSONDecodeError as exc:
            raise UsageError(f"--unet: not valid JSON: {exc}") from exc
        if not isinstance(cli["unet"], dict):  # (null was dropped as "not given")
            raise UsageError(f"--unet: expected a JSON object of UNetConfig fields, got {args.unet}")
    if args.resume == "":  # (was taken as no --resume: a new run)
        raise UsageError("--resume: expected a checkpoint folder, a run folder or 'latest', got ''")
    try:
        cfg = build_config(args.config, cli)
        given = set(cli)
        if args.config is not None:
            from .config import read_toml

            given |= set(read_toml(args.config))
        summary = train(cfg, resume=args.resume, given=given, log=lambda s: print(s, file=sys.stderr))
    except checkpoint.CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    except ValueError as exc:  # the data's errors name TrainConfig.data, which is --data here
        if str(exc).startswith("data: "):
            raise UsageError("--data: " + str(exc)[len("data: "):]) from exc
        raise
    except TrainingError as exc:
        print(f"fastddpm train: error: {exc}", file=sys.stderr)
        return 1
    if env_int("RANK", 0) != 0:  # under torchrun, rank 0 reports for every process
        return 0
    if summary["stopped_by"]:
        print(f"fastddpm train: stopped by {summary['stopped_by']} at step {summary['step']}; checkpoint "
              f"{summary['checkpoint']}; continue with --resume {summary['out']}", file=sys.stderr)
        return 0
    loss = "no step taken" if summary["loss"] is None else f"loss {summary['loss']:.4g}"
    print(f"trained to step {summary['step']}, {loss}; checkpoint {summary['checkpoint']}", file=sys.stderr)
    return 0
