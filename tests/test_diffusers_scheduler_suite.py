"""The checks of diffusers' own scheduler tests, restated for fastddpm's schedulers.

diffusers' repository (huggingface/diffusers, tests/schedulers/test_scheduler_ddpm.py,
test_scheduler_ddim.py and the shared checks of test_schedulers.py; not shipped in its wheel) runs each
scheduler through: a save/load round trip under many configs with identical steps before and after,
step shapes, tuple and dict outputs alike, the deprecated-kwargs convention, trained betas saved and
loaded, attribute lookups, the variance helper, custom timesteps, and whole loops whose sums it pins.
Those checks are written here in fastddpm's words, each also against diffusers' own scheduler (installed
in the test environment) where diffusers' test only compares a scheduler with itself. The pinned sums are
diffusers' numbers: what its scheduler gives on the deterministic inputs below, with its tolerances.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings

import diffusers
import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import DDIMScheduler, DDPMScheduler

DDPM_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 variance_type="fixed_small", clip_sample=True)
DDIM_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 clip_sample=True)
KINDS = {
    "ddpm": (DDPMScheduler, diffusers.DDPMScheduler, DDPM_BASE),
    "ddim": (DDIMScheduler, diffusers.DDIMScheduler, DDIM_BASE),
}


def ramp(descending: bool = False) -> torch.Tensor:
    """(4, 3, 8, 8) values k / 768 laid out channel-major then permuted: diffusers' deterministic input
    (a non-contiguous tensor, which the fused ops must read through its strides)."""
    n = 4 * 3 * 8 * 8
    k = torch.arange(n)
    if descending:
        k = k.flip(-1)
    return (k.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x * t / (t + 1)


def step_kwargs(kind: str, eta: float = 0.0) -> dict:
    g = {"generator": torch.manual_seed(0)}
    return g if kind == "ddpm" else {"eta": eta, **(g if eta > 0 else {})}


def one_step(s, kind, t, x, eta=0.0, **kw):
    return s.step(0.1 * x, t, x, **step_kwargs(kind, eta), **kw)


def round_trip(kind, tmp_path, t=0, eta=0.0, steps=None, **overrides):
    """Our scheduler, the same after save_config + from_pretrained, and diffusers' with the same config:
    the step from ``t`` of all three (the first two identical, diffusers' within float32 rounding)."""
    ours_cls, theirs_cls, base = KINDS[kind]
    cfg = {**base, **overrides}
    ours = ours_cls(**cfg)
    folder = tmp_path / f"cfg{len(os.listdir(tmp_path))}"
    ours.save_config(folder)
    back = ours_cls.from_pretrained(folder)
    theirs = theirs_cls.from_pretrained(folder)  # diffusers reads what we wrote
    if kind == "ddim" or steps is not None:
        for s in (ours, back, theirs):
            s.set_timesteps(steps or 50)
    x = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    a = one_step(ours, kind, t, x, eta).prev_sample
    b = one_step(back, kind, t, x, eta).prev_sample
    c = one_step(theirs, kind, t, x, eta).prev_sample
    assert torch.equal(a, b), cfg
    # one fused pass against diffusers' op-by-op float32 arithmetic (the coefficients formed in another
    # order, fused multiply-adds): a few ulps apart.
    assert torch.allclose(a, c, rtol=1e-4, atol=1e-5), (cfg, (a - c).abs().max())
    return ours


# ---------------------------------------------------------------------------------------------------
# Configurations: saved, loaded and stepped alike (diffusers' check_over_configs / check_over_forward)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,T", [("ddpm", 1), ("ddpm", 5), ("ddpm", 100), ("ddpm", 1000),
                                    ("ddim", 100), ("ddim", 500), ("ddim", 1000)])  # DDIM sets 50 steps
def test_num_train_timesteps(kind, T, tmp_path):
    round_trip(kind, tmp_path, num_train_timesteps=T)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("start,end", [(0.0001, 0.002), (0.001, 0.02), (0.01, 0.2), (0.1, 2.0)])
