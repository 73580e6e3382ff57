"""fastddpm.UNet: structure, parameter counts, config checks, gradients, state_dict, performance switches.

Parity with diffusers' UNet2DModel lives in tests/test_compat_diffusers.py.
"""

import io
import math

import pytest
import torch
from _utils import randomise
from _utils import rel_norm as _rel
from torch.utils._python_dispatch import TorchDispatchMode

from fastddpm import UNet, UNetConfig
from fastddpm.models.unet import SinusoidalTimesteps


# ------------------------------------------------------------------------------------------------
# parameter counts and presets
# ------------------------------------------------------------------------------------------------
def test_cifar10_parameter_count():
    # The DDPM CIFAR-10 network (Ho et al. 2020) as google/ddpm-cifar10-32 ships it.
    assert UNet.ddpm_cifar10().num_parameters() == 35_746_307


def test_presets_are_small():
    d, t = UNet.digits(), UNet.tiny()
    assert d.config.in_channels == 1 and d.config.sample_size in (16, 32)
    assert d.num_parameters() < 3_000_000
    assert t.num_parameters() < 300_000


def test_learned_variance_doubles_output_channels():
    m = UNet.tiny(learned_variance=True).eval()
    assert m.config.out_channels_resolved == 6
    with torch.no_grad():
        assert m(torch.randn(1, 3, 8, 8), 3).shape == (1, 6, 8, 8)


# ------------------------------------------------------------------------------------------------
# shapes at every level
# ------------------------------------------------------------------------------------------------
def _expected_shapes(cfg: UNetConfig, B: int):
    chans, res = cfg.block_out_channels, cfg.resolutions
    L = cfg.num_levels
    down = [(B, chans[i], res[min(i + 1, L - 1)], res[min(i + 1, L - 1)]) for i in range(L)]
    mid = (B, chans[-1], res[-1], res[-1])
    up = [(B, chans[L - 1 - i], res[max(L - 2 - i, 0)], res[max(L - 2 - i, 0)]) for i in range(L)]
    return down, mid, up


@pytest.mark.parametrize("preset", ["tiny", "digits",
                                    pytest.param("ddpm_cifar10", marks=pytest.mark.slow)])
def test_shapes_at_every_level(preset):
    model = getattr(UNet, preset)().eval()
    cfg = model.config
    B = 2 if preset != "ddpm_cifar10" else 1
    seen = {}

    def hook(name):
        def f(mod, inp, out):
            seen[name] = tuple((out[0] if isinstance(out, tuple) else out).shape)
        return f

    for i, b in enumerate(model.down_blocks):
        b.register_forward_hook(hook(f"down{i}"))
    for i, b in enumerate(model.up_blocks):
        b.register_forward_hook(hook(f"up{i}"))
    model.mid_block.register_forward_hook(hook("mid"))
    x = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    with torch.no_grad():
        y = model(x, torch.randint(0, 1000, (B,)))
    down, mid, up = _expected_shapes(cfg, B)
    assert [seen[f"down{i}"] for i in range(cfg.num_levels)] == down
    assert seen["mid"] == mid
    assert [seen[f"up{i}"] for i in range(cfg.num_levels)] == up
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_attention_placement():
    cfg = UNetConfig(sample_size=16, base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(16, 4),
                     norm_num_groups=8, layers_per_block=2)
    m = UNet(cfg)
    assert [b.attentions is not None for b in m.down_blocks] == [True, False, True]
    assert [b.attentions is not None for b in m.up_blocks] == [True, False, True]
    assert len(m.down_blocks[0].attentions) == 2 and len(m.up_blocks[0].attentions) == 3
    assert UNet(cfg, mid_attention=False).mid_block.attentions is None


def test_other_image_sizes_run():
    # The network is convolutional: any size divisible by 2**(levels-1) runs (attention placement fixed).
    m = randomise(UNet.tiny()).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 12, 6), 1).shape == (1, 3, 12, 6)
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.randn(1, 3, 7, 8), 1)
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(1, 4, 8, 8), 1)


def test_input_of_another_dtype_is_named():
    # torch's own message ("Input type (c10::Half) and bias type (float) should be the same") names neither
    # argument; under autocast the ops cast their inputs, so there another dtype is the point.
    m = randomise(UNet.tiny()).eval()
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(TypeError, match=f"x: expected torch.float32, the dtype of the network's parameters, "
                                            f"got {dtype}"):
            m(torch.randn(1, 3, 8, 8, dtype=dtype), 1)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        m([[0.0]], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 input to the float32 network
        assert m(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16), 1).dtype == torch.bfloat16
    with torch.no_grad():
        assert m.double()(torch.randn(1, 3, 8, 8, dtype=torch.float64), 1).dtype == torch.float64


