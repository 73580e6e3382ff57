"""What the diffusers-compatible schedulers share: diffusers' float32 tables, the
config object, loading and saving, timestep spacing, dynamic thresholding.

Why diffusers' float32 tables and not :class:`~fastddpm.NoiseSchedule`'s float64
ones: diffusers builds its betas with ``torch.linspace(..., dtype=float32)`` and
takes the cumulative product in float32. Over 1000 steps that differs from the
float64 schedule rounded to float32 by up to a few 1e-6 (relative) in
``alphas_cumprod``, which is larger than the rounding of one fused step. A
drop-in replacement must reproduce diffusers' numbers, so the schedulers here
rebuild diffusers' tables bit for bit and hand them to the fused ops through
:class:`DiffusersTables`, a :class:`~fastddpm.NoiseSchedule` whose float32
tables are those. (fastddpm's own sampler, :func:`fastddpm.sample`, keeps the
float64-derived NoiseSchedule.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .. import ops
from ..schedule import NoiseSchedule

CONFIG_NAME = "scheduler_config.json"


# ---------------------------------------------------------------------------
# diffusers' betas, in float32 exactly as diffusers computes them
# ---------------------------------------------------------------------------
def _betas_for_alpha_bar(T: int, max_beta: float = 0.999, kind: str = "cosine") -> torch.Tensor:
    if kind == "cosine":

        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif kind == "laplace":

        def f(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:  # pragma: no cover
        raise ValueError(kind)
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1, in float32 as diffusers."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= aT
    alphas_bar_sqrt *= a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def diffusers_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas,
    rescale_betas_zero_snr: bool,
    allowed: tuple[str, ...],
    owner: str,
) -> torch.Tensor:
    """The float32 betas diffusers' schedulers build from these config values."""
    if (
        isinstance(num_train_timesteps, bool)
        or not isinstance(num_train_timesteps, (int, np.integer))
        or num_train_timesteps < 1
    ):
        raise ValueError(f"num_train_timesteps: expected an integer >= 1, got {num_train_timesteps!r}")
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        if betas.dim() != 1 or betas.shape[0] < 1:
            raise ValueError(f"trained_betas: expected a 1-D list of betas, got shape {tuple(betas.shape)}")
        if betas.shape[0] != T:
            # diffusers takes the betas as given and num_train_timesteps as given; so does fastddpm.
            warnings.warn(
                f"trained_betas: {betas.shape[0]} values but num_train_timesteps={T}: timesteps from "
                f"{betas.shape[0]} on have no beta and cannot be stepped",
                stacklevel=3,
            )
    elif beta_schedule not in allowed:
        # diffusers raises NotImplementedError here too
        raise NotImplementedError(
            f"beta_schedule: {beta_schedule!r} is not implemented for {owner}; "
            f"expected one of {', '.join(allowed)}"
        )
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T)
    elif beta_schedule == "laplace":
        betas = _betas_for_alpha_bar(T, kind="laplace")
    else:  # sigmoid
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def first_invalid_timestep(alphas_cumprod: torch.Tensor) -> int:
    """The first timestep from which a step is NaN in diffusers (len(table) if none).

    diffusers accepts betas above 1 (beta_end=2 is in its own tests), and so does fastddpm. From the
    first beta > 1 the cumulative product changes sign (no real square root), or it has underflowed to
    0 already, and then alpha_t = abar_t / abar_prev is 0/0. A single zero at the end is legitimate
    (rescale_betas_zero_snr with v_prediction). The schedulers raise at such a step, naming the config.
    """
    ac = alphas_cumprod
    bad = ~(ac >= 0)
    bad[1:] |= (ac[1:] == 0) & (ac[:-1] == 0)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else int(ac.shape[0])


def invalid_timestep_error(t: int, owner) -> ValueError:
    c = owner.config
    n = int(owner.alphas_cumprod.shape[0])
    if t >= n:
        return ValueError(f"timestep: {t} cannot be stepped: trained_betas has {n} values (timesteps 0..{n - 1})")
    src = "trained_betas" if c.get("trained_betas") is not None else (
        f"beta_start={c['beta_start']}, beta_end={c['beta_end']}, beta_schedule={c['beta_schedule']!r}")
    return ValueError(
        f"timestep: {t} cannot be stepped: with the betas of this config ({src}) alphas_cumprod[{t}] = "
        f"{float(owner.alphas_cumprod[t]):.4g} (a beta above 1 before it, or the product underflowed to 0), "
        "so the step would be NaN; keep the betas in [0, 1) up to the timesteps sampled"
    )


