"""Bad arguments of the public ops, NoiseSchedule and fastddpm.sample: a TypeError (wrong type) or ValueError
(bad value) that names the argument, never an internal error or a silently accepted value; and the valid
spellings of the same arguments still give the numbers of the canonical ones."""

import functools
import os

import numpy as np
import pytest
import torch

import fastddpm
from fastddpm import NoiseSchedule, ops
from fastddpm.ops import reference

SCHED = NoiseSchedule()
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
M = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def identity_model(x, t):
    return x


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("op", ["ddpm", "ddim"])
@pytest.mark.parametrize("generator", [5, "g", [torch.Generator()], np.random.default_rng(0)])
def test_step_generator_of_another_type_is_named(op, generator):
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator or None, got "):
        if op == "ddpm":
            ops.ddpm_step(X, M, 10, SCHED, generator=generator)
        else:
            # refused with eta = 0 too, where nothing would be drawn from it
            ops.ddim_step(X, M, 10, SCHED, generator=generator)


@pytest.mark.parametrize("noise", ["torch", "philox"])
def test_sample_generator_of_another_type_is_named(noise):
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator or None, got int"):
        fastddpm.sample(identity_model, (1, 1, 2, 2), steps=2, generator=5, noise=noise, progress=False)


def test_generator_noise_generator_of_another_type_is_named():
    with pytest.raises(TypeError, match=r"generator: expected a torch\.Generator or None, got int"):
        ops.generator_noise(X, 5)


# ----------------------------------------------------------------------------- generator with other noise
@pytest.mark.parametrize("noise, what", [(M, "a tensor"), ("philox", "'philox'")])
@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_step_generator_with_other_noise_is_refused(op, noise, what):
    # only noise=None draws from the generator: with a tensor or Philox noise it would be ignored (as a seed
    # would). noise="none" with a generator is taken: see the next test.
    kw = dict(noise=noise, generator=torch.Generator().manual_seed(0))
    if isinstance(noise, str) and noise == "philox":
        kw["seed"] = 3
    match = rf"generator: only used with noise=None \(z drawn from it\), got a generator with noise={what}"
    with pytest.raises(ValueError, match=match):
        if op == "ddpm":
            ops.ddpm_step(X, M, 10, SCHED, **kw)
        else:
            ops.ddim_step(X, M, 10, SCHED, eta=1.0, **kw)


@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_step_generator_with_noise_off_is_taken(op):
    # A loop that passes its generator every step and noise="none" at t = 0 (diffusers' step draws no noise
    # there): the posterior mean, the generator untouched.
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    step = ops.ddpm_step if op == "ddpm" else functools.partial(ops.ddim_step, eta=1.0)
    a = step(X, M, 0, SCHED, noise="none", generator=g)
    assert torch.equal(a, step(X, M, 0, SCHED, noise="none")) and torch.equal(g.get_state(), state)


