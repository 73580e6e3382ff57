"""attention op and AttentionBlock against the float64 materialised reference and diffusers.

Triton runs through its CPU interpreter here, which is slow: its cases are a few small shapes, the
bigger ones marked slow. Tolerances (DESIGN.md): fp32 relative error 1e-5 against float64; fp16/bf16 no
more than twice the error of torch's eager materialised attention in that dtype, both against float64.
"""

from __future__ import annotations

import functools
import importlib
import math

import _utils
import pytest
import torch
from _utils import assert_backends_tested, backends_for, half_bound, rel_err

from fastddpm.nn import AttentionBlock
from fastddpm.ops import BackendNotSupported, attention, reference

attention_mod = importlib.import_module("fastddpm.ops.attention")  # the module (fastddpm.ops.attention is the op)

CPU = torch.device("cpu")
# every backend on every device present: here (no GPU) cpu, triton (interpreter) and torch on the CPU
DEV_BACKENDS = [(dev, b) for dev in _utils.devices_to_test() for b in backends_for(dev, "attention")]
DB_IDS = [f"{dev.type}-{b}" for dev, b in DEV_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_RTOL = 1e-5

NS = [1, 7, 100, 257]  # not multiples of any block size (16, 32, 64)
DS = [16, 64, 256, 512]
# Triton through the interpreter: a few (N, d) combinations by default, the rest slow.
TRITON_FAST = {(1, 16), (7, 64), (100, 16), (7, 512), (100, 64), (257, 16)}


def _interpreted(device, backend):
    return backend == "triton" and device.type == "cpu"


def _cases():
    for dev, b in DEV_BACKENDS:
        for n in NS:
            for d in DS:
                marks = []
                if _interpreted(dev, b) and (n, d) not in TRITON_FAST:
                    marks.append(pytest.mark.slow)
                yield pytest.param(dev, b, n, d, marks=marks, id=f"{dev.type}-{b}-N{n}-d{d}")


def _rand(*shape, dtype=torch.float32, gen=None, device=CPU):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(device=device, dtype=dtype)


def _eager(q, k, v, scale):
    """torch's own materialised attention in the inputs' dtype (the half-precision yardstick)."""
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _run(fn, q, k, v, go):
    """(out, dq, dk, dv) of fn on fresh leaf copies of q, k, v with output gradient go."""
    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(go)
    return out.detach(), qq.grad, kk.grad, vv.grad


def _check_all(got, ref64, eager, dtype, what):
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref64, eager if eager else [None] * 4):
        assert a.dtype == dtype, f"{what} {name}: dtype {a.dtype}, expected {dtype}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        err = rel_err(a, r)
        if dtype == torch.float32:
            bound = FP32_RTOL
        else:
            bound = half_bound(rel_err(e, r), dtype)
        assert err <= bound, f"{what} {name}: relative error {err:.3g} > {bound:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend,n,d", list(_cases()))
def test_forward_backward_vs_reference(device, backend, n, d, dtype):
    g = torch.Generator().manual_seed(1000 * n + d)
    B, H = (1 if _interpreted(device, backend) else 2), 1  # the interpreter is slow; batching: strided test
    q, k, v, go = (_rand(B, H, n, d, gen=g, device=device) for _ in range(4))
    scale = d**-0.5
    ref = _run(lambda a, b, c: reference.attention(a, b, c, scale), q, k, v, go)  # float64
    qd, kd, vd, god = (x.to(dtype) for x in (q, k, v, go))
    got = _run(lambda a, b, c: attention(a, b, c, backend=backend), qd, kd, vd, god)
    eager = None if dtype == torch.float32 else _run(lambda a, b, c: _eager(a, b, c, scale), qd, kd, vd, god)
    _check_all(got, ref, eager, dtype, f"{backend} N={n} d={d}")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS, ids=DB_IDS)