class DiffusersTables(NoiseSchedule):
    """A NoiseSchedule whose float32 tables are diffusers' (float32 betas, float32 cumprod).

    ``table(name, dtype=torch.float64)`` gives those float32 values widened, as
    diffusers does when it meets float64 samples. Only the tables the fused ops
    read (alphas_cumprod and its square roots) are diffusers-exact; the others
    are derived from them in float64.
    """

    def __init__(self, betas: torch.Tensor, device: torch.device | str | None = None,
                 alphas_cumprod: torch.Tensor | None = None) -> None:
        """``alphas_cumprod``: a table to use instead of the betas' cumulative product (float32)."""
        betas = betas.detach().to("cpu", torch.float32)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0) if alphas_cumprod is None else alphas_cumprod.detach().float().cpu()
        self.num_train_timesteps = int(betas.shape[0])
        self.beta_schedule = "diffusers"
        self.beta_start = float(betas[0])
        self.beta_end = float(betas[-1])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # betas > 1 (see below)
            f64 = NoiseSchedule._compute_tables(betas.double().numpy())
        exact = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": ac,
            "sqrt_alphas_cumprod": ac**0.5,
            "sqrt_one_minus_alphas_cumprod": (1 - ac) ** 0.5,
        }
        for k, v in exact.items():
            f64[k] = v.double().numpy()
        self._f64 = f64
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._by_device = {}
        for name, value in self._tables_on(self.device).items():
            setattr(self, name, value)


# ---------------------------------------------------------------------------
# Base classes: diffusers' own ConfigMixin, SchedulerMixin and BaseOutput when diffusers
# imports (so save/load, model_index.json, compatibles, from_config and isinstance checks are
# diffusers' machinery), else the standalone versions below with the same API. The schedulers'
# maths is written once, on top of whichever is in use.
# ---------------------------------------------------------------------------
class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (as diffusers' FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} is read-only; build a new scheduler with from_config(config, key=value)"
        )

    __setitem__ = __delitem__ = setdefault = pop = popitem = update = clear = _frozen

    def __setattr__(self, name, value):
        self._frozen()

    def __reduce__(self):  # copy/deepcopy/pickle without going through __setitem__
        return (type(self), (dict(self),))


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


class _StandaloneConfigMixin:
    """config / register_to_config / from_config / save_pretrained / from_pretrained without diffusers."""

    config_name = CONFIG_NAME
    ignore_for_config: list[str] = []
    _deprecated_kwargs: list[str] = []

    def register_to_config(self, **kwargs) -> None:
        values = dict(getattr(self, "_internal_dict", None) or {})
        values.update({k: _jsonable(v) for k, v in kwargs.items()})
        self._internal_dict = FrozenConfig(values)

    @property
    def config(self) -> FrozenConfig:
        return self._internal_dict

    @classmethod
    def _init_keys(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler from a config dict. Keys this class does not take (another scheduler's options,
        ``_class_name``, ``_diffusers_version``) change nothing, as in diffusers, which also keeps the
        options in the new config (so a scheduler swapped and swapped back has them again, and
        save_pretrained writes them); ``kwargs`` override the config's values."""
        if config is None:
            config = {}
        if isinstance(config, (str, os.PathLike)):
            config = cls.load_config(config)
        keys = cls._init_keys()
        config = dict(config.items())
        merged = {k: v for k, v in config.items() if k in keys}
        unused = {k: v for k, v in kwargs.items() if k not in keys}
        merged.update({k: v for k, v in kwargs.items() if k in keys})
        obj = cls(**merged)
        hidden = {k: v for k, v in config.items() if k not in keys and not k.startswith("_")}
        if hidden:
            obj.register_to_config(**hidden)
        return (obj, unused) if return_unused_kwargs else obj

    def to_json_string(self) -> str:
        data = {"_class_name": type(self).__name__, "_diffusers_version": "0.0.0"}
        data.update({k: v for k, v in self.config.items() if k != "_use_default_values"})
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                    **kwargs) -> dict:
        p = os.fspath(pretrained_model_name_or_path)
        if subfolder:
            p = os.path.join(p, subfolder)
        path = os.path.join(p, cls.config_name) if os.path.isdir(p) else p
        if not os.path.isfile(path):
            raise OSError(
                f"pretrained_model_name_or_path: no {cls.config_name} in {p} (without diffusers installed, "
                "fastddpm loads local scheduler folders only)"
            )
        with open(path) as f:
            return json.load(f)

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(dict(self.config), indent=2, sort_keys=True)}"