@pytest.mark.parametrize("op", ["ddpm", "ddim"])
def test_step_generator_with_noise_none_draws_from_it(op):
    # the accepted combination: z = torch.randn(shape, generator=g), as the tensor noise gives it
    z = torch.randn(X.shape, generator=torch.Generator().manual_seed(4))
    if op == "ddpm":
        a = ops.ddpm_step(X, M, 10, SCHED, generator=torch.Generator().manual_seed(4))
        b = ops.ddpm_step(X, M, 10, SCHED, noise=z)
    else:
        a = ops.ddim_step(X, M, 10, SCHED, eta=1.0, generator=torch.Generator().manual_seed(4))
        b = ops.ddim_step(X, M, 10, SCHED, eta=1.0, noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_seed_and_generator_follow_the_documented_precedence():
    # fastddpm.sample documents which one each noise uses when both are given (kept as documented): the
    # generator for noise="torch", the seed for noise="philox"
    kw = dict(steps=3, progress=False)
    a = fastddpm.sample(identity_model, (1, 1, 2, 2), seed=1, generator=torch.Generator().manual_seed(7), **kw)
    b = fastddpm.sample(identity_model, (1, 1, 2, 2), generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    a = fastddpm.sample(identity_model, (1, 1, 2, 2), seed=1, generator=torch.Generator().manual_seed(7),
                        noise="philox", **kw)
    b = fastddpm.sample(identity_model, (1, 1, 2, 2), seed=1, noise="philox", **kw)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("op", ["ddpm", "ddim", "dpmpp"])
@pytest.mark.parametrize("value", ["1", b"1", True, [1.0], None, torch.ones(2)])
def test_clip_sample_range_must_be_a_number(op, value):
    fn = {"ddpm": ops.ddpm_step, "ddim": ops.ddim_step, "dpmpp": ops.dpmpp_step}[op]
    with pytest.raises(TypeError, match="clip_sample_range: expected a positive number, got "):
        fn(X, M, 10, SCHED, clip_sample=True, clip_sample_range=value)


@pytest.mark.parametrize("value", ["1", True, [1], None, {}])
def test_eta_must_be_a_number(value):
    with pytest.raises(TypeError, match="eta: expected a non-negative number, got "):
        ops.ddim_step(X, M, 10, SCHED, eta=value)
    with pytest.raises(TypeError, match="eta: expected a non-negative number, got "):
        fastddpm.sample(identity_model, (1, 1, 2, 2), sampler="ddim", steps=2, eta=value, progress=False)


@pytest.mark.parametrize("value", ["1", "0.5", True, [1.0], None])
def test_final_alpha_cumprod_must_be_a_number(value):
    # float("1") took a string, and True as 1.0
    with pytest.raises(TypeError, match=r"final_alpha_cumprod: expected a number in \(0, 1\], got "):
        ops.ddim_step(X, M, 10, SCHED, prev_t=-1, final_alpha_cumprod=value)


def test_numbers_of_every_real_type_are_taken_as_the_float():
    # ints, numpy scalars and one-element tensors are numbers: the same step as the Python float
    want = ops.ddpm_step(X, M * 3, 10, SCHED, noise="none", clip_sample=True, clip_sample_range=1.0)
    for v in (1, np.float32(1.0), np.int64(1), torch.tensor(1.0)):
        got = ops.ddpm_step(X, M * 3, 10, SCHED, noise="none", clip_sample=True, clip_sample_range=v)
        assert torch.equal(got, want), v
    want = ops.ddim_step(X, M, 10, SCHED, prev_t=-1, eta=0.5, noise=M, final_alpha_cumprod=1.0)
    for v in (1, np.float64(1.0), torch.tensor(1.0, dtype=torch.float64)):
        got = ops.ddim_step(X, M, 10, SCHED, prev_t=-1, eta=torch.tensor(0.5), noise=M, final_alpha_cumprod=v)
        assert torch.equal(got, want), v


# ----------------------------------------------------------------------------- philox_randn's shape
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_philox_randn_negative_size_is_named(backend):
    with pytest.raises(ValueError, match=r"shape: expected non-negative sizes, got \(-1, 3\)"):
        ops.philox_randn((-1, 3), 0, 0, backend=backend)


@pytest.mark.parametrize("shape", ["5", 2.0, (2, 3.0), (2, "3"), (True, 2), None])
def test_philox_randn_shape_of_another_type_is_named(shape):
    with pytest.raises(TypeError, match="shape: expected a tuple of non-negative ints, got "):
        ops.philox_randn(shape, 0, 0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_philox_randn_takes_an_int_shape_as_torch_randn(backend):
    # torch.randn(5) is a 1-D tensor of 5: so is philox_randn(5), the normals of counters 0..4 (independent:
    # the float64 reference of the same stream)
    got = ops.philox_randn(5, 3, 7, backend=backend)
    assert got.shape == (5,) and got.dtype == torch.float32
    assert torch.equal(got, ops.philox_randn((5,), 3, 7, backend=backend))
    want = reference.philox_normal((5,), 3, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert ops.philox_randn(torch.Size([2, 3]), 3, 0, backend=backend).shape == (2, 3)
    assert ops.philox_randn(0, 3, 0, backend=backend).shape == (0,)


def test_philox_randn_bad_device_is_named():
    with pytest.raises(ValueError, match="device: expected a device such as 'cpu'"):
        ops.philox_randn((2,), 0, 0, device="foo")


# ----------------------------------------------------------------------------- fastddpm.sample
@pytest.mark.parametrize("shape, exc, match", [
    (2, TypeError, r"shape: expected a tuple \(batch, channels, \.\.\.\) of positive ints, got int 2"),
    ("2", TypeError, "shape: expected a tuple of non-negative ints, got str"),
    ((1, 1, 2.5, 2), TypeError, "shape: expected a tuple of non-negative ints"),  # was truncated to 2
    ((1, 1, "2", 2), TypeError, "shape: expected a tuple of non-negative ints"),
    ((1, 1, -2, 2), ValueError, "shape: expected non-negative sizes"),
    ((1, 1, 0, 2), ValueError, "shape: expected .* positive sizes"),
])
def test_sample_bad_shape_is_named(shape, exc, match):
    with pytest.raises(exc, match=match):
        fastddpm.sample(identity_model, shape, steps=2, progress=False)


def test_sample_shape_of_numpy_ints_and_lists_is_taken():
    a = fastddpm.sample(identity_model, [1, 1, np.int64(2), 2], steps=2, seed=0, progress=False)
    b = fastddpm.sample(identity_model, (1, 1, 2, 2), steps=2, seed=0, progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("device, exc", [("foo", ValueError), ("cuda:-1", ValueError), (1.5, TypeError),
                                         ([0], TypeError)])
def test_sample_bad_device_is_named(device, exc):
    with pytest.raises(exc, match="device: expected a "):
        fastddpm.sample(identity_model, (1, 1, 2, 2), steps=2, device=device, progress=False)
    with pytest.raises(exc, match="device: expected a "):
        fastddpm.sample(torch.nn.Conv2d(1, 1, 1), (1, 1, 2, 2), steps=2, device=device, progress=False)


# ----------------------------------------------------------------------------- NoiseSchedule
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(beta_start="a"), TypeError, r"beta_start: expected a number in \(0, 1\), got 'a'"),
    (dict(beta_start="0.001"), TypeError, "beta_start: expected a number"),  # float() would take it
    (dict(beta_end="a"), TypeError, "beta_end: expected a number"),
    (dict(beta_end=True), TypeError, "beta_end: expected a number"),
    (dict(beta_start=None), TypeError, "beta_start: expected a number"),
    (dict(trained_betas=["0.1", "0.2"]), TypeError, "trained_betas: expected a sequence of numbers"),
    (dict(trained_betas=[True, False]), TypeError, "trained_betas: expected a sequence of numbers"),
    (dict(trained_betas="ab"), TypeError, "trained_betas: expected a sequence of numbers"),
    (dict(trained_betas=torch.tensor([True, False])), TypeError, "trained_betas: expected real numbers"),
    (dict(device="foo"), ValueError, "device: expected a device such as 'cpu'"),
    (dict(device=1.5), TypeError, "device: expected a torch.device"),
])
def test_noise_schedule_bad_arguments_are_named(kwargs, exc, match):
    args = dict(num_train_timesteps=2, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        NoiseSchedule(**args)


def test_noise_schedule_positional_string_beta_is_named():
    with pytest.raises(TypeError, match="beta_start: expected a number"):
        NoiseSchedule(10, "linear", "a", 0.1)


def test_noise_schedule_to_bad_device_is_named():
    with pytest.raises(ValueError, match="device: expected a device such as 'cpu'"):
        SCHED.to("foo")


def test_noise_schedule_numbers_of_every_real_type():
    # ints and numpy scalars are numbers: the same betas as the float (independent: numpy's linspace)
    want = np.linspace(1e-4, 0.02, 10)
    for start in (1e-4, np.float64(1e-4)):
        s = NoiseSchedule(10, "linear", start, 0.02)
        np.testing.assert_array_equal(s.table("betas", dtype=torch.float64).numpy(), want)
    s = NoiseSchedule(3, trained_betas=np.array([1, 2, 3]) / 10)
    np.testing.assert_array_equal(s.table("betas", dtype=torch.float64).numpy(), [0.1, 0.2, 0.3])
    assert NoiseSchedule(3, device=torch.device("cpu")).device == torch.device("cpu")


# ----------------------------------------------------------------------------- fastddpm.nn constructors
@pytest.mark.parametrize("build, error, text", [
    (lambda: fastddpm.nn.GroupNormSiLU(2.0, 4), TypeError, "num_groups: expected a positive int, got 2.0"),
    (lambda: fastddpm.nn.GroupNormSiLU(True, 4), TypeError, "num_groups: expected a positive int, got True"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, -4), ValueError, "num_channels: expected a positive int, got -4"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, 4, eps=-1), ValueError, "eps: expected a finite non-negative number"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, 4, eps="x"), TypeError, "eps: expected a non-negative number, got 'x'"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, 4, eps=float("nan")), ValueError, "eps: expected a finite"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, 4, affine="no"), TypeError, "affine: expected True or False, got 'no'"),
    (lambda: fastddpm.nn.GroupNormSiLU(2, 4, backend="bogus"), ValueError, "backend: expected one of auto"),
    (lambda: fastddpm.nn.AttentionBlock(8.0), TypeError, "channels: expected a positive int, got 8.0"),
    (lambda: fastddpm.nn.AttentionBlock(8, 4, heads=2.0), TypeError, "heads: expected a positive int, got 2.0"),
    (lambda: fastddpm.nn.AttentionBlock(8, 4, rescale_output_factor=0.0), ValueError,
     "rescale_output_factor: expected a finite nonzero number"),
])
def test_nn_constructor_arguments_are_named(build, error, text):
    # Each constructed and then failed at the first forward with another message (heads=2.0: "view(): ... must
    # be tuple of ints"), or never (affine="no" stayed truthy; rescale_output_factor=0 gave inf).
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_nn_constructors_take_what_torch_takes():
    # eps = 0 as torch.nn.GroupNorm takes it, numpy integers as counts: the same module as with Python ints
    a = fastddpm.nn.GroupNormSiLU(np.int64(2), np.int64(4), eps=0.0)
    b = torch.nn.GroupNorm(2, 4, eps=0.0)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(a(x), torch.nn.functional.silu(b(x)), atol=1e-5)
    assert (a.num_groups, a.num_channels) == (2, 4) and type(a.num_groups) is int