def test_timestep_forms_agree():
    m = randomise(UNet.tiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x, torch.tensor([17, 17]))
        for t in (17, torch.tensor(17), torch.tensor([17]), torch.tensor([17.0, 17.0])):
            assert torch.equal(m(x, t), ref), t
        # different timesteps per sample give different outputs
        assert not torch.allclose(m(x, torch.tensor([17, 500])), ref)
    with pytest.raises(ValueError, match="t: expected"):
        m(x, torch.tensor([1, 2, 3]))
    # accepted before: NaN/inf (all-NaN images), a bool tensor (True as 1), a complex one (its imaginary part
    # dropped); 2**63 was torch's "value cannot be converted to type int64_t without overflow"
    for t, err, text in [(float("nan"), ValueError, "t: expected a finite timestep, got nan"),
                         (float("inf"), ValueError, "t: expected a finite timestep, got inf"),
                         (2**63, ValueError, "t: expected a finite timestep, got 9223372036854775808"),
                         (torch.tensor([float("nan"), 1.0]), ValueError, r"t: expected finite timesteps, got \[nan"),
                         (torch.tensor([True, False]), TypeError, "t: expected an integer or float timestep tensor, "
                                                                  "got torch.bool"),
                         (torch.tensor([1 + 1j, 2]), TypeError, "got torch.complex64")]:
        with pytest.raises(err, match=text):
            m(x, t)
    with pytest.raises(ValueError, match="x: height and width must be positive multiples of 2"):
        m(torch.randn(1, 3, 0, 8), 3)  # (a convolution's "Kernel size can't be greater than actual input size")


# ------------------------------------------------------------------------------------------------
# time embedding: the original DDPM formula, independent float64 implementation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip,shift", [(False, 1.0), (True, 0.0), (False, 0.0)])
def test_time_embedding_matches_formula(flip, shift):
    dim = 64
    te = SinusoidalTimesteps(dim, flip, shift)
    t = torch.tensor([0, 1, 17, 999, 523])
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - shift))
    arg = t.double()[:, None] * freqs[None]
    ref = torch.cat([torch.cos(arg), torch.sin(arg)] if flip else [torch.sin(arg), torch.cos(arg)], dim=1)
    # fp32 arguments up to ~1000 rad: an fp32 ulp of the argument is 6e-5
    assert (te(t).double() - ref).abs().max().item() < 2e-4


def test_time_frequencies_are_a_non_persistent_buffer():
    m = UNet.tiny()
    assert "time_proj.freqs" in dict(m.named_buffers())
    assert not any("freqs" in k for k in m.state_dict())


def test_no_constant_tensors_created_per_forward():
    # The time-embedding frequencies and every other constant are made at construction: a forward
    # runs no arange / exp / full / ones / zeros / scalar_tensor.
    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    m = UNet.tiny().eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with torch.no_grad(), Record() as rec:
        m(x, t)
    constant_makers = {f"aten.{n}" for n in ("arange", "exp", "full", "ones", "zeros", "scalar_tensor",
                                             "lift_fresh", "empty")}
    made = [o for o in rec.ops if o in constant_makers]
    assert not made, made


def test_time_projections_are_each_blocks_own_and_follow_weight_updates():
    # The U-Net computes every ResNet block's time_emb_proj in one product; each must equal the
    # block's own Linear, and the concatenated weights kept by steady_weights() must follow in-place
    # updates, load_state_dict and replaced parameters.
    from fastddpm.models.unet import ResnetBlock

    m = randomise(UNet.tiny()).eval()
    blocks = [b for b in m.modules() if isinstance(b, ResnetBlock)]
    temb = torch.randn(2, m.config.time_embed_dim)

    def check():
        projs = m._time_projections(temb)
        assert len(projs) == len(blocks)
        for b, p in zip(blocks, projs):
            # One product against another in fp32 whose BLAS blocking differs (one concatenated GEMM vs each
            # Linear): each is within K u sum|w x| + u|b| of the exact value (the dot-product forward-error
            # bound, K = in_features, u = 2^-24), so they differ by at most twice that; a stale cached weight
            # is off by O(|w x|). A fixed 1e-6 failed now and then on the unscaled randn weights below.
            lin = b.time_emb_proj
            scale = temb.abs() @ lin.weight.abs().T + lin.bias.abs()
            bound = 2 * (lin.in_features + 1) * 2.0**-24 * scale
            err = (p - lin(temb)).abs()
            assert (err <= bound).all(), f"error {err.max().item():.3g} > bound {bound.flatten()[err.argmax()]:.3g}"

    with torch.no_grad(), m.steady_weights():  # the concatenation kept for a sampling loop
        check()
        blocks[0].time_emb_proj.weight.add_(1.0)  # in place (an optimizer step)
        check()
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd[next(k for k in sd if k.endswith("time_emb_proj.bias"))] += 2.0
        m.load_state_dict(sd)
        check()
        blocks[-1].time_emb_proj.weight = torch.nn.Parameter(torch.randn_like(blocks[-1].time_emb_proj.weight))
        check()
        assert m._temb_cache is not None
    assert m._temb_cache is None  # dropped with the block
    # Outside it nothing is kept: updates that bump no version (a fused optimizer, .data edits) are seen. A kept
    # concatenation missed both: no_grad outputs after a training step used the old weights.
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        check()
    m._time_projections(temb)[0].square().sum().backward()
    opt.step()
    with torch.no_grad():
        check()
        for b in blocks:
            b.time_emb_proj.weight.data.mul_(0.5)
        check()
    # With autograd the same values, and gradients reach every block's projection.
    projs = m._time_projections(temb)
    sum(p.square().sum() for p in projs).backward()
    assert all(b.time_emb_proj.weight.grad is not None for b in blocks)


def test_a_replaced_time_projection_is_the_one_used():
    """The time projections were a list taken at construction: a time_emb_proj replaced afterwards (a LoRA
    wrapper, a quantised layer) changed nothing, and got no gradient."""
    from fastddpm.models.unet import ResnetBlock

    m = randomise(UNet.tiny()).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        y0 = m(x, t)
    r = next(b for b in m.modules() if isinstance(b, ResnetBlock))
    old = r.time_emb_proj

    class Wrapped(torch.nn.Module):  # no plain Linear: called as it is
        def __init__(self):
            super().__init__()
            # (per channel: a shift equal across a group is what the GroupNorm after it takes out)
            self.inner, self.extra = old, torch.nn.Parameter(torch.linspace(-3, 3, old.out_features))

        def forward(self, e):
            return self.inner(e) + self.extra

    r.time_emb_proj = Wrapped()
    with torch.no_grad():
        y1 = m(x, t)
        r.time_emb_proj.extra.zero_()
        assert torch.allclose(m(x, t), y0, atol=1e-6)  # the wrapper adding nothing: the old output
    assert (y1 - y0).abs().max() > 1e-3
    m(x, t).square().mean().backward()
    assert r.time_emb_proj.extra.grad is not None


def test_sample_keeps_the_time_projections_for_its_loop():
    """fastddpm.sample runs its steps in steady_weights(): the concatenation made once, dropped at the end."""
    import fastddpm

    m = randomise(UNet.tiny()).eval()
    seen = []
    fastddpm.sample(m, (1, 3, 8, 8), steps=3, sampler="ddim", progress=False,
                    callback=lambda *a: seen.append(m._temb_cache is not None))
    assert seen and all(seen) and m._temb_cache is None


# ------------------------------------------------------------------------------------------------
# config checks and serialisation
# ------------------------------------------------------------------------------------------------
def test_config_json_round_trip():
    cfg = UNetConfig(sample_size=16, base_channels=32, channel_mult=(1, 2, 3), attention_resolutions=(8,),
                     head_dim=16, dropout=0.2, norm_num_groups=16, norm_eps=1e-5, flip_sin_to_cos=True,
                     freq_shift=0, time_embedding_dim=96, downsample_padding=1, learned_variance=True)
    s = cfg.to_json()
    back = UNetConfig.from_json(s)
    assert back == cfg
    assert UNet(back).state_dict().keys() == UNet(cfg).state_dict().keys()
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    for bad in ("[]", "null"):  # a generic "argument after ** must be a mapping" / "'NoneType' is not iterable"
        with pytest.raises(TypeError, match="UNetConfig: expected a dict of settings, got"):
            UNetConfig.from_json(bad)
    with pytest.raises(ValueError, match="UNetConfig: not JSON"):
        UNetConfig.from_json("{")


@pytest.mark.parametrize("kwargs,match", [
    (dict(base_channels=48, norm_num_groups=32), "norm_num_groups"),
    (dict(base_channels=32, channel_mult=(1, 3), norm_num_groups=64), "norm_num_groups"),
    (dict(attention_resolutions=(12,)), "attention_resolutions: resolution 12 never occurs"),
    (dict(sample_size=20, channel_mult=(1, 2, 2, 2)), "sample_size: 20 cannot be halved 3 times"),
    (dict(sample_size=7, channel_mult=(1, 2), attention_resolutions=()), "sample_size: 7"),
    (dict(downsample_padding=2), "downsample_padding"),
    (dict(num_heads=3), "num_heads"),
    (dict(head_dim=48), "head_dim"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(dropout=1.5), "dropout"),
    (dict(in_channels=0), "in_channels"),
    # JSON/TOML values of the wrong type: "12" was read as the levels (1, 2), "no" as true
    (dict(channel_mult="12"), "channel_mult: expected a list of integers, got '12'"),
    (dict(mid_attention="no"), "mid_attention: expected true or false, got 'no'"),
    (dict(dropout="a"), "dropout: expected a finite number, got 'a'"),
    (dict(base_channels=True), "base_channels: expected an integer, got True"),
    # a first level 1 wide: no frequency in the time embedding, a network blind to t (built before)
    (dict(base_channels=1, channel_mult=(1, 2), norm_num_groups=1, attention_resolutions=()),
     "base_channels: the first level's width 1 leaves the sinusoidal time embedding no frequency"),
    # the embedding is the first level's width (8 here), not base_channels': half of it is 4
    (dict(base_channels=4, channel_mult=(2, 2), norm_num_groups=4, attention_resolutions=(), freq_shift=4),
     "freq_shift: 4 equals half of the first level's width 8"),
])
def test_bad_config_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_numpy_integers_are_integers_in_the_config():
    """channel_mult took numpy integers, sample_size refused them with "expected a positive int, got
    np.int64(8)" (after check_fields had accepted them)."""
    import numpy as np

    cfg = UNetConfig(sample_size=np.int64(8), base_channels=np.int32(32), channel_mult=(np.int64(1), 2),
                     attention_resolutions=(4,), norm_num_groups=np.int64(8), head_dim=np.int64(16))
    assert cfg == UNetConfig(sample_size=8, base_channels=32, channel_mult=(1, 2), attention_resolutions=(4,),
                             norm_num_groups=8, head_dim=16)
    assert type(cfg.sample_size) is int and UNetConfig.from_json(cfg.to_json()) == cfg