def test_betas_beyond_one_accepted(kind, start, end, tmp_path):
    # beta_end = 2 is in diffusers' own tests: accepted, and t = 0 steps normally.
    round_trip(kind, tmp_path, beta_start=start, beta_end=end)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_betas_beyond_one_fail_at_the_nan_step(kind):
    s = KINDS[kind][0](**{**KINDS[kind][2], "beta_start": 0.1, "beta_end": 2.0})
    bad = s._first_invalid
    assert 0 < bad < 1000
    theirs = KINDS[kind][1](**{**KINDS[kind][2], "beta_start": 0.1, "beta_end": 2.0})
    if kind == "ddim":
        s.set_timesteps(1000)
        theirs.set_timesteps(1000)
    x = torch.rand(2, 3, 4, 4)
    assert torch.isnan(one_step(theirs, kind, bad, x).prev_sample).all()  # diffusers: NaN, silently
    with pytest.raises(ValueError, match="beta_end=2.0.*would be NaN"):
        one_step(s, kind, bad, x)
    assert torch.isfinite(one_step(s, kind, bad - 1, x).prev_sample).all()
    # the same with the timesteps as a tensor, one per sample: DDPM returned NaN there, DDIM finite numbers
    # where diffusers' are NaN (the check ran only for a timestep read on the host)
    for t in (torch.tensor([bad, bad]), torch.tensor([bad - 1, bad])):
        with pytest.raises(ValueError, match=f"timestep: {bad} cannot be stepped.*beta_end=2.0.*would be NaN"):
            one_step(s, kind, t, x)
    assert torch.isfinite(one_step(s, kind, torch.tensor([bad - 1, 0]), x).prev_sample).all()
    # a timestep outside [0, T) is the range check's to name (not "trained_betas has 1000 values")
    with pytest.raises((ValueError, IndexError), match=r"1500") as e:
        one_step(s, kind, torch.tensor([1500, 0]), x)
    assert "trained_betas" not in str(e.value)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_beta_schedules(kind, schedule, tmp_path):
    round_trip(kind, tmp_path, beta_schedule=schedule)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "other"])
@pytest.mark.parametrize("t", [0, 500, 999])
def test_ddpm_variance_types(variance, t, tmp_path):
    # diffusers steps an unknown variance_type ("other", in its own tests) as fixed_small; so do we,
    # with a warning. t > 0 draws noise: the generator's draws must agree too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if variance == "other" else "error")
        round_trip("ddpm", tmp_path, t=t, variance_type=variance)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", [True, False])
def test_clip_sample(kind, clip, tmp_path):
    round_trip(kind, tmp_path, clip_sample=clip)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("max_value", [None, 0.5, 1.0, 2.0])
def test_thresholding(kind, prediction, max_value, tmp_path):
    kw = dict(prediction_type=prediction)
    if max_value is not None:
        kw.update(thresholding=True, sample_max_value=max_value)
    round_trip(kind, tmp_path, **kw)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_betas_zero_snr(kind, rescale, tmp_path):
    round_trip(kind, tmp_path, rescale_betas_zero_snr=rescale)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_ddpm_time_indices(t, tmp_path):
    round_trip("ddpm", tmp_path, t=t)


@pytest.mark.parametrize("offset", [0, 1])
def test_ddim_steps_offset(offset, tmp_path):
    round_trip("ddim", tmp_path, steps_offset=offset)
    s = DDIMScheduler(**{**DDIM_BASE, "steps_offset": 1})
    s.set_timesteps(5)
    assert s.timesteps.tolist() == [801, 601, 401, 201, 1]


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_ddim_timestep_spacing(spacing, tmp_path):
    round_trip("ddim", tmp_path, timestep_spacing=spacing)


@pytest.mark.parametrize("t,steps,eta", [(1, 50, 0.0), (10, 50, 0.5), (49, 50, 1.0), (1, 10, 0.0),
                                         (10, 50, 0.0), (50, 500, 0.0)])
def test_ddim_time_indices_steps_and_eta(t, steps, eta, tmp_path):
    # diffusers steps from these t whether or not they are among the scheduler's timesteps.
    round_trip("ddim", tmp_path, t=t, eta=eta, steps=steps)