def test_numpy_and_tensor_spellings_of_numbers_and_shapes_are_taken():
    # 0-d numpy arrays as numbers, numpy arrays and 0-d integer tensors as shapes, numpy device indices:
    # accepted before these checks existed, and the same values as the plain spellings.
    assert NoiseSchedule(beta_start=np.array(1e-4)).betas.equal(NoiseSchedule(beta_start=1e-4).betas)
    a = ops.ddim_step(X, M, 10, SCHED, eta=np.array(0.5), noise=M)
    assert torch.equal(a, ops.ddim_step(X, M, 10, SCHED, eta=0.5, noise=M))
    assert ops.check_shape(np.array([2, 3, 8, 8])) == (2, 3, 8, 8)
    assert ops.check_shape((torch.tensor(2), np.int64(3))) == (2, 3)
    assert ops.check_device(np.int64(0)) == torch.device(0)
    # clip_sample_range is read only when clipping (diffusers' configs may hold None there)
    assert torch.equal(ops.ddpm_step(X, M, 10, SCHED, noise=M, clip_sample=False, clip_sample_range=None),
                       ops.ddpm_step(X, M, 10, SCHED, noise=M))
    with pytest.raises(TypeError, match="shape: expected a tuple of non-negative ints"):
        ops.check_shape((2, torch.tensor(3.0)))


def test_group_norm_silu_empty_groups_with_eps_0_as_the_cpu_kernel():
    # eps = 0 (torch.nn.GroupNorm takes it) with empty groups: rstd = 1/sqrt(0) divided by zero in Python
    x = torch.randn(2, 4, 0, 5)
    for be in ("torch", "cpu"):
        assert ops.group_norm_silu(x, 2, None, None, eps=0.0, backend=be).shape == x.shape


# ----------------------------------------------------------------------------- backend names
@pytest.mark.parametrize("bad", [["cpu"], 1, "gpu", b"cpu"])
def test_a_bad_backend_is_named_before_the_memo(bad):
    """A list used to reach the resolution memo and fail as "unhashable type: 'list'", naming nothing."""
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"^backend: expected one of auto, cpu, cuda, triton, torch, got "):
        ops.q_sample(x, torch.tensor([1, 2]), x, fastddpm.NoiseSchedule(), backend=bad)
    with pytest.raises(ValueError, match=r"^backend: expected one of auto"):
        fastddpm.nn.AttentionBlock(8, 4, backend=bad)


def test_a_bad_fastddpm_backend_is_named_as_the_variable(monkeypatch):
    """The environment's value was reported as the 'backend' argument, which the caller never gave."""
    monkeypatch.setenv("FASTDDPM_BACKEND", "gpu")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"^FASTDDPM_BACKEND: expected one of auto, .*, got 'gpu'"):
        ops.q_sample(x, torch.tensor([1, 2]), x, fastddpm.NoiseSchedule())
    assert ops.check_backend("torch") == "torch"
    with pytest.raises(ValueError, match="^--backend: expected"):
        ops.check_backend("Torch", "--backend")