class _StandaloneSchedulerMixin:
    """save_pretrained / from_pretrained / compatibles without diffusers."""

    config_name = CONFIG_NAME
    _compatibles: list[str] = []
    has_compatibles = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        """Load ``scheduler_config.json`` from a local directory (or ``subfolder`` of one)."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        self.save_config(save_directory=save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def compatibles(self) -> list:
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list:
        return []


def _standalone_register_to_config(init):
    """Record ``__init__``'s arguments (defaults filled in) as the config, as diffusers' decorator does."""

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        ignore = getattr(self, "ignore_for_config", [])
        names = [n for i, n in enumerate(inspect.signature(init).parameters) if i > 0 and n not in ignore]
        defaults = {n: p.default for n, p in inspect.signature(init).parameters.items() if n in names}
        values = dict(zip(names, args))
        values.update({n: kwargs.get(n, defaults[n]) for n in names if n not in values})
        values.update({k: v for k, v in kwargs.items() if k.startswith("_")})
        self.register_to_config(**values)
        init(self, *args, **{k: v for k, v in kwargs.items() if not k.startswith("_")})

    return inner


class _StandaloneBaseOutput(OrderedDict):
    """diffusers' BaseOutput without diffusers: a dataclass whose non-None fields are also an ordered
    mapping; ``out[0]``, ``out["prev_sample"]``, ``out.prev_sample``, keys/values/items, len, bool and
    ``to_tuple()`` all see the same values."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v

    def _immutable(self, *args, **kwargs):
        raise Exception(f"You cannot use ``{type(self).__name__}`` mapping methods that remove or replace keys")

    __delitem__ = setdefault = pop = update = _immutable

    def __getitem__(self, k):
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __reduce__(self):
        fn, _args, *rest = super().__reduce__()
        return (fn, tuple(getattr(self, f.name) for f in dataclasses.fields(self)), *rest)

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput

    DIFFUSERS_IMPORT_ERROR: Exception | None = None
    _KARRAS_NAMES = [e.name for e in KarrasDiffusionSchedulers]
except Exception as _exc:  # ImportError, or a diffusers that fails to import against this torch
    ConfigMixin = _StandaloneConfigMixin
    SchedulerMixin = _StandaloneSchedulerMixin
    register_to_config = _standalone_register_to_config
    BaseOutput = _StandaloneBaseOutput
    DIFFUSERS_IMPORT_ERROR = _exc
    _KARRAS_NAMES = []


