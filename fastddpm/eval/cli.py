"""`fastddpm eval`: sample quality of a digits model (Frechet distance to held-out digits, confidence)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..cli import UsageError, check_paths_given, check_seed, check_threads, command


def _args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a built-in model (digits) or an exported .safetensors")
    src.add_argument("--ckpt", metavar="DIR", help="a training run or checkpoint folder, or a local diffusers "
                     "pipeline/UNet2DModel folder (sampled with its scheduler config)")
    src.add_argument("--npz", metavar="FILE.npz", help="images already sampled (fastddpm sample --npz)")
    src.add_argument("--real", choices=("train", "noise"),
                     help="baselines: n real train-split digits (the floor) or n Gaussian-noise images "
                          "clipped to [-1, 1] (the ceiling)")
    p.add_argument("--n", type=int,
                   help="images to compare (default: 359, the size of the test split; with --npz, all the "
                        "file's images, or its first n)")
    p.add_argument("--batch-size", type=int,
                   help="images per sampling batch (default: all n in one; batch i of seed s draws with seed s + i)")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++2m"), help="default: the model's")
    p.add_argument("--steps", type=int, help="default: the model's")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="default 0")
    seeds.add_argument("--seeds", metavar="S1,S2,...",
                       help="evaluate once per seed (at least two, distinct) and report the mean and spread of "
                            "each figure over them")
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

    check_threads(args.threads)
    seed_given = args.seed is not None
    args.seed = args.seed if seed_given else 0
    check_seed(args.seed)
    check_paths_given(args, "--model", "--ckpt", "--npz", "--classifier", "--json", "--train-classifier")
    from .._io import check_output_file, has_ext

    try:  # before the work: where the results go
        if args.json:
            check_output_file(args.json, "--json", (".json",))
        if args.train_classifier:
            check_output_file(args.train_classifier, "--train-classifier", (".safetensors",))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # an output over an input would destroy it (the exported model's description is NAME.json)
    model_json = os.path.splitext(args.model)[0] + ".json" if args.model and has_ext(args.model, ".safetensors") \
        else None
    inputs = {"--npz": args.npz, "--classifier": args.classifier, "--model": args.model,
              "--model (its .json)": model_json}
    for out_flag in ("--json", "--train-classifier"):
        out = getattr(args, out_flag[2:].replace("-", "_"))
        for in_flag, path in inputs.items():
            if out and path and os.path.realpath(out) == os.path.realpath(path):
                raise UsageError(f"{out_flag}: {out!r} is the {in_flag} file: writing it would destroy the input")
    if args.json and args.npz is None and args.real is None:
        _check_json_is_no_model_file(args.json, args.model, args.ckpt)
    if args.model and has_ext(args.model, ".safetensors") and not os.path.isfile(args.model):
        raise UsageError(f"--model: no such file {args.model!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_classifier:  # it trains on the train split: an evaluation option would be ignored
        unused = [f for f, v in (("--model", args.model), ("--ckpt", args.ckpt), ("--npz", args.npz),
                                 ("--real", args.real), ("--n", args.n), ("--batch-size", args.batch_size),
                                 ("--sampler", args.sampler), ("--steps", args.steps), ("--seeds", args.seeds),
                                 ("--classifier", args.classifier), ("--json", args.json)) if v is not None]
        if unused:
            raise UsageError(f"{', '.join(unused)}: not used with --train-classifier (it trains the classifier on "
                             "the train split and writes it; --seed and --threads apply)")
        model, acc = metrics.train_classifier(seed=args.seed, log=lambda s: print(s, file=sys.stderr))
        metrics.save_classifier(model, args.train_classifier)
        print(f"wrote {args.train_classifier}: test accuracy {acc:.4f}")
        return 0
    if args.n is not None and args.n < 2:
        raise UsageError(f"--n: expected at least 2, got {args.n}")
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    if args.npz and seed_given:  # (it was recorded in the result as if it had drawn the images)
        raise UsageError("--seed: --npz images are already drawn; the seed is the one they were sampled with")
    if args.npz and args.seeds is not None:
        raise UsageError("--seeds: --npz images are already drawn, so every seed would give the same figures; "
                         "sample the file once per seed and evaluate each")
    if args.npz or args.real:  # no sampling: a sampling option would be ignored, which hides a mistake
        given = [f for f, v in (("--sampler", args.sampler), ("--steps", args.steps),
                                ("--batch-size", args.batch_size)) if v is not None]
        if given:
            src = "--npz (its images are already drawn)" if args.npz else f"--real {args.real} (nothing is sampled)"
            what = "a sampling option" if len(given) == 1 else "sampling options"
            raise UsageError(f"{', '.join(given)}: {what}, not used with {src}")
    # Everything read and checked before the work (sampling n images can take minutes).
    images = _read_npz(args.npz, args.n) if args.npz else None
    args.n = len(images) if images is not None else (args.n if args.n is not None else 359)
    batch_size = args.batch_size if args.batch_size is not None else args.n
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive integer, got {batch_size}")
    nb = -(-args.n // batch_size)
    if nb > 1 and any(0 < abs(a - b) < nb for a in seeds for b in seeds):
        raise UsageError(f"--seeds: with {nb} batches per seed (batch i of seed s draws with seed s + i), seeds "
                         f"less than {nb} apart share batches; spread them or pass --batch-size {args.n}")
    clf = _classifier(args.classifier)
    model = _load_model(args) if images is None and args.real is None else None
    runs = []
    for seed in seeds:
        r = _evaluate_one(args, seed, batch_size, clf, model, images)
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


def _check_json_is_no_model_file(out: str, model: str | None, ckpt: str | None) -> None:
    """--json must not replace a file of the model evaluated: a file of the --ckpt folder (or of the training
    run above a checkpoint), or of the built-in models, other than an earlier result (a new file there is
    fine). Writing one made the model unreadable (a checkpoint's state.json, the built-in digits.json)."""
    from ..pretrained import ASSETS, BUILTIN

    if ckpt is not None:
        guarded, what = os.path.realpath(ckpt), f"a file of the --ckpt folder {ckpt}"
        if os.path.basename(os.path.dirname(guarded)) == "checkpoints":
            guarded, what = os.path.dirname(os.path.dirname(guarded)), f"a file of the training run of --ckpt {ckpt}"
    elif (model or "digits") in BUILTIN:
        guarded, what = os.path.realpath(ASSETS), "a file of the built-in models"
    else:
        return  # an exported model's own pair is checked with the other inputs
    real = os.path.realpath(out)
    if real.startswith(guarded + os.sep) and os.path.isfile(real) and not _earlier_result(real):
        raise UsageError(f"--json: {out!r} is {what}: writing it would destroy the input")


def _earlier_result(path: str) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "fd" in d and "confidence" in d


def _parse_seeds(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    if any(not s for s in items):
        raise UsageError(f"--seeds: expected comma-separated integers such as 1,2,3 with no empty item, got {text!r}")
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers such as 1,2,3, got {text!r}") from None
    if any(not 0 <= s < 2**63 for s in seeds):
        raise UsageError(f"--seeds: expected integers in [0, 2**63), got {text!r}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise UsageError(f"--seeds: expected distinct seeds, got {', '.join(map(str, dup))} more than once in {text!r}")
    if len(seeds) < 2:
        raise UsageError(f"--seeds: expected at least two seeds (the spread of one value is undefined), got "
                         f"{text!r}; use --seed {seeds[0]} for one evaluation")
    return seeds


def _classifier(path: str | None):
    """The classifier, loaded before the work; a bad --classifier is a usage error naming it."""
    from . import metrics

    if path is None:
        return metrics.load_classifier()
    try:
        return metrics.load_classifier(path)
    except FileNotFoundError:
        raise UsageError(f"--classifier: no such file {path!r}") from None
    except ValueError as exc:
        raise UsageError(f"--classifier: {exc}") from exc


# The images the digits classifier (and the held-out reference set) are made of: (C, H, W).
DIGITS_SHAPE = (1, 16, 16)


def _read_npz(path: str, n: int | None):
    """The 'images' of an .npz written by ``fastddpm sample --npz`` (uint8, (N, 16, 16, 1)) as (N, 1, 16, 16)
    float in [-1, 1]: all of them, or the first n."""
    import zipfile
    import zlib

    import numpy as np
    import torch

    from .._io import read_npz_or_npy

    try:
        z = read_npz_or_npy(path, "--npz")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    try:
        a = z if isinstance(z, np.ndarray) else z["images"]
    except KeyError as exc:
        raise UsageError(f"--npz: {path!r} has no array 'images' (fastddpm sample --npz writes it)") from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UsageError(f"--npz: {path!r} is a truncated or corrupt .npz file ({exc})") from exc
    finally:
        if hasattr(z, "close"):
            z.close()
    want = "'images' (N, 16, 16, 1) uint8 in 0..255, as fastddpm sample --npz writes"
    if a.ndim != 4 or a.shape[1:] != (16, 16, 1):
        raise UsageError(f"--npz: expected {want}; got shape {a.shape}")
    if a.dtype != np.uint8:
        raise UsageError(f"--npz: expected {want}; got dtype {a.dtype}")
    if n is not None and n > len(a):
        raise UsageError(f"--n: {path!r} holds {len(a)} images, asked for {n}")
    if len(a) < 2:
        raise UsageError(f"--npz: {path!r} holds {len(a)} image(s); expected at least 2 for a covariance")
    a = a[:n] if n is not None else a
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _load_model(args: argparse.Namespace):
    """(model, sampler, steps): the model to sample from, loaded and checked (it must make 1x16x16 digits)
    before any sampling, with the sampler and steps it samples with."""
    from .. import pretrained

    lm = pretrained.load(args.model if args.model or args.ckpt else "digits", args.ckpt)
    if tuple(lm.image_shape) != DIGITS_SHAPE:
        flag = "--model" if args.model else "--ckpt"
        c, h, w = lm.image_shape
        raise UsageError(f"{flag}: {lm.source or args.model or args.ckpt} makes {c}x{h}x{w} images; the digits "
                         "evaluation needs 1x16x16 (a model trained on digits at --image-size 16)")
    from ..sampling_cli import sampler_and_steps

    return (lm, *sampler_and_steps(lm, args.sampler, args.steps))


SUMMARIZED = ("fd", "confidence", "confident_0.9", "class_entropy_bits")


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    """Mean, sample standard deviation (ddof 1), min and max of each figure over the runs (at least two:
    the sample standard deviation of one value is undefined)."""
    import numpy as np

    if len(runs) < 2:
        raise ValueError(f"seeds: expected at least two runs to summarize, got {len(runs)}")

    out = {"what": runs[0]["what"], "n": runs[0]["n"], "seeds": list(seeds), "runs": runs,
           "seconds": round(sum(r["seconds"] for r in runs), 1)}
    for k in SUMMARIZED:
        v = np.array([float(r[k]) for r in runs])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)),
                  "min": float(v.min()), "max": float(v.max())}
    return out


def _evaluate_one(args: argparse.Namespace, seed: int, batch_size: int, clf, model=None, images=None) -> dict:
    """One evaluation: of ``images`` (read from --npz), real or noise images (--real), or n images that
    ``model`` ((model, sampler, steps) from _load_model) samples with ``seed``."""
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
        x = torch.randn((args.n, *DIGITS_SHAPE), generator=g).clamp(-1, 1)
        what = "Gaussian noise"
    elif images is not None:
        x = images
        what = args.npz
    else:
        from ..sampling_cli import default_steps, generate

        lm, sampler, steps = model
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