@pytest.mark.parametrize("kw, exc, match", [
    (dict(callback=3), TypeError, r"^callback: expected a callable callback\(i, t, x\) or None, got int"),
    (dict(channels_last="no"), TypeError, r"^channels_last: expected True, False or None, got 'no'"),  # was true
])
def test_sample_refuses_bad_options_before_the_first_step(kw, exc, match):
    """A non-callable callback failed after the first model call as "'int' object is not callable"."""
    calls = []

    def model(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    with pytest.raises(exc, match=match):
        fastddpm.sample(model, (1, 1, 4, 4), steps=2, progress=False, **kw)
    assert calls == []


def test_sample_refuses_a_model_that_is_not_callable():
    with pytest.raises(TypeError, match=r"^model: expected a callable model\(x, t\) .*, got int"):
        fastddpm.sample(3, (1, 1, 4, 4), steps=2, progress=False)


# ----------------------------------------------------------------------------- traced timestep checks
@pytest.mark.parametrize("op", ["q_sample", "ddpm_step", "ddim_step", "dpmpp_step"])
def test_compiled_torch_path_still_refuses_bad_timesteps(op):
    """Under torch.compile the Python range checks cannot branch on values; on the PyTorch path (backend
    'torch', float64 inputs, or a step that autograd records) no C++ check followed, so a t of -1 read the
    table's last entry (the result of t = 999) and prev_t > t ran. Each is refused at run time now."""
    sched = fastddpm.NoiseSchedule()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    m = torch.randn_like(x)

    def f(t, prev_t):
        if op == "q_sample":
            return ops.q_sample(x, t, m, sched, backend="torch")
        if op == "dpmpp_step":
            return ops.dpmpp_step(x, m, t, sched, prev_t, m, t + 1, backend="torch")
        return getattr(ops, op)(x, m, t, sched, prev_t, noise="none", backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    good = compiled(torch.tensor([5, 6]), torch.tensor([4, 5]))
    torch.testing.assert_close(good, f(torch.tensor([5, 6]), torch.tensor([4, 5])))
    with pytest.raises(RuntimeError, match=r"t: expected timesteps in \[0, 1000\)"):
        compiled(torch.tensor([-1, 6]), torch.tensor([-2, 5]))
    if op != "q_sample":
        with pytest.raises(RuntimeError, match="prev_t: expected prev_t < t for every sample"):
            compiled(torch.tensor([5, 6]), torch.tensor([9, 5]))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("arg", ["weight", "bias", "shift"])
def test_group_norm_silu_names_a_non_tensor_argument_on_the_cpu_path(arg, grad):
    """The CPU path leaves the checks to the C++ op: a list was "'list' object has no attribute
    'requires_grad'" (grad mode) or the schema parser's message (no_grad), naming no argument."""
    x = torch.randn(2, 8, 4, 4)
    value = [[0.0] * 8] * 2 if arg == "shift" else [1.0] * 8
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=f"^{arg}: expected a torch.Tensor or None, "
                                                                       "got list"):
        ops.group_norm_silu(x, 2, **{arg: value}, backend="cpu")


def test_philox_seed_is_an_integer_not_a_bool():
    """seed=True was taken as seed 1 (offset=True was refused); seed=None named noise='philox', which
    philox_randn has no argument for."""
    with pytest.raises(ValueError, match=r"^seed: expected an integer in \[0, 2\*\*63\), got True"):
        ops.philox_randn((2,), True, 0)
    with pytest.raises(ValueError, match=r"^seed: required for the Philox stream \(noise='philox', philox_randn\)"):
        ops.philox_randn((2,), None, 0)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="^seed: expected an integer"):
        ops.ddpm_step(x, x, 5, fastddpm.NoiseSchedule(), noise="philox", seed=True)


