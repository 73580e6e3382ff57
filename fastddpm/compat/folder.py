"""One reader for a diffusers folder: a pipeline folder (model_index.json, unet/, scheduler/) or a bare
``UNet2DModel`` folder (config.json + weights). :meth:`fastddpm.DDPMPipeline.from_pretrained` and the
command line (``fastddpm sample --ckpt``, ``fastddpm eval --ckpt``) both load through it, and it works
without diffusers installed.

The scheduler config becomes fastddpm's DDPMScheduler or DDIMScheduler, which take every field of
diffusers' classes with the same meaning, so every field that changes the numbers (variance_type,
trained_betas, clip_sample and clip_sample_range, thresholding, prediction_type, timestep_spacing,
steps_offset, set_alpha_to_one, rescale_betas_zero_snr) is honoured. A field neither class knows, a
value it cannot step with, or another scheduler class is refused with an error naming it: a number-
changing setting is never dropped silently (the other class's fields, which diffusers' scheduler swap
leaves in a config, change nothing in this one). Local folders only (no model hub).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch

from .._errors import one_line

__all__ = ["DiffusersFolder", "FolderError", "read", "load_unet_state_dict", "load_unet", "load_scheduler",
           "switch_scheduler", "SCHEDULER_CLASSES"]

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class FolderError(ValueError):
    """A diffusers folder fastddpm cannot load as asked; the message names the file and field."""


@dataclass
class DiffusersFolder:
    root: str                      # the folder given
    unet_dir: str                  # the folder holding the UNet's config.json and weights
    unet_config: dict
    scheduler_class: str | None    # "DDPMScheduler", ... (None: no scheduler folder)
    scheduler_config: dict | None
    scheduler_path: str | None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise FolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FolderError(f"{path}: expected a JSON object of settings, got a {type(data).__name__}")
    return data


def read(path: str | os.PathLike) -> DiffusersFolder:
    """The configs of a local diffusers pipeline or UNet2DModel folder (no weights read yet)."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FolderError(
            f"{root}: not a local folder (fastddpm loads diffusers folders from disk only; fetch a hub "
            "repository first, e.g. with `huggingface-cli download`)")
    index = os.path.join(root, "model_index.json")
    sched_class = None
    if os.path.isfile(index):
        mi = _read_json(index)
        unet_entry = mi.get("unet")
        if not (isinstance(unet_entry, list) and len(unet_entry) == 2 and unet_entry[1] == "UNet2DModel"):
            raise FolderError(f"{index}: unet is {unet_entry!r}; fastddpm loads a UNet2DModel")
        entry = mi.get("scheduler")
        if isinstance(entry, list) and len(entry) == 2:
            sched_class = entry[1]
        if sched_class is None:
            raise FolderError(f"{index}: scheduler is {entry!r}; expected [library, class name]")
        unet_dir = os.path.join(root, "unet")
    elif os.path.isdir(os.path.join(root, "unet")):  # diffusers refuses it too: which scheduler goes with it?
        raise FolderError(f"{root}: a unet/ folder but no model_index.json: an interrupted save_pretrained, or not "
                          f"a pipeline (load the UNet2DModel folder itself: {os.path.join(root, 'unet')})")
    else:
        unet_dir = root
        if any(os.path.exists(os.path.join(root, n)) for n in ("state.json", "checkpoints", "train.log")):
            raise FolderError(f"{root}: a fastddpm training run or checkpoint, not a diffusers folder: sample it "
                              "with `fastddpm sample --ckpt`, or `fastddpm export` it and load that")
    conf_path = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(conf_path):
        raise FolderError(f"{root}: no model_index.json, unet/config.json or config.json: not a diffusers folder")
    conf = _read_json(conf_path)
    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise FolderError(f"{conf_path}: _class_name is {conf.get('_class_name')!r}; fastddpm loads a UNet2DModel")
    sc_path = os.path.join(root, "scheduler", "scheduler_config.json")
    sc = None
    if os.path.isfile(sc_path):
        sc = _read_json(sc_path)
        sched_class = sc.get("_class_name", sched_class)
    elif sched_class is not None:
        raise FolderError(f"{index}: names a scheduler, but {sc_path} is missing")
    return DiffusersFolder(root, unet_dir, conf, sched_class, sc, sc_path if sc is not None else None)