# ---------------------------------------------------------------------------------------------------
# The scheduler object: diffusers' machinery
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_is_a_diffusers_scheduler(kind):
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    cls = KINDS[kind][0]
    s = cls()
    assert isinstance(s, SchedulerMixin) and isinstance(s, ConfigMixin)
    assert s.order == 1 and s.init_noise_sigma == 1.0
    x = torch.rand(4, 3, 8, 8)
    assert s.scale_model_input(x, 0.0).shape == x.shape
    # no **kwargs in __init__, so no deprecated kwargs: diffusers' convention both ways
    assert ("kwargs" in inspect.signature(cls.__init__).parameters) == bool(cls._deprecated_kwargs)
    assert "backend" not in s.config  # an option of this object, not of the model's scheduler


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_from_pretrained_gives_the_same_config(kind, tmp_path):
    cls = KINDS[kind][0]
    s = cls(**KINDS[kind][2])
    s.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path)
    want = {k: v for k, v in s.config.items() if k != "_use_default_values"}
    assert want == dict(back.config)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == cls.__name__ and data["_diffusers_version"] == diffusers.__version__


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_trained_betas_of_another_length_save_and_load(kind, tmp_path):
    cls = KINDS[kind][0]
    with pytest.warns(UserWarning, match="trained_betas: 2 values but num_train_timesteps=1000"):
        s = cls(**KINDS[kind][2], trained_betas=np.array([0.1, 0.3]))
    s.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="trained_betas"):
        back = cls.from_pretrained(tmp_path)
    assert back.betas.tolist() == s.betas.tolist() == torch.tensor([0.1, 0.3]).tolist()
    theirs = KINDS[kind][1].from_pretrained(tmp_path)
    assert torch.equal(theirs.alphas_cumprod, back.alphas_cumprod)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_attribute_lookups(kind):
    s = KINDS[kind][0](**KINDS[kind][2])
    s.dummy_attribute = 5
    s.register_to_config(test_attribute=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain attributes and methods: no warning
        assert s.dummy_attribute == 5 and getattr(s, "dummy_attribute") == 5  # noqa: B009 (getattr is checked)
        assert s.save_pretrained == getattr(s, "save_pretrained")  # noqa: B009
    with pytest.warns(FutureWarning):  # a config value read as an attribute: diffusers' deprecation
        assert s.test_attribute == 5
    with pytest.raises(AttributeError) as err:
        s.does_not_exist  # noqa: B018
    assert str(err.value) == f"'{type(s).__name__}' object has no attribute 'does_not_exist'"


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_output_is_a_base_output(kind):
    from diffusers.utils import BaseOutput

    s = KINDS[kind][0](**KINDS[kind][2])
    s.set_timesteps(50)
    x = torch.rand(4, 3, 8, 8)
    t = s.timesteps[0]
    out = one_step(s, kind, t, x)
    tup = one_step(s, kind, t, x, return_dict=False)
    assert isinstance(out, BaseOutput)
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"] and len(out) == 2 and bool(out)
    for a, b, c, d in zip(tup, out.values(), out.to_tuple(), (out[0], out[1])):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert torch.equal(out["prev_sample"], out.prev_sample)
    assert [k for k, _ in out.items()] == list(out.keys())
    assert out.prev_sample.shape == x.shape
    s2 = s.timesteps[1]
    assert one_step(s, kind, s2, x).prev_sample.shape == x.shape


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_add_noise_shape(kind):
    s = KINDS[kind][0](**KINDS[kind][2])
    s.set_timesteps(50)
    x = torch.rand(4, 3, 8, 8)
    assert s.add_noise(x, torch.randn(x.shape), s.timesteps[5][None]).shape == x.shape


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_compatibles_round_trip(kind):
    # Every compatible class (fastddpm's and diffusers' that import here) reads our config, and our
    # class reads theirs back with the same values (diffusers' test_compatibles, which fails in this
    # environment for diffusers itself: its list includes DPMSolverSDEScheduler, which needs torchsde).
    cls = KINDS[kind][0]
    s = cls(**KINDS[kind][2])
    comps = s.compatibles
    assert DDPMScheduler in comps and DDIMScheduler in comps and diffusers.PNDMScheduler in comps
    for comp in comps:
        other = comp.from_config(s.config)
        back = cls.from_config(other.config)
        mine = {k: v for k, v in back.config.items() if k in s.config}
        assert mine == dict(s.config), comp
        extra = set(back.config) - set(s.config)
        assert not extra & set(inspect.signature(cls.__init__).parameters), comp


def test_from_config_keeps_the_backend():
    s = DDPMScheduler.from_config(DDPMScheduler().config, backend="torch")
    assert s.backend == "torch" and "backend" not in s.config
    d, unused = DDIMScheduler.from_config(s, return_unused_kwargs=True, backend="torch", foo=1)
    assert d.backend == "torch" and unused == {"foo": 1}


# ---------------------------------------------------------------------------------------------------
# Values diffusers pins
# ---------------------------------------------------------------------------------------------------
def test_ddpm_variance_helper():
    ours, theirs = DDPMScheduler(**DDPM_BASE), diffusers.DDPMScheduler(**DDPM_BASE)
    for t, want in ((0, 0.0), (487, 0.00979), (999, 0.02)):
        assert abs(float(ours._get_variance(t)) - want) < 1e-5
        for vt in ("fixed_small", "fixed_small_log", "fixed_large"):
            assert torch.equal(ours._get_variance(t, variance_type=vt), theirs._get_variance(t, variance_type=vt))
    pv = torch.rand(2, 3)
    assert torch.allclose(ours._get_variance(487, pv, "learned_range"), theirs._get_variance(487, pv, "learned_range"))


def test_ddim_variance_helper():
    s = DDIMScheduler(**DDIM_BASE)
    for t, prev, want in ((0, 0, 0.0), (420, 400, 0.14771), (980, 960, 0.32460), (487, 486, 0.00979),
                          (999, 998, 0.02)):
        assert abs(float(s._get_variance(t, prev)) - want) < 1e-5


def ddpm_full_loop(cfg=None, backend="auto"):
    s = DDPMScheduler(**{**DDPM_BASE, **(cfg or {})}, backend=backend)
    x, g = ramp(), torch.manual_seed(0)
    for t in reversed(range(len(s))):
        x = s.step(toy_model(x, t), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("cfg,total,mean", [({}, 258.9606, 0.3372),
                                            ({"prediction_type": "v_prediction"}, 202.0296, 0.2631)])
def test_ddpm_full_loops(cfg, total, mean):
    x = ddpm_full_loop(cfg)
    assert abs(x.abs().sum().item() - total) < 1e-2 and abs(x.abs().mean().item() - mean) < 1e-3


def ddpm_noised_loop(backend):
    s = DDPMScheduler(**DDPM_BASE, backend=backend)
    g = torch.manual_seed(0)
    ts = s.timesteps[len(s) - 2:]
    x = s.add_noise(ramp(), ramp(descending=True), ts[:1])
    for t in ts:
        x = s.step(toy_model(x, t), t, x, generator=g).prev_sample
    return x


def _backends():
    out = ["torch", "cpu"]
    try:
        import triton  # noqa: F401

        out.append("triton")
    except ImportError:  # optional; the CPU kernel and the reference are always tested
        pass
    return out


@pytest.mark.parametrize("backend", _backends())
def test_ddpm_noised_loop_within_diffusers_tolerance(backend):
    # diffusers' test_full_loop_with_noise: the scheduler asks the fused step for diffusers' own rounding
    # of beta_t (1 - abar_t / abar_prev in float32), so its pinned sum holds on every backend.
    x = ddpm_noised_loop(backend)
    assert abs(x.abs().sum().item() - 387.9466) < 1e-2 and abs(x.abs().mean().item() - 0.5051) < 1e-3


def test_ddpm_noised_loop_exact_op_is_float64():
    # Why the scheduler asks for diffusers' rounding: the op's default beta_t = (abar_prev - abar_t) /
    # abar_prev is exact (Sterbenz) and lands on the float64 value of these two steps, 0.021 from
    # diffusers' pinned sum, which carries the cancellation of 1 - abar_1 / abar_0 (5e-4 of beta_1).
    s = diffusers.DDPMScheduler(**DDPM_BASE)
    ac = s.alphas_cumprod.double()
    tables = DDPMScheduler(**DDPM_BASE).schedule
    g, g32 = torch.manual_seed(0), torch.Generator().manual_seed(0)
    x = s.add_noise(ramp(), ramp(descending=True), torch.tensor([1])).double()
    x32 = x.float()
    for t in (1, 0):
        ab, ab_prev = ac[t], (ac[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64))
        x0 = ((x - (1 - ab).sqrt() * toy_model(x, t)) / ab.sqrt()).clamp(-1, 1)
        beta = (ab_prev - ab) / ab_prev
        mean = ab_prev.sqrt() * beta / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
        if t > 0:
            mean = mean + ((1 - ab_prev) / (1 - ab) * beta).sqrt() * torch.randn(x.shape, generator=g).double()
        x = mean
        x32 = fastddpm.ops.ddpm_step(x32, toy_model(x32, t), t, tables, t - 1, generator=g32, backend="cpu")
    exact, kernel = x.abs().sum().item(), x32.abs().sum().item()
    assert abs(kernel - exact) < 1e-3  # the op is the float64 value...
    assert abs(exact - 387.9676) < 1e-3  # (the figure README.md quotes)
    assert abs(exact - 387.9466) > 0.01  # ...which lies outside the pinned sum's tolerance (0.01)


def ddim_loop(cfg=None, noised=False):
    s = DDIMScheduler(**{**DDIM_BASE, **(cfg or {})})
    s.set_timesteps(10)
    x, ts = ramp(), s.timesteps
    if noised:
        ts = ts[8:]
        x = s.add_noise(x, ramp(descending=True), ts[:1])
    for t in ts:
        x = s.step(toy_model(x, t), t, x, 0.0).prev_sample
    return x


@pytest.mark.parametrize("cfg,noised,total,mean", [
    ({}, False, 172.0067, 0.223967),
    ({"prediction_type": "v_prediction"}, False, 52.5302, 0.0684),
    ({"set_alpha_to_one": True, "beta_start": 0.01}, False, 149.8295, 0.1951),
    ({"set_alpha_to_one": False, "beta_start": 0.01}, False, 149.0784, 0.1941),
    ({}, True, 354.5418, 0.4616),
])
def test_ddim_full_loops(cfg, noised, total, mean):
    x = ddim_loop(cfg, noised)
    assert abs(x.abs().sum().item() - total) < 1e-2 and abs(x.abs().mean().item() - mean) < 1e-3


# ---------------------------------------------------------------------------------------------------
# Custom timesteps (DDPM)
# ---------------------------------------------------------------------------------------------------
def test_ddpm_custom_timesteps():
    s = DDPMScheduler(**DDPM_BASE)
    ts = [100, 87, 50, 1, 0]
    s.set_timesteps(timesteps=ts)
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == ts[1:] + [-1]
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[100, 87, 50, 51, 0])
    with pytest.raises(ValueError, match="only pass one"):
        s.set_timesteps(num_inference_steps=5, timesteps=ts)
    with pytest.raises(ValueError, match="must start before"):
        s.set_timesteps(timesteps=[1000])


def test_base_output_without_diffusers_behaves_the_same():
    # The standalone BaseOutput (used where diffusers does not import) against diffusers' own.
    from dataclasses import dataclass

    from diffusers.utils import BaseOutput

    from fastddpm.samplers._common import _StandaloneBaseOutput

    @dataclass
    class Theirs(BaseOutput):
        a: torch.Tensor
        b: torch.Tensor | None = None

    @dataclass
    class Ours(_StandaloneBaseOutput):
        a: torch.Tensor
        b: torch.Tensor | None = None

    x, y = torch.rand(2), torch.rand(2)
    for args in ((x, y), (x, None)):
        o, t = Ours(*args), Theirs(*args)
        assert list(o.keys()) == list(t.keys()) and len(o) == len(t) and bool(o) == bool(t)
        assert all(u is v for u, v in zip(o.to_tuple(), t.to_tuple()))
        assert o[0] is t[0] and o["a"] is t["a"]
        o.a, t.a = y, y
        assert o["a"] is t["a"] is y
        errors = []
        for obj in (o, t):  # removing a key: refused, with the same exception as diffusers'
            with pytest.raises(Exception) as err:  # noqa: B017
                obj.pop("a")
            errors.append(type(err.value))
        assert errors[0] is errors[1]
    assert fastddpm.samplers.ddpm.DDPMSchedulerOutput.__mro__[1] is BaseOutput


def test_without_diffusers_same_api_and_numbers(tmp_path):
    # A fresh interpreter where `import diffusers` fails: the package imports, the schedulers are the
    # standalone classes, save/load round-trips, and the steps equal the diffusers-based classes' here.
    import subprocess
    import sys

    code = f"""
import sys, json, torch
sys.modules["diffusers"] = None
import fastddpm
from fastddpm.samplers import _common
assert _common.DIFFUSERS_IMPORT_ERROR is not None
out = {{}}
for name, kw in (("DDPMScheduler", {{"generator": torch.manual_seed(1)}}), ("DDIMScheduler", {{"eta": 0.0}})):
    cls = getattr(fastddpm, name)
    s = cls(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", backend="cpu")
    s.save_pretrained({str(tmp_path)!r} + "/" + name)
    s = cls.from_pretrained({str(tmp_path)!r} + "/" + name, backend="cpu")
    assert s.backend == "cpu" and s.config.prediction_type == "v_prediction" and "backend" not in s.config
    s.set_timesteps(20)
    x = torch.linspace(-1, 1, 96).reshape(2, 3, 4, 4)
    o = s.step(0.3 * x, s.timesteps[3], x, **kw)
    assert list(o.keys()) == ["prev_sample", "pred_original_sample"] and len(o) == 2
    assert o[0] is o.prev_sample and o.to_tuple()[1] is o["pred_original_sample"]
    out[name] = o.prev_sample.flatten().tolist()
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for name, kw in (("DDPMScheduler", {"generator": torch.manual_seed(1)}), ("DDIMScheduler", {"eta": 0.0})):
        cls = getattr(fastddpm, name)
        s = cls(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", backend="cpu")
        s.set_timesteps(20)
        x = torch.linspace(-1, 1, 96).reshape(2, 3, 4, 4)
        want = s.step(0.3 * x, s.timesteps[3], x, **kw).prev_sample.flatten().tolist()
        assert got[name] == want, name
        cfg = json.loads((tmp_path / name / "scheduler_config.json").read_text())
        theirs = getattr(diffusers, name).from_pretrained(tmp_path / name)  # diffusers reads the standalone file
        assert theirs.config.beta_schedule == cfg["beta_schedule"] == "squaredcos_cap_v2"


def test_swapped_config_keeps_the_other_class_fields_as_diffusers_does(tmp_path):
    # DDIMScheduler.from_config(ddpm.config) and back: diffusers keeps DDPM's variance_type in the DDIM config
    # (DDIM does not read it), writes it with save_pretrained, and the DDPM made back from it has it again. The
    # standalone classes (no diffusers) dropped it, so swapping back silently sampled fixed_small.
    import subprocess
    import sys

    code = f"""
import sys, json
sys.modules["diffusers"] = None
import fastddpm
out = {{}}
for src, dst, kw in (("DDPMScheduler", "DDIMScheduler", {{"variance_type": "fixed_large"}}),
                     ("DDIMScheduler", "DDPMScheduler", {{"set_alpha_to_one": False}})):
    s = getattr(fastddpm, dst).from_config(getattr(fastddpm, src)(**kw).config)
    s.save_pretrained({str(tmp_path)!r} + "/" + dst)
    s = getattr(fastddpm, dst).from_pretrained({str(tmp_path)!r} + "/" + dst)
    back = getattr(fastddpm, src).from_config(s.config)
    out[dst] = [dict(s.config), dict(back.config)]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for src, dst, kw in (("DDPMScheduler", "DDIMScheduler", {"variance_type": "fixed_large"}),
                         ("DDIMScheduler", "DDPMScheduler", {"set_alpha_to_one": False})):
        theirs = getattr(diffusers, dst).from_config(getattr(diffusers, src)(**kw).config)
        theirs_back = getattr(diffusers, src).from_config(theirs.config)
        saved = json.loads((tmp_path / dst / "scheduler_config.json").read_text())
        for k, v in kw.items():
            assert got[dst][0][k] == theirs.config[k] == saved[k] == v
            assert got[dst][1][k] == theirs_back.config[k] == v


# ---------------------------------------------------------------------------------------------------
# The last step of a respaced chain: prev_t below -1, as diffusers computes it
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [{}, {"set_alpha_to_one": False}, {"steps_offset": 1},
                                 {"timestep_spacing": "trailing"}])  # trailing: the last t is 19, prev -1
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_last_step_goes_below_minus_one(cfg, eta, monkeypatch):
    # 50 of 1000 steps: the last t (0, or 1 with steps_offset=1) steps to t - 20 < -1, which diffusers
    # reads as "before the first step" (final_alpha_cumprod). The scheduler hands that prev_t to the op
    # unchanged, and the step equals diffusers' for an int, a 0-d and a per-sample timestep.
    ours, theirs = DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    t = theirs.timesteps[-1]
    seen = []
    real = fastddpm.ops.ddim_step

    def spy(*args, **kw):
        seen.append(args[4] if len(args) > 4 else kw["prev_t"])
        return real(*args, **kw)

    monkeypatch.setattr(fastddpm.ops, "ddim_step", spy)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    want = theirs.step(m, t, x, eta, generator=torch.Generator().manual_seed(4)).prev_sample
    for tt in (int(t), t, t.expand(2)):
        got = ours.step(m, tt, x, eta, generator=torch.Generator().manual_seed(4)).prev_sample
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (tt, (got - want).abs().max())
    stride = 1000 // 50
    assert all(torch.as_tensor(p).min().item() == int(t) - stride < 0 for p in seen), seen
    assert (int(t) - stride < -1) == (cfg.get("timestep_spacing") != "trailing")