# ----------------------------------------------------------------------------- found by probing the Python API
def test_scaled_linear_refuses_a_negative_beta():
    """Its square root is complex: the betas were the real parts of complex squares (numpy's ComplexWarning)."""
    for kw in (dict(beta_start=-0.00085), dict(beta_end=-0.012)):
        with pytest.raises(ValueError, match=r"scaled_linear' interpolates square roots, expected a number >= 0"):
            fastddpm.NoiseSchedule(1000, "scaled_linear", **{"beta_start": 0.00085, "beta_end": 0.012, **kw})


def test_sample_refuses_what_the_sampler_would_ignore_or_read_as_true():
    f = lambda x, t: 3.0 * x  # noqa: E731
    shape = (1, 1, 4, 4)
    with pytest.raises(ValueError, match="variance_type: DDPM's sigma_t, applies to sampler='ddpm' only"):
        fastddpm.sample(f, shape, steps=3, seed=0, sampler="ddim", variance_type="fixed_large", progress=False)
    for sampler in ("ddpm", "dpm++2m"):
        with pytest.raises(ValueError, match="use_clipped_model_output: DDIM's choice of epsilon"):
            fastddpm.sample(f, shape, steps=3, seed=0, sampler=sampler, use_clipped_model_output=False,
                            progress=False)
    for name in ("clip_denoised", "use_clipped_model_output", "return_intermediates", "cuda_graph", "fast_math",
                 "progress"):
        with pytest.raises(TypeError, match=rf"^{name}: expected True or False, got 'False'"):
            fastddpm.sample(f, shape, steps=3, seed=0, **{name: "False"})
    with pytest.raises(TypeError, match="dtype: expected a torch.dtype"):
        fastddpm.sample(f, shape, steps=3, seed=0, dtype="float32", progress=False)
    # the defaults, and the values that are the defaults' own, still run
    a = fastddpm.sample(f, shape, steps=3, seed=0, sampler="ddim", variance_type="fixed_small", progress=False)
    assert torch.equal(a, fastddpm.sample(f, shape, steps=3, seed=0, sampler="ddim", progress=False))


def test_sample_names_a_device_that_is_not_the_models():
    model = fastddpm.UNet.tiny()
    with pytest.raises(ValueError, match=r"device: meta is not the device of the model's parameters \(cpu\)"):
        fastddpm.sample(model, (1, 3, 8, 8), steps=1, device="meta", progress=False)
    assert fastddpm.sample(model, (1, 3, 8, 8), steps=1, seed=0, device="cpu", progress=False).shape == (1, 3, 8, 8)


def test_dpmpp_default_steps_fit_a_short_schedule():
    """With T <= 20 the default of 20 steps repeated a timestep: "use fewer steps" for steps nobody passed."""
    f = lambda x, t: 0.1 * x  # noqa: E731
    for T in (2, 20):
        x = fastddpm.sample(f, (1, 1, 4, 4), sampler="dpm++2m", schedule=fastddpm.NoiseSchedule(T), seed=0,
                            progress=False)
        assert torch.isfinite(x).all()


def test_unet_checks_a_config_changed_after_it_was_made():
    cfg = fastddpm.UNet.tiny().config
    cfg.attention_resolutions = (3,)  # built with the middle attention only; its config did not load back
    with pytest.raises(ValueError, match="attention_resolutions: resolution 3 never occurs"):
        fastddpm.UNet(cfg)


def test_unet_names_a_timestep_of_another_type():
    u = fastddpm.UNet.tiny()
    x = torch.randn(1, 3, 8, 8)
    for t in ([1], None, "5", True):
        with pytest.raises(TypeError, match="t: expected a timestep tensor, an int or a float"):
            u(x, t)
    with torch.no_grad():
        assert torch.equal(u(x, np.int64(5)), u(x, 5)) and torch.equal(u(x, np.float64(3.5)), u(x, 3.5))