def test_cross_lengths_heads_scale_strides(device, backend):
    # N != M, several heads and batches, a custom scale, and q/k/v as strided views of one qkv tensor
    # (the layout AttentionBlock feeds), with a head width that is not a power of two.
    g = torch.Generator().manual_seed(7)
    B, H, N, M, d = 3, 2, 37, 19, 48
    qkv = _rand(B, N, 3, H, d, gen=g, device=device).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d), strided
    q = qkv[0]
    k, v = _rand(B, H, d, M, gen=g, device=device).transpose(2, 3), _rand(B, H, M, d, gen=g, device=device)
    go = _rand(B, H, N, d, gen=g, device=device)
    assert not q.is_contiguous() and not k.is_contiguous()
    scale = 0.3
    ref = _run(lambda a, b, c: reference.attention(a, b, c, scale), q.double(), k.double(), v.double(),
               go.double())
    got = _run(lambda a, b, c: attention(a, b, c, scale=scale, backend=backend), q, k, v, go)
    _check_all(got, ref, None, torch.float32, f"{backend} strided")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device,backend", DEV_BACKENDS, ids=DB_IDS)
def test_extreme_logits_finite(device, backend, dtype):
    # |logits| in the thousands: the online softmax must subtract the running max (no overflow to inf,
    # no inf - inf = NaN). The float64 comparison is looser than 1e-5 here because softmax amplifies
    # the rounding of a logit of magnitude L (about L * eps of the dtype) into its probabilities.
    g = torch.Generator().manual_seed(3)
    B, H, N, d = 1, 2, 70, 64
    q, k = _rand(B, H, N, d, gen=g, device=device) * 30, _rand(B, H, N, d, gen=g, device=device) * 30
    v, go = _rand(B, H, N, d, gen=g, device=device), _rand(B, H, N, d, gen=g, device=device)
    qd, kd, vd, god = (x.to(dtype) for x in (q, k, v, go))
    got = _run(lambda a, b, c: attention(a, b, c, backend=backend), qd, kd, vd, god)
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert torch.isfinite(t).all(), f"{backend} {dtype} {name}: NaN or inf with extreme logits"
    # compare the output against float64 on the same (rounded) inputs
    ref = reference.attention(qd.double(), kd.double(), vd.double())
    logit = (qd.double() @ kd.double().transpose(-2, -1)).abs().max().item() / math.sqrt(d)
    bound = 4 * logit * torch.finfo(dtype).eps + 2 * torch.finfo(dtype).eps
    assert rel_err(got[0], ref) <= bound


@pytest.mark.parametrize("device,backend", DEV_BACKENDS, ids=DB_IDS)
def test_float64_only_on_torch(device, backend):
    q = _rand(1, 1, 5, 16, dtype=torch.float64, device=device)
    if backend == "torch":
        out = attention(q, q, q, backend=backend)
        assert out.dtype == torch.float64
    else:
        with pytest.raises(BackendNotSupported, match="float64"):
            attention(q, q, q, backend=backend)
    assert attention(q, q, q).dtype == torch.float64  # auto routes float64 to the reference


def test_auto_picks_cpu_sdpa_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    from fastddpm.ops import _dispatch

    assert _dispatch.resolve("attention", "auto", CPU, torch.float32) == "cpu"


def _fake_gpu(monkeypatch, gpu):
    """Resolve as on a GPU of (major, minor, opt-in shared memory per block): resolve() memoises its answers
    as for a fixed device, so the test resolves with a memo of its own."""
    from fastddpm.ops import _dispatch

    monkeypatch.setattr(attention_mod, "_gpu_shared", lambda dev: gpu)
    fresh = functools.lru_cache(maxsize=256)(_dispatch._resolve_memo.__wrapped__)
    monkeypatch.setattr(_dispatch, "_resolve_memo", fresh)


