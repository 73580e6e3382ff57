"""Loading a model to sample from: a built-in name, a training checkpoint, an exported model, or a
diffusers ``UNet2DModel`` folder.

An exported model is ``NAME.safetensors`` (the weights) next to ``NAME.json``::

    {"format": "fastddpm-model", "unet_config": {...}, "schedule": {...}, "prediction_type": "epsilon",
     "sampler": "ddim", "steps": 50, ...}

Built-in models are exported models inside the package (``fastddpm/assets/``), so they work offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ._errors import one_line
from ._io import has_ext
from .models.unet import UNet, UNetConfig
from .schedule import NoiseSchedule

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTIN = {"digits": "digits"}
MODEL_FORMAT = "fastddpm-model"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    sampler: str = "ddpm"
    steps: int | None = None
    source: str = ""
    info: dict = field(default_factory=dict)
    # A diffusers folder's scheduler (fastddpm's class, its config honoured): sampling runs diffusers'
    # pipeline loop with it instead of fastddpm.sample.
    scheduler: object = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.sample_size, c.sample_size)


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_exported(weights: str) -> LoadedModel:
    meta_path = os.path.splitext(weights)[0] + ".json"
    # The weights first: a wrong path would otherwise be reported as a missing metadata file.
    if not os.path.isfile(weights):
        what = "a folder, not a file" if os.path.isdir(weights) else "missing"
        raise FileNotFoundError(f"{weights}: the weights file is {what}")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{weights}: its metadata {meta_path} is missing")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    described = isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT
    if not (described and isinstance(meta.get("unet_config"), dict)):
        raise ValueError(f"{meta_path}: not a fastddpm model description (format tag or unet_config missing)")
    model = UNet(UNetConfig.from_dict(meta["unet_config"]))
    sd = _load_safetensors(weights)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as exc:  # e.g. the .safetensors of one export beside the .json of another
        raise ValueError(f"{weights}: the weights are not those of the network {meta_path} describes "
                         f"({one_line(exc, 200)})") from exc
    steps = meta.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"{meta_path}: steps: expected the model's default number of sampling steps (a positive "
                         f"integer) or null, got {steps!r}")
    from .ops import PREDICTION_TYPES
    from .samplers.plan import SAMPLERS

    pred, sampler = meta.get("prediction_type", "epsilon"), meta.get("sampler", "ddpm")
    if not isinstance(pred, str) or pred not in PREDICTION_TYPES:
        raise ValueError(f"{meta_path}: prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {pred!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"{meta_path}: sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    schedule = NoiseSchedule.from_settings(meta.get("schedule"), meta_path)
    return LoadedModel(model.eval(), schedule, pred, sampler, steps, weights, meta)


def load_builtin(name: str) -> LoadedModel:
    if name not in BUILTIN:
        if os.path.exists(name):  # a file or folder, but not an exported model
            raise ValueError(f"--model: {name!r} is not an exported model (NAME.safetensors beside NAME.json) "
                             f"nor a built-in one ({', '.join(BUILTIN)}); a training run or a diffusers folder "
                             "is --ckpt")
        raise ValueError(f"--model: unknown built-in model {name!r} (available: {', '.join(BUILTIN)})")
    path = os.path.join(ASSETS, BUILTIN[name] + ".safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model: the weights of {name!r} are not installed ({path} is missing)")
    return load_exported(path)


def load_training_checkpoint(path: str, weights: str = "ema") -> LoadedModel:
    from .train import checkpoint as ck

    folder = ck.resolve(path, "--ckpt")
    meta = ck.read_state(folder)
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights: expected ema or model, got {weights!r}")
    model = UNet(UNetConfig.from_dict(meta["unet_config"]))
    ck.load_weights(model, folder, f"{weights}.safetensors")
    cfg = meta.get("config", {})
    schedule = NoiseSchedule.from_settings(meta.get("schedule"), os.path.join(folder, "state.json"))
    # the steps training's own previews took: --sample-steps, at most the training timesteps
    steps = min(cfg.get("sample_steps", 50), schedule.num_train_timesteps)
    return LoadedModel(model.eval(), schedule, meta.get("prediction_type", "epsilon"), "ddim", steps, folder, meta)


def load_diffusers_folder(path: str) -> LoadedModel:
    """A diffusers pipeline or UNet2DModel folder, through the one loader (fastddpm/compat/folder.py):
    the UNet into a fastddpm.UNet, the scheduler config into fastddpm's scheduler, every field honoured
    or refused with an error naming it."""
    from .compat import folder as _folder
    from .samplers._common import DiffusersTables

    f = _folder.read(path)
    sched = _folder.load_scheduler(f)
    model = _folder.load_unet(f)
    sampler = "ddim" if type(sched).__name__ == "DDIMScheduler" else "ddpm"
    return LoadedModel(model, DiffusersTables(sched.betas), sched.config["prediction_type"], sampler, None,
                       f.root, {"diffusers_config": f.unet_config, "scheduler_config": dict(sched.config)},
                       scheduler=sched)


def load(model: str | None = None, ckpt: str | None = None, weights: str | None = None) -> LoadedModel:
    """``model``: a built-in name or an exported .safetensors; ``ckpt``: a training run/checkpoint folder
    or a diffusers UNet2DModel folder (config.json + weights). ``weights``: "ema" (the default) or "model",
    the set of a training checkpoint to load; refused with the others, which have one set."""
    if (model is None) == (ckpt is None):
        raise ValueError("--model, --ckpt: give exactly one")
    if weights is not None and model is not None:
        raise ValueError(f"--weights: picks the weights of a training checkpoint (--ckpt); the model {model!r} has "
                         "one set")
    if model is not None:
        if has_ext(model, ".safetensors"):
            try:
                return load_exported(model)
            except FileNotFoundError as exc:  # named as the flag that gave the path
                raise FileNotFoundError(f"--model: {exc}") from exc
            except ValueError as exc:  # (a subclass such as UnicodeDecodeError takes other arguments)
                raise ValueError(f"--model: {exc}") from exc
        return load_builtin(model)
    if not os.path.isdir(ckpt):
        if os.path.exists(ckpt):
            raise ValueError(f"--ckpt: {ckpt!r} is a file; expected a training run, checkpoint or diffusers folder"
                             f"{' (an exported model is --model)' if has_ext(ckpt, '.safetensors') else ''}")
        raise FileNotFoundError(f"--ckpt: no such folder {ckpt!r}")
    has = lambda *p: os.path.exists(os.path.join(ckpt, *p))
    run = has("train.log") or has("metrics.csv")  # a training run that has saved no checkpoint yet
    diffusers = has("config.json") and not (has("state.json") or has("checkpoints") or run)
    if run and not (has("state.json") or has("checkpoints")):
        raise FileNotFoundError(f"--ckpt: {ckpt!r} is a training run that has saved no checkpoint (its train.log "
                                "says how it ended)")
    if diffusers or has("unet", "config.json") or has("model_index.json"):
        if weights is not None:
            raise ValueError(f"--weights: picks the weights of a training checkpoint; {ckpt!r} is a diffusers "
                             "folder, which has one set")
        return load_diffusers_folder(ckpt)
    return load_training_checkpoint(ckpt, weights or "ema")


def export(ckpt: str, out: str, weights: str = "ema", sampler: str = "ddim", steps: int = 50,
           extra: dict | None = None) -> str:
    """Write a training checkpoint's weights as an exported model ``out`` (.safetensors + .json)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ._io import atomic_path
    from .samplers.plan import SAMPLERS

    out = os.fspath(out)
    if not has_ext(out, ".safetensors"):  # load() reads NAME.safetensors beside NAME.json only
        raise ValueError(f"out: expected a file name ending in .safetensors, got {out!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    lm = load_training_checkpoint(ckpt, weights)
    T = lm.schedule.num_train_timesteps
    most = T - 1 if sampler == "dpm++2m" else T  # (DPM-Solver++'s spacing repeats a timestep beyond T - 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        limit = f"its {T}" if most == T else f"{most} (DPM-Solver++: fewer than its {T})"
        raise ValueError(f"steps: expected the model's default number of sampling steps, 1 to {limit} "
                         f"training timesteps, got {steps!r}")
    _check_not_an_input(out, lm.source)
    # (the schedule is what the checkpoint's state.json names, or the default it was read with)
    meta = {"format": MODEL_FORMAT, "unet_config": lm.model.config.to_dict(), "schedule": lm.schedule.settings(),
            "prediction_type": lm.prediction_type, "sampler": sampler, "steps": steps,
            "trained_steps": lm.info["step"], "weights": weights, "train_config": lm.info.get("config")}
    meta.update(extra or {})
    sd = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    # Both files written to temporary names first, then renamed one right after the other: an interrupted
    # export leaves the previous pair, not a new .json beside old weights.
    try:
        with atomic_path(out) as tmp_w, atomic_path(os.path.splitext(out)[0] + ".json") as tmp_j:
            save_file(sd, tmp_w, metadata={"format": MODEL_FORMAT})
            with open(tmp_j, "w") as f:
                json.dump(meta, f, indent=1)
    except SafetensorError as exc:  # a full disk: safetensors' error is no OSError (the temporary files are gone)
        raise OSError(f"{out}: cannot write the exported model ({one_line(exc, 200)})") from exc
    return out


def _check_not_an_input(out: str, ckpt: str) -> None:
    """``out`` and its .json must not land in the checkpoint folder, or among the run's checkpoints, or over a
    file of the run folder above them (config.json, train.log, ...) other than an earlier export: writing
    there would destroy what is being exported, or the run."""
    ckpt = os.path.realpath(ckpt)
    parent = os.path.dirname(ckpt)
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
    guarded = parent if run is not None else ckpt  # every checkpoint of the run, or this one
    meta = os.path.splitext(out)[0] + ".json"
    for path in (out, meta):
        real = os.path.realpath(path)
        if real == guarded or real.startswith(guarded + os.sep):
            where = "among the run's checkpoints in " + guarded if run is not None else "inside the checkpoint " + ckpt
        elif run is not None and os.path.dirname(real) == run and os.path.isfile(real) and not (
                has_ext(out, ".safetensors") and _is_export(meta)):  # (an earlier export's pair may be replaced)
            where = "a file of the training run " + run
        else:
            continue
        raise ValueError(f"out: {path!r} is {where}: writing it would destroy the input; export elsewhere")


def _is_export(meta_path: str) -> bool:
    """Whether ``meta_path`` is the description of an exported model (which an export may replace)."""
    try:
        with open(meta_path) as f:
            return json.load(f).get("format") == MODEL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
