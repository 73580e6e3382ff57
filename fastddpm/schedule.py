"""Noise schedules of DDPM: every table the samplers and training need.

Tables are computed in float64 (as the original DDPM code does) and stored as
float32 on the target device; the float64 originals stay available through
:meth:`NoiseSchedule.table` for references and tests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["NoiseSchedule", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

# Names of the float32 tables, each also an attribute of the schedule.
TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "sqrt_recip_alphas",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# Argument checks shared with the ops (fastddpm.ops exports them as check_number and check_device): defined here,
# in the module fastddpm.ops imports, so that this one imports nothing of fastddpm.
def check_number(value, name: str, expected: str = "a number") -> float:
    """``value`` as a float if it is a real number (an int, a float, a numpy scalar or a one-element real
    tensor), else a TypeError naming ``name``: strings (float("1") would take them) and bools are refused.
    ``expected`` words the error ("a positive number", ...); the caller checks the value's range."""
    if type(value) is float:  # the common case first: one type test
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":  # np.array(0.5)
        return float(value)
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, torch.Tensor)) or (
            isinstance(value, torch.Tensor) and (value.numel() != 1 or value.dtype == torch.bool
                                                 or value.dtype.is_complex)):
        got = repr(value) if isinstance(value, (bool, str, bytes)) else type(value).__name__
        if isinstance(value, torch.Tensor):
            got = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        raise TypeError(f"{name}: expected {expected}, got {got}")
    return float(value)


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device: a torch.device, a device string ("cpu", "cuda:0") or a CUDA index;
    else a TypeError (another type) or ValueError (a string torch does not read) naming ``name``."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, numbers.Integral)):
        raise TypeError(f"{name}: expected a torch.device, a device string such as 'cpu' or 'cuda:0', or a "
                        f"CUDA device index, got {type(device).__name__}")
    try:
        return torch.device(device if isinstance(device, str) else int(device))
    except (RuntimeError, ValueError) as e:  # torch's own words follow as the cause
        raise ValueError(f"{name}: expected a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from e


def _cosine_betas(T: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021, eq. 17, as diffusers' betas_for_alpha_bar("cosine").
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """The float64 betas of a named schedule (diffusers' names and formulas)."""
    T = num_train_timesteps
    if trained_betas is not None:
        if isinstance(trained_betas, torch.Tensor):
            if trained_betas.dtype == torch.bool or trained_betas.dtype.is_complex:
                raise TypeError(f"trained_betas: expected real numbers, got a {trained_betas.dtype} tensor")
            betas = trained_betas.detach().cpu().double().numpy()
        else:
            if isinstance(trained_betas, (str, bytes)):
                raise TypeError(f"trained_betas: expected a sequence of numbers, got {type(trained_betas).__name__}")
            try:
                betas = np.asarray(trained_betas)
            except (TypeError, ValueError) as e:  # ragged nesting
                raise TypeError(f"trained_betas: expected a 1-D sequence of numbers ({e})") from None
            if betas.dtype.kind not in "iuf":  # strings ("0.1") and bools are not betas
                raise TypeError(f"trained_betas: expected a sequence of numbers, got values of dtype {betas.dtype}")
            betas = betas.astype(np.float64)
        if betas.ndim != 1 or betas.shape[0] != T:
            raise ValueError(
                f"trained_betas: expected a 1-D sequence of num_train_timesteps={T} values, "
                f"got shape {betas.shape}"
            )
        return betas
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if v < 0:  # its square root is complex: the betas would be the real parts of complex squares
                raise ValueError(f"{name}: beta_schedule='scaled_linear' interpolates square roots, expected a "
                                 f"number >= 0, got {v}")
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(T)
    if beta_schedule == "sigmoid":
        x = np.linspace(-6, 6, T, dtype=np.float64)
        return 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")


MAX_TIMESTEPS = 1_000_000  # num_train_timesteps' bound: the tables take 8 bytes x 14 per step

# The settings that describe a NoiseSchedule made without trained_betas (what a checkpoint or an exported
# model stores): name -> (the types a stored value may have, what that is in words, the default).
SETTINGS: dict[str, tuple[tuple[type, ...], str, object]] = {
    "num_train_timesteps": ((int,), "an integer", 1000),
    "beta_schedule": ((str,), "a schedule name", "linear"),
    "beta_start": ((int, float), "a number", 1e-4),
    "beta_end": ((int, float), "a number", 0.02),
}


class NoiseSchedule:
    """The forward-process noise schedule of a DDPM (Ho et al. 2020, sec. 2).

    Args:
        num_train_timesteps: T, the number of diffusion steps (>= 1).
        beta_schedule: "linear", "scaled_linear", "squaredcos_cap_v2" (cosine) or "sigmoid".
        beta_start: beta_1 of the linear-type schedules.
        beta_end: beta_T of the linear-type schedules.
        trained_betas: explicit betas (T values in (0, 1)); overrides beta_schedule.
        device: where the float32 tables live.

    Attributes named in ``TABLES`` (``betas``, ``alphas_cumprod``,
    ``posterior_variance``, ...) are float32 tensors of shape (T,) on ``device``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
            raise ValueError(f"num_train_timesteps: expected an integer >= 1, got {num_train_timesteps!r}")
        if not 1 <= num_train_timesteps <= MAX_TIMESTEPS:  # (2**31 steps took 24 GiB before any check)
            raise ValueError(f"num_train_timesteps: expected an integer in [1, {MAX_TIMESTEPS}], "
                             f"got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.trained = trained_betas is not None
        self.beta_start = check_number(beta_start, "beta_start", "a number in (0, 1)")
        self.beta_end = check_number(beta_end, "beta_end", "a number in (0, 1)")
        device = check_device(device) if device is not None else None
        betas = make_betas(self.num_train_timesteps, beta_schedule, self.beta_start, self.beta_end, trained_betas)
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            bad = betas[~((betas > 0) & (betas < 1))]
            name = "trained_betas" if trained_betas is not None else "beta_start/beta_end"
            raise ValueError(f"{name}: every beta must lie in (0, 1), got {bad[:4].tolist()}")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # an underflowed table is refused below
            self._f64 = self._compute_tables(betas)
        ac32 = self._f64["alphas_cumprod"].astype(np.float32)
        if not ac32[-1] > 0:  # the product decreases: its last value is its smallest
            t = int(np.argmax(ac32 <= 0))
            name = "trained_betas" if trained_betas is not None else "num_train_timesteps/beta_start/beta_end"
            raise ValueError(f"{name}: alphas_cumprod underflows float32 to 0 from t = {t} of {len(ac32)} on "
                             f"(abar_t = {self._f64['alphas_cumprod'][t]:.3g}), where the x0 prediction divides "
                             "by sqrt(abar_t) and sampling gives NaN images; use fewer timesteps or smaller betas")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._by_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        for name, value in self._tables_on(self.device).items():
            setattr(self, name, value)

    @staticmethod
    def _compute_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # beta~_t, eq. 7
        # The original code clips the log variance at t=0 (where it is 0) to its t=1 value.
        if len(betas) > 1:
            post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        else:
            post_log_var = np.log(np.maximum(post_var, 1e-20))
        return {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "sqrt_recip_alphas": np.sqrt(1.0 / alphas),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }

    def _tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._by_device:
            self._by_device[device] = {
                k: torch.from_numpy(v).to(torch.float32).to(device) for k, v in self._f64.items()
            }
        return self._by_device[device]

    def table(self, name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        """Table ``name`` on ``device`` (default: the schedule's) in ``dtype``, a copy of its own: editing it
        changes no table (``tables(device)`` gives the cached float32 tables themselves).

        float64 gives the unrounded values the float32 tables were made from.
        """
        if name not in TABLES:
            raise ValueError(f"name: expected one of {', '.join(TABLES)}, got {name!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype such as torch.float32, got {dtype!r}")
        device = check_device(device) if device is not None else self.device
        if dtype == torch.float64:
            return torch.from_numpy(self._f64[name].copy()).to(device)
        t = self._tables_on(device)[name]
        return t.clone() if dtype == t.dtype else t.to(dtype)

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """All float32 tables on ``device`` (cached: no copy after the first call)."""
        return self._tables_on(torch.device(device))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """This schedule with its tables on ``device`` (shares the cached copies)."""
        device = check_device(device)
        new = object.__new__(NoiseSchedule)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if k not in TABLES})
        new.device = device
        for name, value in self._tables_on(new.device).items():
            setattr(new, name, value)
        return new

    def settings(self) -> dict:
        """The schedule's settings (the keys of ``SETTINGS``): ``NoiseSchedule(**s.settings())`` makes the same
        tables. A schedule made from ``trained_betas`` has none that describe it (ValueError)."""
        if self.trained:
            raise ValueError("settings: this schedule was made from trained_betas, which "
                             f"{', '.join(SETTINGS)} do not describe; store its betas instead")
        return {k: getattr(self, k) for k in SETTINGS}

    @classmethod
    def from_settings(cls, d: dict | None, source: str = "") -> NoiseSchedule:
        """The NoiseSchedule of stored settings (the keys of ``SETTINGS``; a missing key takes its default, DDPM's
        linear 1e-4..0.02 over 1000 steps). An unknown key or a value of the wrong type is named with ``source``
        (where the settings were read) and the key."""
        d = {} if d is None else d
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise ValueError(f"{where}schedule: expected a table of schedule settings, got {d!r}")
        unknown = sorted(set(d) - set(SETTINGS))
        if unknown:  # a misspelt key ("beta_strat") would load with the default in its place
            raise ValueError(f"{where}schedule.{unknown[0]}: not a schedule setting (expected {', '.join(SETTINGS)})")
        for key, (types, what, _) in SETTINGS.items():
            v = d.get(key)
            if key in d and (isinstance(v, bool) or not isinstance(v, types)):
                raise ValueError(f"{where}schedule.{key}: expected {what}, got {v!r}")
        return cls(**{k: d.get(k, default) for k, (_, _, default) in SETTINGS.items()})

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, device={str(self.device)!r})"
        )