def test_backend_resolution_is_memoised(monkeypatch):
    """attention() resolves its backend through resolve()'s memo (its head-width limit is part of the key): a
    second call with the same device, dtype and head width resolves without a cold resolution."""
    from fastddpm.ops import _dispatch

    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    q = _rand(1, 1, 4, 8)
    attention(q, q, q)
    before = _dispatch._resolve_memo.cache_info()
    attention(q, q, q)
    after = _dispatch._resolve_memo.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


@pytest.mark.parametrize("env", [None, "auto"])
def test_auto_on_cuda_tensors_follows_the_measured_order(monkeypatch, env):
    """auto for CUDA tensors (resolution only: no GPU needed): SDPA for float32, the Triton kernel for
    float16/bfloat16, SDPA where the Triton kernel refuses (d > 512), never the materialised reference
    for a float type the fused kernels serve; float64 and an explicit choice (argument or
    FASTDDPM_BACKEND) are left alone."""
    from fastddpm.ops import _dispatch

    if env is None:
        monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTDDPM_BACKEND", env)
    cuda = torch.device("cuda", 0)
    triton_ok = _dispatch.backend_unavailable_reason("triton", "attention", cuda) is None

    def resolve(dtype, d=64, backend="auto"):
        return _dispatch.resolve("attention", backend, cuda, dtype, d)  # attention()'s call

    _fake_gpu(monkeypatch, (9, 0, 232448))  # an H100's blocks

    assert resolve(torch.float32) == "cuda"
    assert resolve(torch.float32, d=600) == "cuda"
    for half in (torch.float16, torch.bfloat16):
        assert resolve(half) == ("triton" if triton_ok else "cuda")
        assert resolve(half, d=600) == "cuda"
    assert resolve(torch.float64) == "torch"
    assert resolve(torch.float32, backend="torch") == "torch"
    if triton_ok:
        assert resolve(torch.float32, backend="triton") == "triton"
        monkeypatch.setenv("FASTDDPM_BACKEND", "triton")
        assert resolve(torch.float32) == "triton"


@pytest.mark.parametrize("gpu, dtype, d, refused", [
    ((9, 0, 232448), torch.float32, 512, False),  # H100: every configuration fits
    ((8, 0, 166912), torch.float32, 512, False),  # A100
    ((8, 9, 101376), torch.float32, 512, True),  # RTX 4090 / L4: float32 at d = 512 needs 129 KiB
    ((8, 9, 101376), torch.float32, 256, False),
    ((8, 6, 101376), torch.bfloat16, 512, False),
    ((7, 5, 65536), torch.float16, 64, False),  # T4
    ((7, 5, 65536), torch.float16, 128, True),
    ((7, 5, 65536), torch.float32, 256, True),
])
def test_triton_attention_is_refused_where_its_shared_memory_does_not_fit(monkeypatch, gpu, dtype, d, refused):
    """On a GPU whose blocks may have less shared memory than the kernels need (figures checked against
    Triton's compiler by tests/test_triton_compile.py), auto picks SDPA and backend="triton" says why, instead
    of Triton's out-of-resource error at launch. Resolution only: no GPU needed."""
    from fastddpm.ops import _dispatch

    monkeypatch.delenv("FASTDDPM_BACKEND", raising=False)
    _fake_gpu(monkeypatch, gpu)
    cuda = torch.device("cuda", 0)
    if _dispatch.backend_unavailable_reason("triton", "attention", cuda) is not None:
        pytest.skip("Triton is not available")
    why = attention_mod.triton_limit(d, dtype, cuda)
    assert (why is not None) == refused, why
    if refused:
        assert "shared memory" in why and f"sm_{gpu[0]}{gpu[1]}" in why and str(gpu[2]) in why
        assert _dispatch.resolve("attention", "auto", cuda, dtype, d) == "cuda"
        with pytest.raises(BackendNotSupported, match="shared memory"):
            _dispatch.resolve("attention", "triton", cuda, dtype, d)
    elif dtype != torch.float32:
        assert _dispatch.resolve("attention", "auto", cuda, dtype, d) == "triton"


def test_bad_inputs():
    q = _rand(2, 1, 9, 16)
    with pytest.raises(ValueError, match="k: expected shape"):
        attention(q, _rand(2, 1, 9, 32), q)
    with pytest.raises(ValueError, match="k: expected shape"):
        attention(q, _rand(3, 1, 9, 16), q)
    with pytest.raises(ValueError, match="v: expected shape"):
        attention(q, q, _rand(2, 1, 8, 16))
    with pytest.raises(ValueError, match="d .*at least 1"):
        z = torch.empty(2, 1, 9, 0)
        attention(z, z, z)
    with pytest.raises(ValueError, match="N .*at least 1"):
        z = torch.empty(2, 1, 0, 16)
        attention(z, q, q)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        attention(q, q.half(), q)
    with pytest.raises(TypeError, match="v: expected dtype torch.float32"):
        attention(q, q, q.double())
    with pytest.raises(TypeError, match="q: expected dtype"):
        attention(q.int(), q.int(), q.int())
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="k: expected device cpu"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="scale"):
        attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="cuda_graphs")
    with pytest.raises(BackendNotSupported, match="cuda"):
        attention(q, q, q, backend="cuda")
    if any(b == "triton" for _, b in DEV_BACKENDS):
        big = _rand(1, 1, 3, 520)
        with pytest.raises(BackendNotSupported, match="d <= 512"):
            attention(big, big, big, backend="triton")
    big = _rand(1, 1, 3, 520)  # wider heads still run on the SDPA and reference backends
    assert rel_err(attention(big, big, big, backend="cpu"), reference.attention(*(big.double(),) * 3)) < 1e-5


# --------------------------------------------------------------------------- AttentionBlock


def _diffusers_attention(channels, groups, eps, heads):
    from diffusers.models.attention_processor import Attention

    # As UNet2DModel's mid block (and AttnDownBlock2D/AttnUpBlock2D) build it.
    return Attention(channels, heads=heads, dim_head=channels // heads, rescale_output_factor=1.0, eps=eps,
                     norm_num_groups=groups, residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True)


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _block_results(module, x, gy, dtype):
    """(y, dx, dW_qkv, dW_out) of a diffusers Attention or an AttentionBlock, in ``dtype``."""
    module = module.to(dtype)
    xx = x.detach().to(dtype).clone().requires_grad_()
    y = module(xx)
    y.backward(gy.to(dtype))
    if isinstance(module, AttentionBlock):
        return y.detach(), xx.grad, module.qkv.weight.grad, module.proj_out.weight.grad
    dw = torch.cat([module.to_q.weight.grad, module.to_k.weight.grad, module.to_v.weight.grad])
    return y.detach(), xx.grad, dw, module.to_out[0].weight.grad


@pytest.mark.parametrize("device,backend", DEV_BACKENDS, ids=DB_IDS)
@pytest.mark.parametrize("heads", [1, 4])
def test_block_matches_diffusers(device, backend, heads):
    import copy

    g = torch.Generator().manual_seed(11 + heads)
    C, G, eps = 64, 32, 1e-6
    ref = _diffusers_attention(C, G, eps, heads)
    _randomize(ref, g)
    block = AttentionBlock.from_diffusers(ref).to(device)
    block.backend = backend
    assert (block.channels, block.num_groups, block.eps, block.heads) == (C, G, eps, heads)
    ref = ref.to(device)
    x = _rand(2, C, 5, 7, gen=g, device=device)  # N = 35 positions
    gy = _rand(2, C, 5, 7, gen=g, device=device)
    truth = _block_results(copy.deepcopy(ref), x, gy, torch.float64)  # diffusers in float64
    eager = _block_results(copy.deepcopy(ref), x, gy, torch.float32)  # diffusers in fp32
    got = _block_results(block, x, gy, torch.float32)
    # Output and input gradient: 1e-5, as for the op. The weight gradients are reductions over all
    # B * N positions after four fp32 ops in sequence, so they get the flash-attention rule instead:
    # no more than twice diffusers' own fp32 error (or 1e-5, whichever is larger).
    # Elementwise relative error is the wrong yardstick for those reductions: an entry that cancels to
    # near zero has a large relative error in any fp32 evaluation, and which entries those are changes
    # with the thread count's summation order (seen at 1.03e-5 with 16 threads). For them we measure the
    # norm-wise relative error ||got - truth|| / ||truth||, the standard measure for matrix products.
    def norm_err(a, r):
        return ((a.double() - r.double()).norm() / r.double().norm()).item()

    for name, a, e, r in zip(("y", "dx", "dW_qkv (to_q/k/v)", "dW_out (to_out.0)"), got, eager, truth):
        if name in ("y", "dx"):
            bound, err = 1e-5, rel_err(a, r)
        else:
            bound, err = max(1e-5, 2 * norm_err(e, r)), norm_err(a, r)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


def test_block_matches_unet2dmodel_mid_attention():
    from diffusers import UNet2DModel

    g = torch.Generator().manual_seed(5)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                       attention_head_dim=None, norm_num_groups=16, norm_eps=1e-6)
    attn = unet.mid_block.attentions[0]
    _randomize(attn, g)
    block = AttentionBlock.from_diffusers(attn)
    assert (block.channels, block.heads, block.num_groups) == (64, 1, 16)
    x = _rand(3, 64, 4, 4, gen=g)
    with torch.no_grad():
        assert rel_err(block(x), attn(x)) < 1e-5


