"""fastddpm.DDPMPipeline: a drop-in for diffusers.DDPMPipeline on fastddpm's schedulers.

The same call and output as diffusers' (batch_size, generator, num_inference_steps, output_type
"pil"/"np"/"pt"/"latent", return_dict); the unet may be a fastddpm UNet or a diffusers UNet2DModel
(patched with fastddpm.patch or not), the scheduler fastddpm's (or diffusers') DDPMScheduler or
DDIMScheduler. ``from_pretrained``/``save_pretrained`` read and write diffusers' folder layout
(model_index.json, unet/, scheduler/), so diffusers' DDPMPipeline loads what this one saves and the
reverse; the command line samples a folder through the same loader (fastddpm/compat/folder.py) and the
same loop (:func:`denoise`).
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._common import BaseOutput, randn_like_diffusers
from .ddpm import DDPMScheduler
from .plan import call_model, steady_weights

__all__ = ["DDPMPipeline", "ImagePipelineOutput"]


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, a numpy array (B, H, W, C) or a tensor (B, C, H, W)."""

    images: Any


def numpy_to_pil(images: np.ndarray):
    """(B, H, W, C) floats in [0, 1] -> list of PIL images (as diffusers)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None, ...]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def denoise(unet, scheduler, shape, generator=None, num_inference_steps: int = 1000, device=None,
            dtype=torch.float32, eta: float | None = None, progress=None) -> torch.Tensor:
    """diffusers' DDPMPipeline loop: x_T drawn as diffusers' randn_tensor draws it from ``generator``, then
    ``scheduler.step(unet(x, t), t, x, generator=generator)`` for every timestep. Returns x_0 in the
    model's range ([-1, 1] for DDPM models), unclamped. ``eta`` is passed to a DDIM scheduler's step."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    x = randn_like_diffusers(shape, generator, device, dtype)
    scheduler.set_timesteps(num_inference_steps)
    kw = {} if eta is None else {"eta": eta}
    ts = scheduler.timesteps
    with steady_weights(unet):
        for t in (progress(ts) if progress is not None else ts):
            model_output = call_model(unet, x, t)
            x = scheduler.step(model_output, t, x, generator=generator, **kw).prev_sample
    return x


