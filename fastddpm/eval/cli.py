"""`fastddpm eval`: sample quality of a digits model (Frechet distance to held-out digits, confidence)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..cli import UsageError, command


def _args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a built-in model (digits) or an exported .safetensors")
    src.add_argument("--ckpt", metavar="DIR", help="a training run or checkpoint folder")
    src.add_argument("--npz", metavar="FILE.npz", help="images already sampled (fastddpm sample --npz)")
    src.add_argument("--real", choices=("train", "noise"),
                     help="baselines: n real train-split digits (the floor) or n Gaussian-noise images "
                          "clipped to [-1, 1] (the ceiling)")
    p.add_argument("--n", type=int, default=359,
                   help="images to compare (default: 359, the size of the test split)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), help="default: the model's")
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--classifier", help="classifier weights (default: the shipped digits classifier)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--train-classifier", metavar="OUT.safetensors",
                   help="instead: train the digit classifier on the train split and write it "
                        "(about 5 minutes)")


@command("eval", "sample quality of a digits model: Frechet distance to held-out digits and classifier "
         "confidence", _args)
def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from . import metrics

    if args.threads < 0:
        raise UsageError(f"--threads: expected 0 (torch's default) or a positive integer, got {args.threads}")
    from .._io import check_output_file

    try:  # before the work: where the results go
        if args.json:
            check_output_file(args.json, "--json")
        if args.train_classifier:
            check_output_file(args.train_classifier, "--train-classifier", (".safetensors",))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.model and args.model.endswith(".safetensors") and not os.path.isfile(args.model):
        raise UsageError(f"--model: no such file {args.model!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_classifier:
        model, acc = metrics.train_classifier(log=lambda s: print(s, file=sys.stderr))
        metrics.save_classifier(model, args.train_classifier)
        print(f"wrote {args.train_classifier}: test accuracy {acc:.4f}")
        return 0
    if args.n < 2:
        raise UsageError(f"--n: expected at least 2, got {args.n}")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    what = ""
    if args.real == "train":
        from ..train.data import digits_split

        x, _ = digits_split("train", 16)
        if args.n > len(x):
            raise UsageError(f"--n: the train split has {len(x)} images, asked for {args.n}")
        x = x[torch.randperm(len(x), generator=g)[: args.n]]
        what = "real digits (train split)"
    elif args.real == "noise":
        x = torch.randn((args.n, 1, 16, 16), generator=g).clamp(-1, 1)
        what = "Gaussian noise"
    elif args.npz:
        import zipfile
        import zlib

        from .._io import read_npz_or_npy

        z = read_npz_or_npy(args.npz, "--npz")
        try:
            a = z if isinstance(z, np.ndarray) else z["images"]
        except KeyError as exc:
            raise UsageError(f"--npz: {args.npz!r} has no array 'images' (fastddpm sample --npz writes it)") \
                from exc
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UsageError(f"--npz: {args.npz!r} is a truncated or corrupt .npz file ({exc})") from exc
        finally:
            if hasattr(z, "close"):
                z.close()
        if a.ndim != 4 or a.shape[-1] != 1:
            raise UsageError(f"--npz: expected 'images' (N, 16, 16, 1) uint8, got {a.shape}")
        x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
        what = args.npz
    else:
        from .. import pretrained
        from ..sampling_cli import generate

        lm = pretrained.load(args.model if args.model or args.ckpt else "digits", args.ckpt)
        sampler = args.sampler or lm.sampler
        steps = args.steps if args.steps is not None else (lm.steps if sampler == lm.sampler else None)
        shards = generate(lm, args.n, args.batch_size, sampler, steps, args.seed, torch.device("cpu"),
                          progress=True)
        x = torch.cat([shards[i] for i in sorted(shards)])
        # Quantise as a saved PNG would, so the numbers match `fastddpm sample --npz` + `eval --npz`.
        x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        what = f"{lm.source} ({sampler}, {steps or lm.schedule.num_train_timesteps} steps)"
    clf = metrics.load_classifier(args.classifier)
    r = metrics.evaluate(x, clf)
    r["what"] = what
    r["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{what}: FD {r['fd']:.2f} (n={r['n']} vs 359 held-out), confidence {r['confidence']:.4f}, "
          f"> 0.9: {r['confident_0.9']:.3f}, class entropy {r['class_entropy_bits']:.3f} bits, "
          f"classes {r['class_counts']}")
    if args.json:
        from .._io import atomic_path

        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(r, f, indent=1)
    return 0