def test_block_from_diffusers_refuses_another_scale():
    # A diffusers Attention with scale_qk=False scales by 1, not 1/sqrt(d): the block would have given other
    # numbers (1.3 off at an output scale of 4.6) without a word.
    from diffusers.models.attention_processor import Attention

    attn = Attention(8, heads=1, dim_head=8, norm_num_groups=4, residual_connection=True, scale_qk=False)
    with pytest.raises(ValueError, match=r"attn: its scale is 1.0 \(scale_qk=False"):
        AttentionBlock.from_diffusers(attn)
    same = Attention(8, heads=1, dim_head=8, norm_num_groups=4, residual_connection=True)
    _randomize(same, torch.Generator().manual_seed(7))
    x = _rand(2, 8, 3, 3, gen=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_err(AttentionBlock.from_diffusers(same)(x), same(x)) < 1e-5


def test_block_roundtrip_to_diffusers():
    g = torch.Generator().manual_seed(6)
    block = AttentionBlock(32, num_groups=8, eps=1e-5, heads=2)
    _randomize(block, g)
    attn = block.to_diffusers()
    x = _rand(2, 32, 3, 6, gen=g)
    with torch.no_grad():
        assert rel_err(attn(x), block(x)) < 1e-5
    back = AttentionBlock(32, 8, 1e-5, heads=2)
    back.load_diffusers_state_dict(block.diffusers_state_dict())
    for (n1, p1), (n2, p2) in zip(block.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def _ddpm_attn_block(x, sd, groups, eps):
    """The original DDPM attn_block (Ho et al. 2020, diffusion_utils nn.py), with 1x1 convs, in float64."""
    C = x.shape[1]
    h = torch.nn.functional.group_norm(x, groups, sd["norm.weight"], sd["norm.bias"], eps)
    q, k, v = (torch.nn.functional.conv2d(h, sd[f"{n}.weight"], sd[f"{n}.bias"]) for n in "qkv")
    w = torch.einsum("bchw,bcHW->bhwHW", q, k) * C**-0.5
    B, _, H, W = x.shape
    w = torch.softmax(w.reshape(B, H, W, H * W), dim=-1).reshape(B, H, W, H, W)
    h = torch.einsum("bhwHW,bcHW->bchw", w, v)
    h = torch.nn.functional.conv2d(h, sd["proj_out.weight"], sd["proj_out.bias"])
    return x + h


def test_block_loads_ddpm_layout():
    g = torch.Generator().manual_seed(8)
    C, G = 64, 32
    sd = {"norm.weight": torch.randn(C, generator=g, dtype=torch.float64),
          "norm.bias": torch.randn(C, generator=g, dtype=torch.float64)}
    for n in ("q", "k", "v", "proj_out"):
        sd[f"{n}.weight"] = torch.randn(C, C, 1, 1, generator=g, dtype=torch.float64) * 0.2
        sd[f"{n}.bias"] = torch.randn(C, generator=g, dtype=torch.float64) * 0.2
    block = AttentionBlock(C, G, 1e-6)
    block.load_ddpm_state_dict({k: v.float() for k, v in sd.items()})
    x = _rand(2, C, 6, 5, gen=g, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(block(x.float()), _ddpm_attn_block(x, sd, G, 1e-6)) < 1e-5
    out = block.ddpm_state_dict()
    assert out["q.weight"].shape == (C, C, 1, 1)
    for key in sd:
        assert torch.equal(out[key], sd[key].float()), key


def test_block_bad_inputs():
    with pytest.raises(ValueError, match="heads"):
        AttentionBlock(64, 32, heads=3)
    with pytest.raises(ValueError, match="num_groups"):
        AttentionBlock(64, 24)
    block = AttentionBlock(64, 32)
    with pytest.raises(ValueError, match="x: expected shape"):
        block(torch.randn(2, 32, 4, 4))
    with pytest.raises(KeyError, match="to_q.weight"):
        block.load_diffusers_state_dict({})
    with pytest.raises(KeyError, match="proj_out"):
        block.load_ddpm_state_dict({})
    sd = block.ddpm_state_dict()
    sd["q.weight"] = torch.randn(64, 32, 1, 1)
    with pytest.raises(ValueError, match="q.weight"):
        block.load_ddpm_state_dict(sd)
    # vectors of another size: copy_ broadcast a (1,) or 0-d tensor over every channel, and q/k/v biases of 32,
    # 32 and 128 (192 in all) loaded as one
    for key, bad in (("norm.bias", torch.tensor([3.0])), ("proj_out.bias", torch.tensor(0.5))):
        sd = {**block.ddpm_state_dict(), key: bad}
        with pytest.raises(ValueError, match=rf"{key}: expected shape \(64,\), got \({'1,' if bad.dim() else ''}\)"):
            block.load_ddpm_state_dict(sd)
    sd = {**block.diffusers_state_dict(), "group_norm.weight": torch.tensor([2.0])}
    with pytest.raises(ValueError, match=r"group_norm.weight: expected shape \(64,\), got \(1,\)"):
        block.load_diffusers_state_dict(sd)
    sd = {**block.diffusers_state_dict(), "to_q.bias": torch.zeros(32), "to_v.bias": torch.zeros(96)}
    with pytest.raises(ValueError, match=r"to_q.bias: expected shape \(64,\), got \(32,\)"):
        block.load_diffusers_state_dict(sd)
    # an input of another kind or dtype named (torch's "mat1 and mat2 must have the same dtype" and
    # "'list' object has no attribute 'dim'" named nothing)
    with pytest.raises(TypeError, match="x: expected torch.float32, the dtype of the block's parameters, got "
                                        "torch.float64"):
        block(torch.randn(1, 64, 2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        block([1])
    from fastddpm.nn import GroupNormSiLU

    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got NoneType"):
        GroupNormSiLU(2, 4)(None)


def test_backends_tested():
    # The tests here run every backend backends_for() names on each device; a backend that stopped
    # resolving would drop out of them silently.
    assert_backends_tested("attention")
