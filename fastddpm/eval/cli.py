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
    src.add_argument("--ckpt", metavar="DIR", help="a training run or checkpoint folder, or a local diffusers "
                     "pipeline/UNet2DModel folder (sampled with its scheduler config)")
    src.add_argument("--npz", metavar="FILE.npz", help="images already sampled (fastddpm sample --npz)")
    src.add_argument("--real", choices=("train", "noise"),
                     help="baselines: n real train-split digits (the floor) or n Gaussian-noise images "
                          "clipped to [-1, 1] (the ceiling)")
    p.add_argument("--n", type=int, default=359,
                   help="images to compare (default: 359, the size of the test split)")
    p.add_argument("--batch-size", type=int,
                   help="images per sampling batch (default: all n in one; batch i of seed s draws with seed s + i)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++2m"), help="default: the model's")
    p.add_argument("--steps", type=int, help="default: the model's")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", metavar="S1,S2,...",
                       help="evaluate once per seed and report the mean and spread of each figure over them")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--classifier", help="classifier weights (default: the shipped digits classifier)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--train-classifier", metavar="OUT.safetensors",
                   help="instead: train the digit classifier on the train split and write it "
                        "(about 5 minutes)")


@command("eval", "sample quality of a digits model: Frechet distance to held-out digits and classifier "
         "confidence", _args)
def run(args: argparse.Namespace) -> int:
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
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    batch_size = args.batch_size if args.batch_size is not None else args.n
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive integer, got {batch_size}")
    nb = -(-args.n // batch_size)
    if nb > 1 and any(0 < abs(a - b) < nb for a in seeds for b in seeds):
        raise UsageError(f"--seeds: with {nb} batches per seed (batch i of seed s draws with seed s + i), seeds "
                         f"less than {nb} apart share batches; spread them or pass --batch-size {args.n}")
    clf = metrics.load_classifier(args.classifier)
    runs = []
    for seed in seeds:
        r = _evaluate_one(args, seed, batch_size, clf)
        print(f"{r['what']}: FD {r['fd']:.2f} (n={r['n']} vs 359 held-out), confidence {r['confidence']:.4f}, "
              f"> 0.9: {r['confident_0.9']:.3f}, class entropy {r['class_entropy_bits']:.3f} bits, "
              f"classes {r['class_counts']}" + (f" [seed {seed}]" if args.seeds is not None else ""))
        runs.append(r)
    if args.seeds is None:
        out = runs[0]
    else:
        out = summarize(runs, seeds)
        fd = out["fd"]
        print(f"{out['what']}: FD {fd['mean']:.2f} +- {fd['std']:.2f} (mean +- sample std over {len(seeds)} seeds "
              f"{args.seeds}; min {fd['min']:.2f}, max {fd['max']:.2f}), confidence "
              f"{out['confidence']['mean']:.4f} +- {out['confidence']['std']:.4f}")
    if args.json:
        from .._io import atomic_path

        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers such as 1,2,3, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds: expected distinct non-negative integers such as 1,2,3, got {text!r}")
    return seeds


SUMMARIZED = ("fd", "confidence", "confident_0.9", "class_entropy_bits")


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    """Mean, sample standard deviation (ddof 1; 0 for one seed), min and max of each figure over the runs."""
    import numpy as np

    out = {"what": runs[0]["what"], "n": runs[0]["n"], "seeds": list(seeds), "runs": runs,
           "seconds": round(sum(r["seconds"] for r in runs), 1)}
    for k in SUMMARIZED:
        v = np.array([float(r[k]) for r in runs])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "min": float(v.min()), "max": float(v.max())}
    return out


def _evaluate_one(args: argparse.Namespace, seed: int, batch_size: int, clf) -> dict:
    import numpy as np
    import torch

    from . import metrics

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
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
        from ..sampling_cli import default_steps, generate

        lm = pretrained.load(args.model if args.model or args.ckpt else "digits", args.ckpt)
        sampler = args.sampler or lm.sampler
        steps = args.steps if args.steps is not None else (lm.steps if sampler == lm.sampler else None)
        shards = generate(lm, args.n, batch_size, sampler, steps, seed, torch.device("cpu"), progress=True)
        x = torch.cat([shards[i] for i in sorted(shards)])
        # Quantise as a saved PNG would, so the numbers match `fastddpm sample --npz` + `eval --npz`.
        x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
        what = f"{lm.source} ({sampler}, {default_steps(lm, sampler, steps)} steps)"
    r = metrics.evaluate(x, clf)
    r["what"] = what
    r["seed"] = seed
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r