def test_preset_docstrings_give_the_parameter_counts():
    for preset in (fastddpm.UNet.digits, fastddpm.UNet.tiny, fastddpm.UNet.ddpm_cifar10):
        n = sum(p.numel() for p in preset().parameters())
        assert f"{n:,}" in preset.__doc__, (preset.__name__, n)


def test_exported_model_description_is_checked(tmp_path):
    """A misspelt schedule key loaded with the default in its place; a bad sampler or prediction type loaded
    and failed at sampling; Python's export wrote files that load refused."""
    import json

    from fastddpm import pretrained

    lm = pretrained.load_builtin("digits")
    src = json.loads(open(os.path.splitext(lm.source)[0] + ".json").read())
    import shutil

    for change, message in (({"schedule": {**src["schedule"], "beta_strat": 0.00085}}, "schedule.beta_strat: not a"),
                            ({"sampler": 3}, "sampler: expected one of"),
                            ({"prediction_type": ["x"]}, "prediction_type: expected")):
        shutil.copy(lm.source, tmp_path / "m.safetensors")
        (tmp_path / "m.json").write_text(json.dumps({**src, **change}))
        with pytest.raises(ValueError, match=message):
            pretrained.load(model=str(tmp_path / "m.safetensors"))


def test_python_export_refuses_what_load_refuses(tmp_path):
    from fastddpm import pretrained

    with pytest.raises(ValueError, match="out: expected a file name ending in .safetensors"):
        pretrained.export("no-such-run", str(tmp_path / "z"))
    with pytest.raises(ValueError, match="sampler: expected one of ddpm, ddim, dpm\\+\\+2m, got 'bogus'"):
        pretrained.export("no-such-run", str(tmp_path / "z.safetensors"), sampler="bogus")
    assert list(tmp_path.iterdir()) == []


def test_diffusers_config_with_another_number_of_widths_than_blocks():
    from fastddpm.compat.diffusers import UnsupportedDiffusersConfig, config_from_diffusers

    base = {"sample_size": 8, "norm_num_groups": 4, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    for widths in ([16, 32, 64], [16]):  # three became a 3-level network; one failed on attention_resolutions
        with pytest.raises(UnsupportedDiffusersConfig, match="block_out_channels.*one width per block"):
            config_from_diffusers({**base, "block_out_channels": widths})


def test_schedule_table_is_a_copy_and_names_its_arguments():
    """table() returned the schedule's own storage: editing it changed later sampling (float32) and the float64
    reference (a view of its numpy array)."""
    s = fastddpm.NoiseSchedule(1000)
    ref = fastddpm.NoiseSchedule(1000)
    s.table("alphas_cumprod").mul_(0.5)
    s.table("betas", dtype=torch.float64).zero_()
    for name in ("alphas_cumprod", "betas"):
        for dt in (torch.float32, torch.float64):
            assert torch.equal(s.table(name, dtype=dt), ref.table(name, dtype=dt))
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        s.table("betas", dtype=torch.int64)  # gave zeros
    with pytest.raises(ValueError, match="device: expected a device such as"):
        s.table("betas", device="junk")


def test_sample_device_check_follows_where_the_weights_are():
    """The device check of sample(): "cpu" for a CPU model is its device; a numpy bool is a bool; a model whose
    hooks move the work (accelerate's offload keeps the weights elsewhere) is not refused."""
    model = fastddpm.UNet.tiny()
    kw = dict(steps=1, seed=0, progress=np.bool_(False))
    a = fastddpm.sample(model, (1, 3, 8, 8), device="cpu", **kw)
    assert torch.equal(a, fastddpm.sample(model, (1, 3, 8, 8), device=torch.device("cpu"), **kw))
    hooked = fastddpm.UNet.tiny()
    hooked.conv_in._hf_hook = object()  # (what accelerate's offload attaches)
    with pytest.raises(Exception) as e:  # the meta images then fail in the model, as they did before the check
        fastddpm.sample(hooked, (1, 3, 8, 8), device="meta", **kw)
    assert "is not the device of the model's parameters" not in str(e.value)
