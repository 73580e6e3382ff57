"""NoiseSchedule against independent values: the DDPM paper's constants and diffusers' schedules."""

import math

import numpy as np
import pytest
import torch

from fastddpm import NoiseSchedule
from fastddpm.schedule import TABLES


def test_linear_schedule_matches_paper_float64():
    s = NoiseSchedule()  # Ho et al.: T = 1000, beta from 1e-4 to 0.02
    betas = s.table("betas", dtype=torch.float64)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # abar_T computed independently in plain Python
    abar = 1.0
    for i in range(1000):
        abar *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert s.table("alphas_cumprod", dtype=torch.float64)[-1].item() == pytest.approx(abar, rel=1e-12)
    # float32 tables are the rounded float64 values
    assert s.alphas_cumprod.dtype == torch.float32
    assert torch.equal(s.alphas_cumprod, s.table("alphas_cumprod", dtype=torch.float64).float())


def test_posterior_tables_match_eq7():
    s = NoiseSchedule(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    b = s.table("betas", dtype=torch.float64)
    ac = torch.cumprod(1 - b, 0)
    acp = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    var = b * (1 - acp) / (1 - ac)
    torch.testing.assert_close(s.table("posterior_variance", dtype=torch.float64), var, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        s.table("posterior_mean_coef1", dtype=torch.float64), b * acp.sqrt() / (1 - ac), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        s.table("posterior_mean_coef2", dtype=torch.float64),
        (1 - acp) * (1 - b).sqrt() / (1 - ac),
        rtol=1e-12,
        atol=0,
    )
    clipped = s.table("posterior_log_variance_clipped", dtype=torch.float64)
    assert clipped[0].item() == pytest.approx(math.log(var[1].item()))


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    s = NoiseSchedule(200, beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    # diffusers builds its betas in float32; ours are float64 rounded once.
    torch.testing.assert_close(s.betas, ref.betas.float(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.float(), rtol=2e-5, atol=1e-9)


def test_trained_betas_and_T1():
    s = NoiseSchedule(3, trained_betas=[0.1, 0.2, 0.3])
    assert s.alphas_cumprod.tolist() == pytest.approx([0.9, 0.72, 0.504])
    one = NoiseSchedule(1)
    assert len(one) == 1 and torch.isfinite(one.posterior_log_variance_clipped).all()


def test_to_device_shares_tables():
    s = NoiseSchedule(10)
    s2 = s.to("cpu")
    assert s2.alphas_cumprod is s.tables("cpu")["alphas_cumprod"]
    assert "num_train_timesteps=10" in repr(s2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(num_train_timesteps=2.5), "num_train_timesteps"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(beta_start=-0.1), "beta"),
        (dict(beta_end=1.5), "beta"),
        (dict(num_train_timesteps=2, trained_betas=[0.1, 1.0]), "trained_betas"),
        (dict(num_train_timesteps=3, trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(num_train_timesteps=2, trained_betas=np.array([0.1, np.nan])), "trained_betas"),
    ],
)
def test_invalid_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(**kwargs)


def test_a_refused_schedule_prints_no_numpy_warning():
    """The refusal came after two "RuntimeWarning: overflow encountered in divide" lines (1 / abar of a
    float64 abar of 1e-320), before the one-line error of the command line."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="alphas_cumprod underflows float32"):
            NoiseSchedule(1000, "linear", 0.6, 0.5)


def test_schedules_whose_float32_table_underflows_are_refused():
    # 20000 linear steps: alphas_cumprod falls below float32's smallest value from t = 14321 on; the tables
    # held inf (1/sqrt(abar)) and DDPM sampling wrote all-NaN images with exit status 0.
    import time

    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 20000))
    first = int(np.argmax(ac.astype(np.float32) == 0))  # independent: where float32 rounds abar to 0
    with pytest.raises(ValueError, match=f"alphas_cumprod underflows float32 to 0 from t = {first} of 20000"):
        NoiseSchedule(20000)
    with pytest.raises(ValueError, match="trained_betas: alphas_cumprod underflows"):
        NoiseSchedule(300, trained_betas=np.full(300, 0.5))
    s = NoiseSchedule(4000)  # the smallest abar, 2.7e-18, is a float32 number: accepted, every table finite
    assert all(torch.isfinite(getattr(s, name)).all() for name in TABLES)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"num_train_timesteps: expected an integer in \[1, 1000000\]"):
        NoiseSchedule(2**31)  # refused before any table is made (it took 24 GiB)
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_settings_make_the_same_schedule(name):
    s = NoiseSchedule(500, name, 2e-4, 0.03)
    d = s.settings()
    assert d == {"num_train_timesteps": 500, "beta_schedule": name, "beta_start": 2e-4, "beta_end": 0.03}
    again = NoiseSchedule.from_settings(d)
    f64 = torch.float64
    assert torch.equal(again.table("alphas_cumprod", dtype=f64), s.table("alphas_cumprod", dtype=f64))


def test_missing_settings_are_the_papers():
    s = NoiseSchedule.from_settings({"beta_end": 0.02})  # Ho et al.: linear 1e-4..0.02 over 1000 steps
    expected = np.linspace(1e-4, 0.02, 1000)  # independent of make_betas
    assert np.allclose(s.table("betas", dtype=torch.float64).numpy(), expected, rtol=1e-12, atol=0)
    assert NoiseSchedule.from_settings(None).settings() == s.settings()


@pytest.mark.parametrize("d, match", [
    ({"beta_strat": 1e-4}, r"f\.json: schedule\.beta_strat: not a schedule setting"),
    ({"num_train_timesteps": "1000"}, r"schedule\.num_train_timesteps: expected an integer, got '1000'"),
    ({"num_train_timesteps": True}, r"schedule\.num_train_timesteps: expected an integer"),
    ({"beta_start": None}, r"schedule\.beta_start: expected a number, got None"),
    ({"beta_schedule": 3}, r"schedule\.beta_schedule: expected a schedule name"),
    ([1000], r"schedule: expected a table of schedule settings"),
])
def test_from_settings_names_the_bad_setting(d, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_settings(d, "f.json")


def test_a_trained_betas_schedule_has_no_settings():
    with pytest.raises(ValueError, match="settings: this schedule was made from trained_betas"):
        NoiseSchedule(3, trained_betas=[0.1, 0.2, 0.3]).to("cpu").settings()