class DDPMPipeline:
    """Unconditional image generation: ``DDPMPipeline(unet, scheduler)(batch_size=16).images``."""

    def __init__(self, unet, scheduler=None) -> None:
        if not callable(unet):
            raise TypeError(f"unet: expected a callable model, got {type(unet).__name__}")
        for name in ("in_channels", "sample_size"):
            if getattr(getattr(unet, "config", None), name, None) is None:
                raise ValueError(
                    f"unet: expected unet.config.{name} (a fastddpm UNet or a diffusers UNet2DModel)"
                )
        self.unet = unet
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self._progress = {}

    # ------------------------------------------------------------------------------------------------
    # diffusers' folder layout
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, unet: str = "fastddpm", backend: str = "auto",
                        **kwargs) -> DDPMPipeline:
        """A pipeline from a local diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/), or
        a bare UNet2DModel folder (then diffusers' DDPMScheduler defaults).

        ``unet="fastddpm"`` (default) loads the weights into a :class:`fastddpm.UNet`; ``unet="diffusers"``
        loads diffusers' ``UNet2DModel`` and :func:`fastddpm.patch` es it (needs diffusers); a loaded model
        (``unet=model``, as diffusers takes a component) is used in place of the folder's. The scheduler
        becomes fastddpm's class of the same name with the same config; a field fastddpm cannot honour is
        refused with an error naming it (fastddpm/compat/folder.py). ``backend`` picks the fused step's
        backend. Hub ids are not supported (local folders only).
        """
        from ..compat import folder as _folder

        if kwargs:
            raise TypeError(f"from_pretrained: unsupported arguments {', '.join(sorted(kwargs))} (fastddpm "
                            "reads local folders; pass a loaded unet/scheduler to DDPMPipeline(...) instead)")
        f = _folder.read(pretrained_model_name_or_path)
        if unet == "fastddpm":
            model = _folder.load_unet(f)
        elif isinstance(unet, torch.nn.Module):  # a component given, as diffusers takes one: the folder's scheduler
            model = unet
        elif unet == "diffusers":
            import diffusers

            from ..compat.diffusers import patch

            model = patch(diffusers.UNet2DModel.from_pretrained(f.unet_dir).eval())
        else:
            raise ValueError(f"unet: expected 'fastddpm', 'diffusers' or a loaded model, got "
                             f"{repr(unet) if isinstance(unet, str) else type(unet).__name__}")
        return cls(model, _folder.load_scheduler(f, backend=backend))

    def save_pretrained(self, save_directory, safe_serialization: bool = True) -> None:
        """Write the pipeline in diffusers' layout: unet/ (config.json + diffusion_pytorch_model.safetensors
        with UNet2DModel's keys; ``safe_serialization=False``: diffusion_pytorch_model.bin, torch.save's
        format, as diffusers writes it), scheduler/scheduler_config.json and model_index.json, which names
        diffusers' classes, so ``diffusers.DDPMPipeline.from_pretrained`` loads it without fastddpm.
        Each file is written atomically. A previous save's model_index.json is removed first and the new one
        written last, so an interrupted save is no pipeline (diffusers and fastddpm refuse the folder) rather
        than one component of this save beside the other of the last."""
        from .._io import atomic_path
        from ..models.unet import UNet
        from ._common import write_text_atomic

        root = os.fspath(save_directory)
        if os.path.isfile(root):
            raise ValueError(f"save_directory: {root} is a file, expected a folder")
        unet_dir = os.path.join(root, "unet")
        os.makedirs(unet_dir, exist_ok=True)
        index_path = os.path.join(root, "model_index.json")
        if os.path.isfile(index_path):  # (written again last)
            os.remove(index_path)
        version = _diffusers_version()
        if isinstance(self.unet, UNet):
            from safetensors.torch import save_file

            from ..compat.diffusers import config_to_diffusers, state_dict_to_diffusers

            conf = {"_class_name": "UNet2DModel", "_diffusers_version": version}
            conf.update({k: list(v) if isinstance(v, tuple) else v
                         for k, v in config_to_diffusers(self.unet.config).items()})
            sd = {k: v.detach().to("cpu").contiguous()
                  for k, v in state_dict_to_diffusers(self.unet.state_dict()).items()}
            name = "diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin")
            with atomic_path(os.path.join(unet_dir, name)) as tmp:
                if safe_serialization:
                    save_file(sd, tmp, metadata={"format": "pt"})
                else:
                    torch.save(sd, tmp)
            write_text_atomic(os.path.join(unet_dir, "config.json"), json.dumps(conf, indent=2, sort_keys=True) + "\n")
        elif hasattr(self.unet, "save_pretrained"):  # a diffusers UNet2DModel, patched or not
            self.unet.save_pretrained(unet_dir, safe_serialization=safe_serialization)
        else:
            raise TypeError(f"unet: cannot save a {type(self.unet).__name__} (expected a fastddpm UNet or a "
                            "diffusers UNet2DModel)")
        stale = os.path.join(unet_dir, "diffusion_pytorch_model." + ("bin" if safe_serialization else "safetensors"))
        if os.path.exists(stale):  # a previous save's other format: loaders read safetensors first
            os.remove(stale)
        sched_name = type(self.scheduler).__name__
        self.scheduler.save_pretrained(os.path.join(root, "scheduler"))
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": version,
                 "scheduler": ["diffusers", sched_name], "unet": ["diffusers", "UNet2DModel"]}
        write_text_atomic(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")

    # diffusers' pipeline conveniences
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress = kwargs

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar over ``iterable``, or one of ``total`` steps updated by hand, with the configured options."""
        from tqdm.auto import tqdm

        if iterable is not None:
            return tqdm(iterable, **self._progress)
        if total is not None:
            return tqdm(total=total, **self._progress)
        raise ValueError("progress_bar: give iterable or total")

    @property
    def device(self) -> torch.device:
        p = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.unet.parameters()), None) if isinstance(self.unet, torch.nn.Module) else None
        return p.dtype if p is not None else torch.float32

    @property
    def _execution_device(self) -> torch.device:  # diffusers' name, read by code written for its pipelines
        return self.device

    def to(self, *args, silence_dtype_warnings: bool = False, **kwargs) -> DDPMPipeline:
        """The UNet moved as ``torch.nn.Module.to`` moves it (device, dtype); ``silence_dtype_warnings`` is taken
        as diffusers' pipelines take it (this one warns about no dtype)."""
        if isinstance(self.unet, torch.nn.Module):
            self.unet.to(*args, **kwargs)
        return self

    numpy_to_pil = staticmethod(numpy_to_pil)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True):
        """Images as diffusers' DDPMPipeline makes them. ``output_type``: "pil", "np" ((B, H, W, C) in
        [0, 1], in the model's dtype; float32 for bfloat16, which numpy lacks), "pt" ((B, C, H, W) in [0, 1]),
        or "latent", "numpy" or None (diffusers' DDPMPipeline returns the numpy array for every type but
        "pil" and "pt"; so does this one, and it refuses other strings, which are likelier typos)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)  # a numpy integer too, as diffusers takes it
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
            bad = next(g for g in gens if not isinstance(g, torch.Generator))  # (a seed: AttributeError 'device')
            raise TypeError(f"generator: expected a torch.Generator or a list of them, got {type(bad).__name__}")
        if output_type not in ("pil", "np", "pt", "latent", "numpy", None):
            raise ValueError(f"output_type: expected 'pil', 'np', 'pt', 'latent', 'numpy' or None, got {output_type!r}")
        cfg = self.unet.config
        size = cfg.sample_size
        if isinstance(size, int):
            shape = (batch_size, cfg.in_channels, size, size)
        else:
            shape = (batch_size, cfg.in_channels, *size)
        image = denoise(self.unet, self.scheduler, shape, generator, num_inference_steps, self.device,
                        self.dtype, progress=self.progress_bar)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1)
            image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
            if output_type == "pil":
                image = numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except Exception:  # diffusers is optional; the files are diffusers' format all the same
        return "0.30.0"