def step_output_init(self, prev_sample: torch.Tensor, pred_original_sample: torch.Tensor | None = None) -> None:
    """``__init__`` of the step outputs: what BaseOutput's dataclass __init__ and __post_init__ leave
    (the two attributes, and the mapping of those not None, in field order) without their per-field
    generic path, which costs ~13 us a step against ~1 us for this (a step on small images takes tens)."""
    object.__setattr__(self, "prev_sample", prev_sample)
    object.__setattr__(self, "pred_original_sample", pred_original_sample)
    OrderedDict.__setitem__(self, "prev_sample", prev_sample)
    if pred_original_sample is not None:
        OrderedDict.__setitem__(self, "pred_original_sample", pred_original_sample)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``_io.atomic_path``: a temporary file, fsync, rename), with the
    mode a plain open() would give under the umask."""
    from .._io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class FastddpmSchedulerMixin(SchedulerMixin, ConfigMixin):
    """What fastddpm's schedulers add to diffusers' (or the standalone) base classes."""

    config_name = CONFIG_NAME
    ignore_for_config = ["backend"]  # a property of this object, not of the model's scheduler
    _compatibles = list(_KARRAS_NAMES)
    order = 1

    @staticmethod
    def _step_operands(model_output: torch.Tensor, sample: torch.Tensor):
        """(model_output, sample, the dtype of the step's noise) as diffusers' arithmetic has them: both in
        their promoted dtype (a float64 model output makes a float64 step of a float32 sample), the noise
        drawn in the model output's dtype (randn_tensor(..., dtype=model_output.dtype)); model_output checked
        against sample's shape and device."""
        noise_dtype = model_output.dtype
        if model_output.dtype != sample.dtype:  # (promote_types is a dispatched op: not on the common path)
            dt = torch.promote_types(model_output.dtype, sample.dtype)
            model_output, sample = model_output.to(dt), sample.to(dt)
        return ops.check_like(model_output, sample, "model_output", "sample"), sample, noise_dtype

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A scheduler from a config: a dict, diffusers' FrozenDict, or a scheduler (its ``.config``).

        ``backend`` (keyword) picks the fused ops' backend of the new scheduler; other keys this class
        does not take are ignored, as diffusers ignores them.
        """
        if config is not None and not isinstance(config, (dict, str, os.PathLike)):
            inner = getattr(config, "config", None)
            if not isinstance(inner, dict):
                raise TypeError(
                    f"config: expected a dict, a scheduler config or a scheduler, got {type(config).__name__}"
                )
            config = inner
        backend = kwargs.pop("backend", None)
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if backend is not None:
            obj = out[0] if return_unused_kwargs else out
            obj._set_backend(backend)
        return out

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Write ``scheduler_config.json`` (diffusers' format and text) into ``save_directory``, atomically:
        a temporary file renamed into place, so a crash never leaves a half-written config."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub: fastddpm writes local folders only")
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        write_text_atomic(os.path.join(save_directory, self.config_name), self.to_json_string())

    def _check_config(self, prediction_type: str, clip_sample: bool, clip_sample_range: float,
                      thresholding: bool, dynamic_thresholding_ratio: float) -> None:
        """The config checks both schedulers make when built, where diffusers would fail at the first step."""
        if thresholding and not 0 <= dynamic_thresholding_ratio <= 1:  # diffusers: quantile() fails at a step
            raise ValueError(
                f"dynamic_thresholding_ratio: expected a value in [0, 1], got {dynamic_thresholding_ratio}"
            )
        if prediction_type not in ops.PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type: expected one of {', '.join(ops.PREDICTION_TYPES)}, got {prediction_type!r}"
            )
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range: expected a positive number, got {clip_sample_range}")

    def _init_tables(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                     rescale_betas_zero_snr, beta_schedules: tuple[str, ...], backend: str) -> None:
        """diffusers' betas and float32 alphas_cumprod (its attributes of the same names), and the schedule
        the fused ops read (DiffusersTables: diffusers' own float32 tables)."""
        self.backend = backend
        self.betas = diffusers_betas(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
            beta_schedules,
            type(self).__name__,
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # the property's setter builds the schedule
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """diffusers' float32 alphas_cumprod, the table every step and add_noise read.

        Assigning a new table (as code that rescales a schedule by hand does: ``s.alphas_cumprod = ...``)
        rebuilds the tables the fused ops read from it (in float32), so the steps and add_noise follow it as
        diffusers' do; editing the tensor in place is not seen."""
        return self._alphas_cumprod

    @alphas_cumprod.setter
    def alphas_cumprod(self, value) -> None:
        ac = torch.as_tensor(value)
        n = self.betas.shape[0]
        if ac.shape != (n,) or not ac.dtype.is_floating_point:
            raise ValueError(f"alphas_cumprod: expected a 1-D floating-point table of the {n} training timesteps, "
                             f"got {ac.dtype} of shape {tuple(ac.shape)}")
        self._alphas_cumprod = ac
        self._first_invalid = first_invalid_timestep(ac)
        self.schedule = DiffusersTables(self.betas, alphas_cumprod=ac)
        self.__dict__.pop("_steps", None)  # prepared for the old tables

    def _set_backend(self, backend: str) -> None:
        self.backend = backend
        self.__dict__.pop("_steps", None)

    def _prepared_step(self, op: str, sample: torch.Tensor) -> ops.PreparedStep:
        """The fused step op ``op`` for ``sample``'s device and dtype (fastddpm.ops.prepare_step): the backend
        resolved and the table fetched once per device, dtype, backend and FASTDDPM_BACKEND, not every step.
        Checks ``sample`` whenever it prepares (its dtype), and its rank every call (the ops need a batch)."""
        steps = self.__dict__.get("_steps")
        if steps is None:
            steps = self._steps = {}
        key = (op, sample.device, sample.dtype, self.backend, os.environ.get("FASTDDPM_BACKEND"))
        step = steps.get(key)
        if step is None:
            ops.check_tensor(sample, "sample")
            step = steps[key] = ops.prepare_step(op, self.schedule, sample.device, sample.dtype, self.backend)
        elif sample.dim() < 1:
            ops.check_tensor(sample, "sample")
        return step

    def __getstate__(self):  # pickle/deepcopy: prepared steps hold op handles; prepared again on use
        state = self.__dict__.copy()
        state.pop("_steps", None)
        return state

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4), through the fused q_sample.

        ``timesteps``: integers (whole-number floats are read as such; a fraction is refused). For float16 and
        bfloat16 samples the coefficients are computed in float32 and the result rounded once; diffusers rounds
        alphas_cumprod to the sample's dtype first (in float16 abar_1 becomes 1.0 and no noise is added at
        t <= 1; in bfloat16 the result is off by up to 0.12), so half-precision results differ from diffusers'
        by that rounding and are closer to the float64 formula."""
        return _q(self.schedule, original_samples, noise, timesteps, self.backend, velocity=False)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample (Salimans & Ho 2022); timesteps and half precision
        as :meth:`add_noise`."""
        return _q(self.schedule, sample, noise, timesteps, self.backend, velocity=True)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """diffusers' dynamic thresholding (Saharia et al. 2022) of a predicted x0 with this config's ratio and
        maximum: the helper diffusers' schedulers carry under this name, which code written for them calls."""
        return threshold_sample(sample, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def _get_compatibles(cls) -> list:
        """fastddpm's DDPM and DDIM schedulers, then diffusers' schedulers that read the same config.

        A diffusers scheduler whose optional dependency is missing here (torchsde, scipy) is left out
        rather than failing the whole list, as diffusers' own ``compatibles`` would.
        """
        # By name from the package's public namespace, as diffusers looks up its own _compatibles: the
        # scheduler modules import this one, so it imports neither of them.
        from .. import samplers

        out: list = [samplers.DDPMScheduler, samplers.DDIMScheduler]
        if DIFFUSERS_IMPORT_ERROR is None:
            import diffusers

            for name in sorted(set([cls.__name__] + list(cls._compatibles))):
                try:
                    c = getattr(diffusers, name)
                except Exception:
                    continue
                if ".dummy_" in c.__module__:  # diffusers' placeholder for a missing dependency
                    continue
                if c not in out:
                    out.append(c)
        return out


# ---------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------
def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps, spacing: str, steps_offset: int
) -> np.ndarray:
    """diffusers' timestep spacings (Lin et al. 2023, Table 2), descending int64."""
    T = num_train_timesteps
    if isinstance(num_inference_steps, (float, np.floating)) and float(num_inference_steps).is_integer():
        num_inference_steps = int(num_inference_steps)  # 50.0, as diffusers takes it (a fraction is refused)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps: expected a positive integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps: expected a positive integer, got {num_inference_steps}")
    if num_inference_steps > T:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than "
            "`self.config.train_timesteps`:"
            f" {T} as the unet model trained with this scheduler can only handle"
            f" maximal {T} timesteps."
        )
    n = int(num_inference_steps)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        ts += steps_offset
    elif spacing == "trailing":
        ratio = T / n
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
        ts -= 1
    else:
        raise ValueError(
            f"{spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' "
            "or 'trailing'."
        )
    return ts