# ------------------------------------------------------------------------------------------------
# training: gradients, state_dict, checkpointing, channels_last
# ------------------------------------------------------------------------------------------------
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = randomise(UNet.tiny(num_heads=2)).train()
    x = torch.randn(2, 3, 8, 8)
    loss = (m(x, torch.tensor([3, 700])) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


def test_state_dict_round_trip():
    a = randomise(UNet.tiny(), seed=1).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = randomise(UNet(UNetConfig.from_json(a.config.to_json())), seed=2).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(a(x, 5), b(x, 5))
        b.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(a(x, 5), b(x, 5))


def test_dropout_in_train_mode_only():
    m = randomise(UNet.tiny(dropout=0.3))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m.train()
        assert not torch.equal(m(x, 4), m(x, 4))
        m.eval()
        assert torch.equal(m(x, 4), m(x, 4))


def test_gradient_checkpointing_same_gradients():
    from fastddpm.models.unet import ResnetBlock
    from fastddpm.nn import AttentionBlock

    m = randomise(UNet.tiny(channel_mult=(1, 2, 2), sample_size=8, attention_resolutions=(4,))).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    noise = torch.randn_like(x)
    # Recomputation is what checkpointing is: count the calls of one ResNet block and one attention
    # block per training step (a pre-hook: non-reentrant checkpointing stops recomputing as soon as the
    # last saved tensor is rebuilt, so the end of a forward, where a forward hook fires, may never come).
    watched = [next(b for b in m.modules() if isinstance(b, cls)) for cls in (ResnetBlock, AttentionBlock)]
    calls = [0] * len(watched)
    for i, b in enumerate(watched):
        b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    def step():
        calls[:] = [0] * len(watched)
        saved[0] = 0
        m.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = m(x, t)
        (out - noise).pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, list(calls), saved[0]

    out0, g0, calls0, saved0 = step()
    assert calls0 == [1, 1]
    assert not m.gradient_checkpointing
    m.enable_gradient_checkpointing()
    assert m.gradient_checkpointing
    out1, g1, calls1, saved1 = step()
    assert calls1 == [2, 2], "the blocks were not recomputed in the backward"
    # what checkpointing is for: the blocks' activations are not kept for the backward
    assert saved1 < saved0 / 2, (saved1, saved0)
    assert _rel(out1, out0) < 1e-6
    for n in g0:
        assert _rel(g1[n], g0[n]) < 1e-5, n
    # without autograd there is nothing to recompute: one call
    with torch.no_grad():
        calls[:] = [0] * len(watched)
        m(x, t)
    assert calls == [1, 1]
    m.disable_gradient_checkpointing()
    assert not m.gradient_checkpointing
    assert step()[2] == [1, 1]


def test_channels_last_end_to_end():
    m = randomise(UNet.tiny(num_heads=2)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        ref = m(x, t)
    m = m.to(memory_format=torch.channels_last)
    layouts = []

    def hook(mod, inp, out):
        if out.dim() == 4 and out.shape[-1] > 1:
            layouts.append((type(mod).__name__, out.is_contiguous(memory_format=torch.channels_last)))

    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d) or type(mod).__name__ in ("GroupNormSiLU", "AttentionBlock"):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        y = m(x, t)  # a contiguous input is converted to the model's layout
    assert _rel(y, ref) < 1e-5
    not_cl = [name for name, cl in layouts if not cl]
    assert not not_cl, f"activations left channels_last in: {not_cl}"
    # and the training path too
    m.train()
    out = m(x, t)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_inference_mode():
    m = randomise(UNet.tiny()).eval()
    assert all(p.requires_grad for p in m.parameters())  # what would make autograd record
    x = torch.randn(1, 3, 8, 8)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    # Without autograd nothing is recorded: no graph on the output and no tensor kept for a backward.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.inference_mode():
            y = m(x, 3)
        assert y.is_inference() and not y.requires_grad and y.grad_fn is None
        with torch.no_grad():
            y_ng = m(x, 3)
        assert not y_ng.requires_grad and y_ng.grad_fn is None
    assert not saved, f"tensors saved for backward without autograd: {saved[:4]}"
    assert torch.equal(y, y_ng)
    # the same hooks do see a forward with autograd (they can fail)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        assert m(x, 3).requires_grad
    assert saved


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    # Compiled-code caches are process-wide: start from none, and leave none behind even on failure.
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_no_graph_breaks(fresh_dynamo):
    import torch._dynamo

    m = randomise(UNet.tiny(num_heads=2)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        explanation = torch._dynamo.explain(m)(x, t)
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_compile_training_graph_no_graph_breaks(fresh_dynamo):
    import torch._dynamo

    m = randomise(UNet.tiny()).train()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])

    def step(x, t):
        return m(x, t).pow(2).mean()

    explanation = torch._dynamo.explain(step)(x, t)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


def test_compile_fullgraph_matches_eager(fresh_dynamo):
    # The compiled graph (fullgraph: any graph break raises) must compute what eager does: the U-Net takes
    # compile-only branches (the time projections) and the fused ops are traced through their fake
    # implementations, so agreement is not automatic. aot_eager runs the traced forward and backward
    # graphs without Inductor's code generation, so it tests the tracing, not a compiler.
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    m = randomise(UNet.tiny(num_heads=2)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    noise = torch.randn_like(x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    with torch.no_grad():
        ref = m(x, t)
        out = compiled(x, t)
    assert counter.frame_count == 1 and counter.op_count > 0  # it ran the compiled graph
    assert _rel(out, ref) < 1e-5

    # training: the same loss and the same gradients through the traced backward
    m.train()

    def grads(f):
        m.zero_grad(set_to_none=True)
        loss = (f(x, t) - noise).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    loss0, g0 = grads(m)
    loss1, g1 = grads(compiled)
    assert counter.frame_count == 2  # recompiled for grad mode, not run eagerly
    assert _rel(loss1, loss0) < 1e-5
    for n in g0:
        assert g1[n] is not None, f"{n}: no gradient through the compiled graph"
        assert _rel(g1[n], g0[n]) < 1e-5, n


# ------------------------------------------------------------------------------------------------
# the original DDPM layout: an independent re-implementation of Ho et al.'s network (diffusion_tf's
# unet.py as ported to PyTorch by pesser/pytorch_diffusion and ermongroup/ddim), written out here
# ------------------------------------------------------------------------------------------------
class _RefResnet(torch.nn.Module):
    def __init__(self, cin, cout, temb, groups):
        super().__init__()
        nn = torch.nn
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb):
        F = torch.nn.functional
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _RefAttn(torch.nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (torch.nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c ** -0.5
        w = torch.softmax(w, dim=2)  # (b, query, key)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class _RefDDPM(torch.nn.Module):
    def __init__(self, ch, ch_mult, nrb, attn_res, resolution, groups, in_ch=3):
        super().__init__()
        nn = torch.nn
        self.ch, self.L, self.nrb = ch, len(ch_mult), nrb
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, 4 * ch), nn.Linear(4 * ch, 4 * ch)])
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i in range(self.L):
            d = nn.Module()
            d.block, d.attn = nn.ModuleList(), nn.ModuleList()
            bin_, bout = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(nrb):
                d.block.append(_RefResnet(bin_, bout, 4 * ch, groups))
                bin_ = bout
                if res in attn_res:
                    d.attn.append(_RefAttn(bin_, groups))
            if i != self.L - 1:
                d.downsample = nn.Module()
                d.downsample.conv = nn.Conv2d(bin_, bin_, 3, stride=2)
                res //= 2
            self.down.append(d)
        self.mid = nn.Module()
        self.mid.block_1 = _RefResnet(bin_, bin_, 4 * ch, groups)
        self.mid.attn_1 = _RefAttn(bin_, groups)
        self.mid.block_2 = _RefResnet(bin_, bin_, 4 * ch, groups)
        self.up = nn.ModuleList()
        for i in reversed(range(self.L)):
            u = nn.Module()
            u.block, u.attn = nn.ModuleList(), nn.ModuleList()
            bout, skip = ch * ch_mult[i], ch * ch_mult[i]
            for j in range(nrb + 1):
                if j == nrb:
                    skip = ch * in_mult[i]
                u.block.append(_RefResnet(bin_ + skip, bout, 4 * ch, groups))
                bin_ = bout
                if res in attn_res:
                    u.attn.append(_RefAttn(bin_, groups))
            if i != 0:
                u.upsample = nn.Module()
                u.upsample.conv = nn.Conv2d(bin_, bin_, 3, padding=1)
                res *= 2
            self.up.insert(0, u)
        self.norm_out = nn.GroupNorm(groups, bin_, eps=1e-6)
        self.conv_out = nn.Conv2d(bin_, in_ch, 3, padding=1)

    def forward(self, x, t):
        F = torch.nn.functional
        half = self.ch // 2
        f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        e = t.float()[:, None] * f[None]
        temb = torch.cat([torch.sin(e), torch.cos(e)], dim=1)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(x)]
        for i in range(self.L):
            for j in range(self.nrb):
                h = self.down[i].block[j](hs[-1], temb)
                if len(self.down[i].attn):
                    h = self.down[i].attn[j](h)
                hs.append(h)
            if i != self.L - 1:
                hs.append(self.down[i].downsample.conv(F.pad(hs[-1], (0, 1, 0, 1))))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for i in reversed(range(self.L)):
            for j in range(self.nrb + 1):
                h = self.up[i].block[j](torch.cat([h, hs.pop()], dim=1), temb)
                if len(self.up[i].attn):
                    h = self.up[i].attn[j](h)
            if i != 0:
                h = self.up[i].upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def test_cifar10_preset_is_the_original_ddpm_network():
    ref = _RefDDPM(128, (1, 2, 2, 2), 2, (16,), 32, 32)
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307
    ours = UNet.ddpm_cifar10()
    assert {k: v.shape for k, v in ours.ddpm_state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}


def test_original_ddpm_layout_parity_and_round_trip():
    torch.manual_seed(0)
    ref = randomise(_RefDDPM(32, (1, 2, 2), 1, (8,), 16, 8), seed=7).eval()
    ours = UNet(UNetConfig(sample_size=16, base_channels=32, channel_mult=(1, 2, 2), layers_per_block=1,
                           attention_resolutions=(8,), dropout=0.0, norm_num_groups=8, norm_eps=1e-6,
                           flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)).eval()
    ours.load_ddpm_state_dict(ref.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([11, 640])
    with torch.no_grad():
        assert _rel(ours(x, t), ref(x, t)) < 1e-5
    back = ours.ddpm_state_dict()
    sd = ref.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="missing original DDPM key"):
        ours.load_ddpm_state_dict({k: v for k, v in sd.items() if not k.startswith("mid.attn_1.q.")})
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(UNetConfig(sample_size=16, base_channels=32, channel_mult=(2, 2), norm_num_groups=8,
                        attention_resolutions=())).ddpm_state_dict()
