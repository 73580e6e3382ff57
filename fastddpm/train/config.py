"""TrainConfig: every setting of a training run, as a dataclass readable from TOML.

Precedence: dataclass defaults < the TOML file (``--config``) < flags given on the command line.
TOML keys are the field names (``batch_size`` or ``batch-size``); the table ``[unet]`` overrides fields of
the model preset's :class:`~fastddpm.UNetConfig` (``base_channels = 16`` ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .._fields import annotations, check_fields, check_value

OBJECTIVES = ("eps", "x0", "v")
# objective -> the prediction_type name the samplers use
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@dataclass
class TrainConfig:
    # data and model
    data: str = "digits"  # an image folder, an .npz/.npy file, or "digits" (scikit-learn, train split)
    model: str = "digits"  # a preset (digits, tiny, ddpm_cifar10) or a UNetConfig JSON file
    unet: dict = field(default_factory=dict)  # UNetConfig overrides of the preset
    image_size: int | None = None  # default: 16 for digits, the data's size otherwise
    flip: bool = False  # random horizontal flips (not for digits)
    # diffusion
    objective: str = "eps"  # what the network predicts: eps, x0 or v
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # the global batch (split across processes under torchrun)
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n))
    amp: bool = False
    # run
    seed: int = 0
    out: str = "runs/train"
    save_every: int = 500
    keep: int = 2  # checkpoints kept (the newest)
    sample_every: int = 500  # 0 disables the sample grids
    sample_n: int = 64
    sample_sampler: str = "ddim"
    sample_steps: int = 50
    log_every: int = 10
    device: str = "auto"
    threads: int = 0  # torch intra-op threads (0: torch's default)
    workers: int = 2  # DataLoader processes that decode an image folder (0: the training process itself)
    progress: bool = True

    def validate(self) -> None:
        check_fields(self, lambda name: "--" + name.replace("_", "-"))  # types first: TOML's "no" is a string

        def pos(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {minimum}, got {v!r}")

        for n in ("steps", "batch_size", "num_train_timesteps", "sample_n", "sample_steps", "log_every",
                  "keep"):
            pos(n)
        for n in ("save_every", "sample_every", "warmup", "seed", "threads", "workers"):
            pos(n, 0)
        if self.image_size is not None:
            pos("image_size")
        # A batch's bytes far past any machine's memory overflowed torch's size arithmetic (a RuntimeError
        # traceback, not an allocation failure); the data's own size is checked by the allocation itself.
        side = self.image_size or 1
        if self.batch_size * 3 * side * side * 4 > 2**50:
            what = f"{self.batch_size} images of {side}x{side}" if self.image_size else f"{self.batch_size} images"
            raise ValueError(f"--batch-size/--image-size: a batch of {what} is over "
                             f"{self.batch_size * 3 * side * side * 4 / 2**50:.3g} PiB of pixels; lower them")
        from ..cli import check_seed, check_threads

        check_seed(self.seed)
        check_threads(self.threads)
        most = 4 * (os.cpu_count() or 1)  # each is a process holding a copy of torch: thousands exhaust the machine
        if self.workers > most:
            raise ValueError(f"--workers: expected 0 (decode in the training process) up to {most} processes (4 per "
                             f"core of this machine's {os.cpu_count()}), got {self.workers}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.lr <= 3.4e38:  # (AdamW scales float32 tensors by it: larger is torch's overflow traceback)
            raise ValueError(f"--lr: expected a positive number up to 3.4e38 (float32's largest), got {self.lr}")
        if not (0 <= self.ema_decay < 1):
            raise ValueError(f"--ema-decay: expected a number in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip: expected >= 0, got {self.grad_clip}")
        if self.weight_decay < 0:  # (torch's own message names no flag)
            raise ValueError(f"--weight-decay: expected >= 0, got {self.weight_decay}")
        for n in ("beta_start", "beta_end"):
            if not 0 < getattr(self, n) < 1:
                raise ValueError(f"--{n.replace('_', '-')}: expected a number in (0, 1), got {getattr(self, n)}")
        if self.sample_sampler not in ("ddpm", "ddim"):
            raise ValueError(f"--sample-sampler: expected ddpm or ddim, got {self.sample_sampler!r}")
        if not isinstance(self.unet, dict):
            raise ValueError(f"--unet: expected a table of UNetConfig fields, got {self.unet!r}")
        from ..models.unet import UNetConfig

        known = {f.name for f in dataclasses.fields(UNetConfig)}
        unknown = sorted(set(self.unet) - known)
        if unknown:
            raise ValueError(f"--unet: unknown UNetConfig field(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        types = annotations(UNetConfig)
        for k, v in self.unet.items():
            check_value(f"--unet {k}", types[k], v)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> TrainConfig:
        return cls(**normalise_keys(d, source))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def normalise_keys(d: dict, source: str) -> dict:
    out, spelled = {}, {}
    for k, v in d.items():
        name = k.replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{source}: unknown setting {k!r} (known: {', '.join(sorted(FIELDS))})")
        if name in out:  # batch_size and batch-size: one would silently win
            raise ValueError(f"{source}: {spelled[name]!r} and {k!r} are the same setting, given twice")
        out[name], spelled[name] = v, k
    return out


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
        import tomli as tomllib

    if not path:
        raise ValueError(f"--config: expected a file name, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"--config: {path!r} is a folder; expected a TOML file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no such file {path!r}")
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config: {path} is not valid TOML: {exc}") from exc
    d = normalise_keys(d, f"--config {path}")
    types = annotations(TrainConfig)
    for name, v in d.items():  # a bad value is an error even where a flag replaces it
        check_value(f"--config {path}: {name}", types[name], v)
    return d


def build_config(toml_path: str | None, cli: dict) -> TrainConfig:
    """defaults < TOML < command line (``cli`` holds only the flags actually given)."""
    merged = {}
    if toml_path is not None:
        merged.update(read_toml(toml_path))
    given = {k: v for k, v in cli.items() if v is not None}
    if isinstance(merged.get("unet"), dict) and isinstance(given.get("unet"), dict):  # field by field: --unet
        given["unet"] = {**merged["unet"], **given["unet"]}  # '{"dropout": 0}' leaves the table's widths alone
    merged.update(given)
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg
