"""Plain-torch references of every op: correct in float64, and the ``torch`` backend.

Each function computes in float64 when given float64 inputs and in float32
otherwise (returning the input dtype). They follow the papers and diffusers
literally; tests and benchmarks compare the kernels against them.
"""

from __future__ import annotations

import torch

from ._checks import traced_timestep_checks
from ._codes import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR

__all__ = [
    "q_sample",
    "ddpm_step",
    "ddim_step",
    "dpmpp_step",
    "philox_bits",
    "philox_normal",
    "group_norm_silu",
    "attention",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(table: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    # (B,) gathered and shaped to broadcast over (B, ...)
    return table.to(dtype)[t].reshape(-1, *([1] * (ndim - 1)))


def q_sample(
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor,
    with_v: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4), and v if asked."""
    traced_timestep_checks(sqrt_alphas_cumprod.shape[0], t)
    cd = _compute_dtype(x0)
    a = _per_sample(sqrt_alphas_cumprod, t, x0.dim(), cd)
    s = _per_sample(sqrt_one_minus_alphas_cumprod, t, x0.dim(), cd)
    x, e = x0.to(cd), noise.to(cd)
    xt = (a * x + s * e).to(x0.dtype)
    v = (a * e - s * x).to(x0.dtype) if with_v else x0.new_empty(0)
    return xt, v


# ---------------------------------------------------------------------------
# Philox4x32-10 in int64 arithmetic (each word kept in [0, 2^32)), with the
# conventions of Triton's tl.randn; see csrc/include/fastddpm/elementwise.h.
# ---------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 32x32 -> 64-bit product of a constant and a tensor without int64 overflow.
    ah, al = a >> 16, a & 0xFFFF
    hi_part = ah * b  # < 2^48
    lo_part = al * b  # < 2^48
    mid = hi_part + (lo_part >> 16)
    hi = (mid >> 16) & _M32
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_bits(n: int, seed: int, offset: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The four Philox4x32-10 words of counters offset .. offset+n-1, as int64 (n, 4).

    ``offset`` may be a 0-d int64 tensor on ``device``: read on the device, so a CUDA graph replays it.
    """
    ctr = torch.arange(n, dtype=torch.int64, device=device) + offset
    c0, c1 = ctr & _M32, (ctr >> 32) & _M32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return torch.stack([c0, c1, c2, c3], dim=1)


def _uniform(word: torch.Tensor) -> torch.Tensor:
    # Triton's uint_to_uniform_float: as int32, negatives folded by ~x, times 2^-31 (in fp32).
    x = torch.where(word >= 2**31, word - 2**32, word)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_normal(
    shape: tuple[int, ...] | torch.Size,
    seed: int,
    offset: int | torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The in-kernel noise: element i (row-major) is normal(seed, offset + i).

    The uniforms are formed exactly as the kernels form them (fp32); the
    Box-Muller transform runs in ``dtype`` (float64 by default, the reference).
    """
    n = 1
    for s in shape:
        n *= int(s)
    bits = philox_bits(n, seed, offset, device)
    u1 = torch.clamp(_uniform(bits[:, 0]), min=1.0e-7).to(dtype)
    u2 = _uniform(bits[:, 1]).to(dtype)
    th = (u2 * 6.283185307179586) if dtype == torch.float64 else (u2 * torch.tensor(6.283185307179586))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(th)
    return z.reshape(tuple(shape))


def ddpm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
    predicted_variance: torch.Tensor | None,
    seed: int,
    offset: int,
    noise_mode: int,
    prediction_type: int,
    variance_type: int,
    clip_range: float,
    return_pred: bool,
    offset_tensor: torch.Tensor | None = None,
    diffusers_beta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' DDPMScheduler.step, per sample, with diffusers' own formulas.

    Codes as in fastddpm/ops/_codes.py; clip_range <= 0 disables clipping. The Philox counter offset is
    ``offset`` plus, where given, the 0-d int64 ``offset_tensor`` (read on the device, no host sync).
    ``diffusers_beta``: beta_t as diffusers evaluates it, 1 - abar_t / abar_prev; else the exact form
    (abar_prev - abar_t) / abar_prev, as the kernels (the two agree in float64; in float32, the torch backend,
    the first cancels to ~5e-4 relative where beta_t ~ 1e-4).
    """
    traced_timestep_checks(alphas_cumprod.shape[0], t, prev_t)
    cd = _compute_dtype(sample)
    nd = sample.dim()
    ac = alphas_cumprod.to(cd)
    ab_t = ac[t].reshape(-1, *([1] * (nd - 1)))
    one = torch.ones((), dtype=cd, device=sample.device)
    ab_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], one).reshape(-1, *([1] * (nd - 1)))
    beta_prod_t = 1 - ab_t
    beta_prod_prev = 1 - ab_prev
    cur_alpha = ab_t / ab_prev
    cur_beta = 1 - cur_alpha if diffusers_beta else (ab_prev - ab_t) / ab_prev
    x, m = sample.to(cd), model_output.to(cd)
    # 2. predicted x0 (Ho et al. eq. 15)
    if prediction_type == 0:
        x0 = (x - beta_prod_t**0.5 * m) / ab_t**0.5
    elif prediction_type == 1:
        x0 = m
    else:
        x0 = ab_t**0.5 * x - beta_prod_t**0.5 * m
    # 3. clip
    if clip_range > 0:
        x0 = x0.clamp(-clip_range, clip_range)
    # 4-5. posterior mean (eq. 7)
    c_x0 = ab_prev**0.5 * cur_beta / beta_prod_t
    c_xt = cur_alpha**0.5 * beta_prod_prev / beta_prod_t
    prev = c_x0 * x0 + c_xt * x
    # 6. sigma_t z where t > 0
    if noise_mode != NOISE_NONE:
        if noise_mode == NOISE_TENSOR:
            z = noise.to(cd)
        elif noise_mode == NOISE_PHILOX:
            off = offset if offset_tensor is None else offset_tensor + offset
            z = philox_normal(sample.shape, seed, off, sample.device, cd)
        else:
            raise ValueError(f"noise_mode: expected 0, 1 or 2, got {noise_mode}")
        var = (beta_prod_prev / beta_prod_t * cur_beta).clamp(min=1e-20)
        if variance_type in (0, 1):
            sigma = var**0.5
        elif variance_type == 2:
            sigma = cur_beta**0.5
        elif variance_type == 4:
            sigma = predicted_variance.to(cd) ** 0.5
        elif variance_type == 5:
            frac = (predicted_variance.to(cd) + 1) / 2
            sigma = torch.exp(0.5 * (frac * torch.log(cur_beta) + (1 - frac) * torch.log(var)))
        else:
            raise ValueError(f"variance_type: expected 0, 1, 2, 4 or 5, got {variance_type}")
        mask = (t > 0).to(cd).reshape(-1, *([1] * (nd - 1)))
        prev = prev + mask * sigma * z
    pred = x0.to(sample.dtype) if return_pred else sample.new_empty(0)
    return prev.to(sample.dtype), pred


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    silu: bool = True,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (Wu & He 2018) then SiLU, the U-Net's norm + activation, of x + shift.

    shift: None or (N, C), added per sample and channel before normalising (the ResNet block's
    time-embedding add). Returns (y, mean, rstd) with mean and rstd of shape (N, num_groups) of
    x + shift in the compute dtype (the biased variance, as torch.nn.GroupNorm). Differentiable
    with plain autograd (it is the ``torch`` backend).
    """
    cd = _compute_dtype(x)
    N, C = x.shape[0], x.shape[1]
    u = x.to(cd)
    if shift is not None:
        u = u + shift.to(cd).reshape((N, C) + (1,) * (x.dim() - 2))
    per_group = C // num_groups
    for s in x.shape[2:]:
        per_group *= s
    xg = u.reshape(N, num_groups, per_group)  # (N, G, C/G * spatial); -1 cannot be inferred when N is 0
    if per_group == 0:  # empty groups: mean 0, rstd 1 / sqrt(eps) (variance 0), as the kernels have them
        mean = xg.new_zeros((N, num_groups))
        rstd = xg.new_full((N, num_groups), eps**-0.5 if eps > 0 else float("inf"))
    else:
        mean = xg.mean(dim=2)
        var = (xg - mean.unsqueeze(2)).square().mean(dim=2)
        rstd = torch.rsqrt(var + eps)
    y = ((xg - mean.unsqueeze(2)) * rstd.unsqueeze(2)).reshape(x.shape)
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(cd).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(cd).reshape(per_channel)
    if silu:
        y = y * torch.sigmoid(y)
    return y.to(x.dtype), mean, rstd


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale) V with the score matrix materialised (Vaswani et al. 2017, eq. 1).

    q: (B, heads, N, d), k: (B, heads, M, d), v: (B, heads, M, dv); scale defaults to d**-0.5.
    Differentiable with plain autograd (it is the ``torch`` backend).
    """
    cd = _compute_dtype(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-2, -1)) * scale  # (B, heads, N, M)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(cd)).to(q.dtype)


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    noise: torch.Tensor | None,
    seed: int,
    offset: int,
    noise_mode: int,
    prediction_type: int,
    eta: float,
    clip_range: float,
    use_clipped_model_output: bool,
    return_pred: bool,
    offset_tensor: torch.Tensor | None = None,
    diffusers_beta: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' DDIMScheduler.step (Song et al. 2021, eq. 12), per sample, with diffusers' formulas.

    abar_prev is ``final_alpha_cumprod`` where prev_t < 0; noise is added when eta > 0. The Philox
    counter offset is ``offset`` plus, where given, the 0-d int64 ``offset_tensor``.
    """
    traced_timestep_checks(alphas_cumprod.shape[0], t, prev_t)
    cd = _compute_dtype(sample)
    nd = sample.dim()
    shape = (-1, *([1] * (nd - 1)))
    ac = alphas_cumprod.to(cd)
    ab_t = ac[t].reshape(shape)
    final = torch.full((), final_alpha_cumprod, dtype=cd, device=sample.device)
    ab_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], final).reshape(shape)
    beta_prod_t = 1 - ab_t
    x, m = sample.to(cd), model_output.to(cd)
    if prediction_type == 0:
        x0 = (x - beta_prod_t**0.5 * m) / ab_t**0.5
        eps = m
    elif prediction_type == 1:
        x0 = m
        eps = (x - ab_t**0.5 * x0) / beta_prod_t**0.5
    else:
        x0 = ab_t**0.5 * x - beta_prod_t**0.5 * m
        eps = ab_t**0.5 * m + beta_prod_t**0.5 * x
    if clip_range > 0:
        x0 = x0.clamp(-clip_range, clip_range)
    # clamped at 0 as the kernels clamp it: at t = 0 with set_alpha_to_one=False, abar_prev is abar_0 rounded to
    # float32, and against the float64 table 1 - abar_t / abar_prev rounds to a tiny negative number
    beta_t = 1 - ab_t / ab_prev if diffusers_beta else (ab_prev - ab_t) / ab_prev  # (as ddpm_step's beta_t)
    variance = ((1 - ab_prev) / beta_prod_t * beta_t).clamp(min=0)
    std = eta * variance**0.5
    if use_clipped_model_output:
        eps = (x - ab_t**0.5 * x0) / beta_prod_t**0.5
    prev = ab_prev**0.5 * x0 + (1 - ab_prev - std**2).clamp(min=0) ** 0.5 * eps
    if eta > 0 and noise_mode != NOISE_NONE:
        if noise_mode == NOISE_TENSOR:
            z = noise.to(cd)
        elif noise_mode == NOISE_PHILOX:
            off = offset if offset_tensor is None else offset_tensor + offset
            z = philox_normal(sample.shape, seed, off, sample.device, cd)
        else:
            raise ValueError(f"noise_mode: expected 0, 1 or 2, got {noise_mode}")
        prev = prev + std * z
    pred = x0.to(sample.dtype) if return_pred else sample.new_empty(0)
    return prev.to(sample.dtype), pred


def dpmpp_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    prev_x0: torch.Tensor | None,
    t: torch.Tensor,
    prev_t: torch.Tensor,
    last_t: torch.Tensor | None,
    alphas_cumprod: torch.Tensor,
    prediction_type: int,
    clip_range: float,
    return_pred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) update (Lu et al. 2022, Algorithm 2; diffusers' DPMSolverMultistepScheduler with
    algorithm_type="dpmsolver++", solver_type="midpoint"), per sample, with the paper's formulas.

    alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma); D0 is the (clipped) x0 prediction
    at t, D_1 = ``prev_x0`` the one made at ``last_t``. prev_t = -1 is sigma = 0, where the update (first
    order there, as diffusers) gives D0. Second order wherever ``prev_x0`` is given.
    """
    traced_timestep_checks(alphas_cumprod.shape[0], t, prev_t, last_t if prev_x0 is not None else None)
    cd = _compute_dtype(sample)
    shape = (-1, *([1] * (sample.dim() - 1)))
    ac = alphas_cumprod.to(cd)
    ab_s0 = ac[t].reshape(shape)
    final = (prev_t < 0).reshape(shape)
    ab_t = torch.where(final, torch.ones((), dtype=cd, device=sample.device), ac[prev_t.clamp(min=0)].reshape(shape))
    x, m = sample.to(cd), model_output.to(cd)
    alpha_s0, sigma_s0 = ab_s0.sqrt(), (1 - ab_s0).sqrt()
    if prediction_type == 0:
        x0 = (x - sigma_s0 * m) / alpha_s0
    elif prediction_type == 1:
        x0 = m
    else:
        x0 = alpha_s0 * x - sigma_s0 * m
    if clip_range > 0:
        x0 = x0.clamp(-clip_range, clip_range)

    def lam(ab):
        return 0.5 * (torch.log(ab) - torch.log1p(-ab))

    # Where final, ab_t = 1 and lambda_t = inf; the values computed there are replaced below.
    ab_tf = torch.where(final, ab_s0, ab_t)
    h = lam(ab_tf) - lam(ab_s0)
    alpha_t, sigma_t = ab_tf.sqrt(), (1 - ab_tf).sqrt()
    k = -alpha_t * torch.expm1(-h)  # alpha_t (1 - e^{-h})
    if prev_x0 is not None:
        ab_s1 = ac[last_t].reshape(shape)
        r0 = (lam(ab_s0) - lam(ab_s1)) / h
        d1 = (x0 - prev_x0.to(cd)) / r0
        prev = (sigma_t / sigma_s0) * x + k * x0 + 0.5 * k * d1
    else:
        prev = (sigma_t / sigma_s0) * x + k * x0
    prev = torch.where(final, x0, prev)
    pred = x0.to(sample.dtype) if return_pred else sample.new_empty(0)
    return prev.to(sample.dtype), pred