def test_ddim_50_step_loop_equals_diffusers():
    for eta in (0.0, 0.5):
        ours, theirs = DDIMScheduler(set_alpha_to_one=False), diffusers.DDIMScheduler(set_alpha_to_one=False)
        ours.set_timesteps(50)
        theirs.set_timesteps(50)
        a = b = ramp()
        ga, gb = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        for t in theirs.timesteps:
            a = ours.step(toy_model(a, t), t, a, eta, generator=ga).prev_sample
            b = theirs.step(toy_model(b, t), t, b, eta, generator=gb).prev_sample
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (eta, (a - b).abs().max())


@pytest.mark.parametrize("second", [True, False])
def test_step_output_fast_init_equals_base_outputs(second):
    # The outputs' own __init__ (no per-field generic path) leaves what diffusers' dataclass __init__
    # and __post_init__ leave: attributes, mapping, tuple, pickle, pytree.
    import pickle
    from dataclasses import dataclass

    import torch.utils._pytree as pytree
    from diffusers.utils import BaseOutput

    @dataclass
    class Reference(BaseOutput):
        prev_sample: torch.Tensor
        pred_original_sample: torch.Tensor | None = None

    a, b = torch.rand(2), (torch.rand(2) if second else None)
    ref = Reference(a, b)
    for cls in (fastddpm.samplers.DDPMSchedulerOutput, fastddpm.samplers.DDIMSchedulerOutput):
        o = cls(a, b)
        assert list(o.keys()) == list(ref.keys()) and len(o) == len(ref) and bool(o) == bool(ref)
        assert all(x is y for x, y in zip(o.to_tuple(), ref.to_tuple()))
        assert o.prev_sample is a and o.pred_original_sample is b and o[0] is a
        back = pickle.loads(pickle.dumps(o))
        assert type(back) is cls and list(back.keys()) == list(o.keys())
        leaves, spec = pytree.tree_flatten(o)
        assert len(leaves) == len(ref) and type(pytree.tree_unflatten(leaves, spec)) is cls
        assert cls(prev_sample=a, pred_original_sample=b).keys() == o.keys()