def prev_table(timesteps: np.ndarray, T: int) -> np.ndarray:
    """prev[t] = the timestep after t in ``timesteps`` (-1 after the last); -2 where t is not in it.

    Indexed by timestep, so a step finds its successor with one gather and no
    search (diffusers searches ``self.timesteps == t`` on every step).
    """
    table = np.full(T, -2, dtype=np.int64)
    ts = np.asarray(timesteps, dtype=np.int64)
    for i in range(len(ts) - 1, -1, -1):  # the first occurrence wins, as diffusers' nonzero()[0]
        if 0 <= ts[i] < T:
            table[ts[i]] = ts[i + 1] if i + 1 < len(ts) else -1
    return table


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3), as diffusers' _threshold_sample.

    A per-sample quantile of |x0| needs a sort, which no elementwise kernel does;
    it runs here in torch and the fused step then takes the thresholded x0.
    """
    dtype = x0.dtype
    B = x0.shape[0]
    x = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    x = x.reshape(B, -1)
    s = torch.quantile(x.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1)
    return (torch.clamp(x, -s, s) / s).reshape(x0.shape).to(dtype)


def as_timestep(timestep):
    """A numpy array timestep (what ``t.numpy()`` gives, 0-d or one per sample) as a CPU tensor, as diffusers
    indexes with it; anything else unchanged (host_timestep and the tensor paths check it)."""
    if isinstance(timestep, np.ndarray):
        if timestep.dtype.kind not in "iuf":
            raise TypeError(f"timestep: expected an int or an integer tensor, got a numpy array of {timestep.dtype}")
        return torch.from_numpy(np.array(timestep))  # (a copy: contiguous, and 0-d stays 0-d)
    return timestep


def check_steppable(t: torch.Tensor, owner, *more: torch.Tensor) -> None:
    """The check of a step at a timestep whose alphas_cumprod is invalid (NaN in diffusers; ``_first_invalid``)
    for timesteps given as a tensor: on the host for a CPU tensor outside tracing (the error names the config),
    else a device-side assertion; nothing to check where every timestep of the table is valid."""
    fi, T = owner._first_invalid, owner.config["num_train_timesteps"]
    if fi >= T:
        return
    if t.is_cpu and not torch.compiler.is_compiling():
        for x in (t, *more):
            bad = x[(x >= fi) & (x < T)]  # (a timestep outside [0, T) is the range check's to name)
            if bad.numel():
                raise invalid_timestep_error(int(bad[0]), owner)
    else:
        torch._assert_async((t < fi).all(), f"timestep: timesteps from {fi} cannot be stepped with the betas of "
                                            "this config (the step would be NaN)")


def whole_timesteps(t: torch.Tensor, name: str) -> torch.Tensor:
    """A timestep tensor as integers: floats that are whole numbers (500.0, as diffusers' pipelines pass them)
    become int64; a fraction or a non-finite value is no index and raises, naming ``name``. Checked on the
    host for a CPU tensor outside tracing, else as a device-side assertion (no host sync, no graph break)."""
    if not t.dtype.is_floating_point:
        return t
    whole = torch.isfinite(t) & (t == t.floor())
    if t.is_cpu and not torch.compiler.is_compiling():
        bad = t[~whole]
        if bad.numel():
            raise ValueError(f"{name}: expected integer timesteps, got {bad.reshape(-1)[0].item()}")
    else:
        torch._assert_async(whole.all(), f"{name}: expected integer timesteps")
    return t.long()


def host_timestep(timestep) -> int | None:
    """The timestep as a Python int when reading it costs no device synchronisation, else None."""
    if isinstance(timestep, torch.Tensor):  # first: what pipelines pass, on every step
        if timestep.numel() != 1 or not timestep.is_cpu:
            return None
        return int(whole_timesteps(timestep, "timestep").item())
    if isinstance(timestep, bool):
        raise TypeError("timestep: expected an integer timestep, got bool")
    if isinstance(timestep, (int, np.integer)):
        return int(timestep)
    if isinstance(timestep, float) and timestep == int(timestep):
        return int(timestep)
    raise TypeError(f"timestep: expected an int or an integer tensor, got {type(timestep).__name__}")


def randn_like_diffusers(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' randn_tensor: the same numbers for the same generator(s)."""
    rand_device = device
    if generator is not None:
        g0 = generator[0] if isinstance(generator, (list, tuple)) else generator
        if g0.device.type != device.type:
            if g0.device.type == "cpu":
                rand_device = torch.device("cpu")
            else:
                raise ValueError(
                    f"generator: cannot generate a {device} tensor from a generator on {g0.device}"
                )
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"generator: expected {shape[0]} generators (one per sample), got {len(generator)}"
            )
        one = (1,) + tuple(shape[1:])
        z = torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator])
        return z.to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def _q(
    schedule, x: torch.Tensor, noise: torch.Tensor, timesteps, backend: str, velocity: bool
) -> torch.Tensor:
    """add_noise / get_velocity: the fused q_sample where shapes allow, diffusers' broadcasting otherwise."""
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.as_tensor(timesteps)
    B = x.shape[0] if x.dim() else 0
    t = timesteps.to(x.device).reshape(-1)
    t = whole_timesteps(t, "timesteps")
    fused = x.dim() >= 1 and noise.shape == x.shape and noise.dtype == x.dtype and t.numel() in (1, B)
    if fused:
        if t.numel() == 1 and B != 1:
            t = t.expand(B)
        if velocity:
            return ops.q_sample(x, t, noise, schedule, target="v", backend=backend)[1]
        return ops.q_sample(x, t, noise, schedule, backend=backend)
    # Anything else (broadcast noise, per-element timesteps): diffusers' broadcasting, with the coefficients in
    # float32 (float64 for float64) as the fused kernel computes them.
    ac = schedule.table(
        "alphas_cumprod", x.device, torch.float64 if x.dtype == torch.float64 else torch.float32
    )[t]
    a = ac**0.5
    s = (1 - ac) ** 0.5
    while a.dim() < x.dim():
        a, s = a.unsqueeze(-1), s.unsqueeze(-1)
    out = a * noise - s * x if velocity else a * x + s * noise
    return out.to(torch.promote_types(x.dtype, noise.dtype))