def load_unet_state_dict(folder: DiffusersFolder) -> dict[str, torch.Tensor]:
    for name in WEIGHTS:
        p = os.path.join(folder.unet_dir, name)
        if os.path.isfile(p):
            if name.endswith(".safetensors"):
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    return load_file(p)
                except (SafetensorError, OSError) as exc:
                    raise FolderError(f"{p}: not a readable safetensors file ({exc})") from exc
            try:
                sd = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or foreign file: zip, pickle, EOF and key errors alike
                raise FolderError(f"{p}: not a readable PyTorch weights file (truncated or corrupt? "
                                  f"{one_line(exc, 200)})") from exc
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise FolderError(f"{p}: expected a state dict (names to tensors), got {type(sd).__name__}")
            return sd
    raise FolderError(f"{folder.unet_dir}: no {' or '.join(WEIGHTS)}")


def load_unet(folder: DiffusersFolder):
    """A :class:`fastddpm.UNet` with the folder's UNet2DModel configuration and weights (float32, eval).

    Raises :class:`fastddpm.compat.diffusers.UnsupportedDiffusersConfig` naming the option outside the
    DDPM family fastddpm.UNet builds.
    """
    from ..models.unet import UNet
    from .diffusers import config_from_diffusers, state_dict_from_diffusers

    model = UNet(config_from_diffusers(folder.unet_config))
    sd = state_dict_from_diffusers(load_unet_state_dict(folder))
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    except RuntimeError as exc:  # weights of another network than config.json describes, or another key layout
        raise FolderError(f"{folder.unet_dir}: the weights are not those of the UNet2DModel its config.json "
                          f"describes ({one_line(exc, 300)})") from exc
    return model.eval()


def _scheduler_cls(name: str):
    from ..samplers.ddim import DDIMScheduler
    from ..samplers.ddpm import DDPMScheduler

    return {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[name]


def load_scheduler(folder: DiffusersFolder, sampler: str | None = None, backend: str = "auto"):
    """fastddpm's scheduler for the folder's scheduler config, every field honoured or refused.

    ``sampler`` ("ddpm" or "ddim") switches class as diffusers' ``from_config`` does (the fields the
    other class shares carry over). A folder without a scheduler gets diffusers' DDPMScheduler defaults.
    """
    import warnings

    name = folder.scheduler_class or "DDPMScheduler"
    where = folder.scheduler_path or folder.root
    if name not in SCHEDULER_CLASSES:
        raise FolderError(
            f"{where}: scheduler _class_name {name!r} is not supported by fastddpm (expected "
            f"{' or '.join(SCHEDULER_CLASSES)})")
    cls = _scheduler_cls(name)
    config = dict(folder.scheduler_config or {})
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "backend"}
    # The other class's fields: diffusers' from_config carries them along when a pipeline's scheduler is
    # swapped (DDPM's variance_type into a DDIM config, DDIM's set_alpha_to_one into a DDPM one), its
    # save_pretrained writes them, and this class, like diffusers', does not read them. They stay in the
    # config, as in diffusers, so that switching back (--sampler) gets them again.
    other = next(n for n in SCHEDULER_CLASSES if n != name)
    known |= set(inspect.signature(_scheduler_cls(other).__init__).parameters) - {"self", "backend"}
    for key in sorted(config):
        if not key.startswith("_") and key not in known:
            raise FolderError(
                f"{where}: field {key!r} is not one fastddpm.{name} knows; refusing to load rather than "
                "ignore a setting that may change the samples")
    if name == "DDPMScheduler":
        vt = config.get("variance_type", "fixed_small")
        from ..samplers.ddpm import VARIANCE_TYPES

        if vt not in VARIANCE_TYPES or vt == "fixed_large_log":
            raise FolderError(
                f"{where}: variance_type={vt!r} cannot be sampled by fastddpm (expected one of "
                f"{', '.join(v for v in VARIANCE_TYPES if v != 'fixed_large_log')})")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # what diffusers accepts with a warning is refused here
        try:
            sched = cls.from_config(config, backend=backend)
        except (UserWarning, ValueError, NotImplementedError) as exc:
            raise FolderError(f"{where}: {exc}") from exc
    return sched if sampler is None else switch_scheduler(sched, sampler, backend)


def switch_scheduler(sched, sampler: str, backend: str = "auto"):
    """``sched`` as the scheduler of ``sampler`` ("ddpm" or "ddim"): the same object when it is already
    that class, else the other class from its config (diffusers' from_config: shared fields carry over;
    DDPM's variance_type has no meaning for DDIM, which draws its noise through eta)."""
    target = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler"}.get(sampler)
    if target is None:
        raise FolderError(
            f"--sampler: a diffusers folder samples with its own scheduler config, as 'ddpm' or 'ddim'; "
            f"got {sampler!r}")
    if type(sched).__name__ == target:
        return sched
    return _scheduler_cls(target).from_config(sched.config, backend=backend)
