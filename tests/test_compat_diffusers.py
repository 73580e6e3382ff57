"""fastddpm.UNet against diffusers' UNet2DModel (conversion both ways) and fastddpm.patch/unpatch.

diffusers' model is the independent reference: outputs must agree within relative error 1e-5 of the
output norm (fp32) on random inputs, random timesteps and random weights (norm weights and biases too,
so a misplaced norm or bias cannot hide behind their ones/zeros initialisation).
"""

import math

import pytest
import torch
from _utils import randomise
from _utils import rel_norm as _rel

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import fastddpm  # noqa: E402
from fastddpm import UNet, UNetConfig  # noqa: E402
from fastddpm.compat.diffusers import (  # noqa: E402
    FastddpmAttnProcessor,
    UnsupportedDiffusersConfig,
    config_from_diffusers,
    config_to_diffusers,
    from_diffusers,
    is_patched,
    patch,
    patched_blocks,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    to_diffusers,
    unpatch,
)

RTOL = 1e-5

# google/ddpm-cifar10-32's config.json (the hub is unreachable here; the fields are copied).
GOOGLE_DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, act_fn="silu", attention_head_dim=None,
    block_out_channels=(128, 256, 256, 256), center_input_sample=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, layers_per_block=2, mid_block_scale_factor=1,
    norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional",
)

# Small configurations covering the options: widths, levels, attention places, heads, eps, flip/shift,
# padding, mid scale, no mid attention, learned variance, time-embedding width.
SMALL = {
    "two_levels_attn_low": dict(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0),
    "three_levels_attn_high_multihead": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 32, 64), layers_per_block=2,
        norm_num_groups=16, down_block_types=("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1),
    "no_attention_anywhere": dict(
        sample_size=8, block_out_channels=(16, 48), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=1, downsample_padding=1),
    "all_levels_attention_mid_scale": dict(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=None,
        mid_block_scale_factor=math.sqrt(2), norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=0,
        downsample_padding=0),
    "learned_variance_custom_temb_single_level": dict(
        sample_size=4, in_channels=3, out_channels=6, block_out_channels=(32,), layers_per_block=1,
        norm_num_groups=32, down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
        attention_head_dim=16, time_embedding_dim=80, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1),
    "diffusers_defaults_head_dim_8": dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def _inputs(cfg: dict, B: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = cfg["sample_size"]
    x = torch.randn(B, cfg.get("in_channels", 3), s, s, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t


def _diffusers_model(cfg: dict, seed: int = 0) -> UNet2DModel:
    return randomise(UNet2DModel(**cfg), seed).eval()


# ------------------------------------------------------------------------------------------------
# parameter counts
# ------------------------------------------------------------------------------------------------
def test_cifar10_preset_has_diffusers_parameter_count_and_keys():
    d = UNet2DModel(**GOOGLE_DDPM_CIFAR10)
    n = sum(p.numel() for p in d.parameters())
    ours = UNet.ddpm_cifar10()
    assert n == 35_746_307 == ours.num_parameters()
    assert config_from_diffusers(d.config) == UNetConfig(**{**ours.config.to_dict(), "dropout": 0.0,
                                                            "out_channels": 3})
    assert set(state_dict_to_diffusers(ours.state_dict())) == set(d.state_dict())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_state_dict_keys_and_shapes_agree(name):
    d = UNet2DModel(**SMALL[name])
    ours = UNet(config_from_diffusers(d.config))
    conv = state_dict_from_diffusers(d.state_dict())
    shapes = {k: tuple(v.shape) for k, v in conv.items()}
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# output parity, diffusers -> fastddpm and fastddpm -> diffusers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SMALL))
def test_from_diffusers_parity(name):
    cfg = SMALL[name]
    d = _diffusers_model(cfg)
    u = from_diffusers(d)
    assert not u.training
    x, t = _inputs(cfg, 2)
    with torch.no_grad():
        ref = d(x, t).sample
        out = u(x, t)
    assert out.shape == ref.shape
    assert _rel(out, ref) < RTOL


@pytest.mark.parametrize("name", sorted(SMALL))
def test_to_diffusers_parity(name):
    cfg = config_from_diffusers(SMALL[name])
    u = randomise(UNet(cfg), seed=3).eval()
    d = to_diffusers(u)
    assert isinstance(d, UNet2DModel) and not d.training
    x, t = _inputs(SMALL[name], 2, seed=4)
    with torch.no_grad():
        ref = d(x, t).sample
        out = u(x, t)
    assert _rel(out, ref) < RTOL
    # and back again gives the same weights
    back, sd = from_diffusers(d).state_dict(), u.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# Configurations written natively in fastddpm's terms (not read from a diffusers config), covering what
# config_to_diffusers has to translate: a head count (diffusers fixes the head width), learned variance
# (out_channels from learned_variance), the time-embedding conventions, padding, a first level wider than
# base_channels, no middle attention, a custom time-embedding width, a non-unit mid scale.
NATIVE = {
    "tiny_two_heads_learned_variance": dict(
        sample_size=8, base_channels=16, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(4,),
        num_heads=2, norm_num_groups=4, learned_variance=True),
    "four_heads_flip_shift0_padding1": dict(
        sample_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2, 2), layers_per_block=2,
        attention_resolutions=(4,), num_heads=4, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True,
        freq_shift=0, downsample_padding=1, dropout=0.2),
    "sin_cos_shift0_head_dim_no_mid_attn": dict(
        sample_size=8, base_channels=16, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(8,),
        head_dim=4, mid_attention=False, norm_num_groups=4, flip_sin_to_cos=False, freq_shift=0,
        learned_variance=True, in_channels=2),
    # channel_mult[0] != 1 with the default time-embedding width (4 x base_channels, where diffusers'
    # default is 4 x the first width), and widths that are not multiples of the first
    "cos_sin_shift1_wide_first_level": dict(
        sample_size=8, base_channels=8, channel_mult=(2, 3), layers_per_block=1, attention_resolutions=(8, 4),
        head_dim=8, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=1,
        mid_block_scale_factor=math.sqrt(2), out_channels=5),
    "custom_temb_width_fractional_shift": dict(
        sample_size=8, base_channels=16, channel_mult=(1, 1), layers_per_block=1, attention_resolutions=(),
        norm_num_groups=4, flip_sin_to_cos=False, freq_shift=0.5, time_embedding_dim=40),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_to_diffusers_parity_native_config(name):
    cfg = UNetConfig(**NATIVE[name])
    u = randomise(UNet(cfg), seed=6).eval()
    d = to_diffusers(u)
    assert d.config.out_channels == cfg.out_channels_resolved
    # the same heads in every block (attention blocks have the same module names in both)
    heads = {n: m.heads for n, m in d.named_modules() if type(m).__name__ == "Attention"}
    assert heads == {n: m.heads for n, m in u.named_modules() if type(m).__name__ == "AttentionBlock"}
    x, t = _inputs({"sample_size": cfg.sample_size, "in_channels": cfg.in_channels}, 2, seed=7)
    with torch.no_grad():
        ref = d(x, t).sample
        out = u(x, t)
    assert out.shape == ref.shape == (2, cfg.out_channels_resolved, cfg.sample_size, cfg.sample_size)
    assert _rel(out, ref) < RTOL
    # and back: the same network (its config may be spelt differently) with the same weights
    back = from_diffusers(d)
    sd, bsd = u.state_dict(), back.state_dict()
    assert bsd.keys() == sd.keys() and all(torch.equal(bsd[k], sd[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(back(x, t), out)


@pytest.mark.slow
def test_cifar10_parity_both_directions():
    d = _diffusers_model(GOOGLE_DDPM_CIFAR10)
    u = from_diffusers(d)
    x, t = _inputs(GOOGLE_DDPM_CIFAR10, 1)
    with torch.no_grad():
        ref = d(x, t).sample
        assert _rel(u(x, t), ref) < RTOL
    u2 = randomise(UNet.ddpm_cifar10(), seed=5).eval()
    d2 = to_diffusers(u2)
    with torch.no_grad():
        assert _rel(u2(x, t), d2(x, t).sample) < RTOL


def test_fastddpm_config_to_diffusers_and_back():
    cfg = UNetConfig(sample_size=16, base_channels=32, channel_mult=(1, 2), attention_resolutions=(8,),
                     num_heads=4, norm_num_groups=8, learned_variance=True, dropout=0.1)
    kw = config_to_diffusers(cfg)
    assert kw["attention_head_dim"] == 16 and kw["out_channels"] == 6
    back = config_from_diffusers(kw)
    assert back.head_dim == 16 and back.out_channels == 6
    assert UNet(back).num_parameters() == UNet(cfg).num_parameters()
    # a head count diffusers cannot express (two attention widths, fixed head count)
    bad = UNetConfig(sample_size=16, base_channels=32, channel_mult=(1, 2), attention_resolutions=(16,),
                     num_heads=2, norm_num_groups=8)
    with pytest.raises(UnsupportedDiffusersConfig, match="num_heads"):
        config_to_diffusers(bad)


@pytest.mark.parametrize("option,value", [
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("center_input_sample", True),
    ("act_fn", "gelu"),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("mid_block_type", None),
    ("attn_norm_num_groups", 4),
])
def test_unsupported_option_names_itself(option, value):
    cfg = {**SMALL["two_levels_attn_low"], option: value}
    with pytest.raises(UnsupportedDiffusersConfig, match=option):
        config_from_diffusers(cfg)


@pytest.mark.parametrize("down,up,match", [
    (("DownBlock2D", "SkipDownBlock2D"), ("UpBlock2D", "UpBlock2D"),
     "down_block_types\\[1\\]='SkipDownBlock2D'"),
    (("DownBlock2D", "AttnDownBlock2D"), ("ResnetUpsampleBlock2D", "UpBlock2D"), "up_block_types\\[0\\]"),
    (("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "UpBlock2D"), "same resolutions"),
])
def test_unsupported_blocks_name_the_block(down, up, match):
    cfg = {**SMALL["two_levels_attn_low"], "down_block_types": down, "up_block_types": up}
    with pytest.raises(UnsupportedDiffusersConfig, match=match):
        config_from_diffusers(cfg)


def test_keys_left_out_take_diffusers_defaults():
    # A config.json may leave out keys whose UNet2DModel defaults diffusers fills in (the block types and
    # widths); reading them as None gave "'NoneType' object is not iterable". diffusers' from_config fills them.
    for part in ({"sample_size": 8}, {"sample_size": 8, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}):
        assert config_from_diffusers(part) == config_from_diffusers(UNet2DModel.from_config(part).config)
    for key, value in (("down_block_types", None), ("up_block_types", "UpBlock2D"), ("block_out_channels", "abc"),
                       ("block_out_channels", [True, 2])):
        with pytest.raises(UnsupportedDiffusersConfig, match=key):
            config_from_diffusers({**SMALL["two_levels_attn_low"], key: value})


def test_pipeline_from_a_training_run_folder_says_what_it_is(tmp_path):
    from fastddpm.compat.folder import FolderError

    (tmp_path / "config.json").write_text('{"model": "tiny", "steps": 2}')  # a run's TrainConfig
    (tmp_path / "train.log").write_text("")
    with pytest.raises(FolderError, match="a fastddpm training run or checkpoint, not a diffusers folder"):
        fastddpm.DDPMPipeline.from_pretrained(tmp_path)
    (tmp_path / "train.log").unlink()
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(FolderError, match="config.json: expected a JSON object of settings, got a list"):
        fastddpm.DDPMPipeline.from_pretrained(tmp_path)


def test_a_folder_with_legacy_attention_names_loads_as_diffusers_loads_it(tmp_path):
    """Checkpoints saved before diffusers renamed the attention weights (query, key, value, proj_attn; the
    google/ddpm-* checkpoints among them) load in diffusers, which renames them; they failed here with a bare
    "Error(s) in loading state_dict". Weights of another network are a FolderError naming the folder."""
    from safetensors.torch import load_file, save_file

    from fastddpm.compat.folder import FolderError

    cfg = SMALL["two_levels_attn_low"]
    d = _diffusers_model(cfg)
    DDPMPipeline(unet=d, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    sd = {}
    for k, v in load_file(str(weights)).items():
        for a, b in old.items():
            k = k.replace(a, b)
        sd[k] = v
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    save_file(sd, str(weights), metadata={"format": "pt"})
    x, t = _inputs(cfg, 2)
    theirs = DDPMPipeline.from_pretrained(tmp_path / "p").unet
    ours = fastddpm.DDPMPipeline.from_pretrained(tmp_path / "p").unet
    with torch.no_grad():
        want = d(x, t).sample
        assert _rel(theirs(x, t).sample, want) < RTOL  # diffusers reads the old names
        assert _rel(ours(x, t), want) < RTOL
    save_file({k: v for k, v in sd.items() if ".query." not in k}, str(weights), metadata={"format": "pt"})
    with pytest.raises(FolderError, match=r"unet: the weights are not those of the UNet2DModel its config\.json "
                                          r"describes \(.*Missing key"):
        fastddpm.DDPMPipeline.from_pretrained(tmp_path / "p")


def test_a_head_width_that_does_not_divide_the_attention_is_refused_naming_diffusers_option():
    """diffusers then attends over width // attention_head_dim heads (15 of the 16 channels for 3); it was a
    plain ValueError naming fastddpm's head_dim."""
    cfg = {**SMALL["two_levels_attn_low"], "attention_head_dim": 3}
    with pytest.raises(UnsupportedDiffusersConfig, match=r"attention_head_dim=3 .* divisor of the attention widths "
                                                         r"\[32\]"):
        config_from_diffusers(cfg)
    config_from_diffusers({**cfg, "attention_head_dim": 8})
    with pytest.raises(ValueError):  # fewer widths than blocks: a ValueError as before the check, no IndexError
        config_from_diffusers({**SMALL["two_levels_attn_low"], "block_out_channels": [32]})


def test_conversion_arguments_of_another_kind_are_named():
    # Each was an AttributeError or "'NoneType' object is not iterable" naming nothing.
    d = UNet2DModel(**SMALL["two_levels_attn_low"])
    for call, text in [(lambda: from_diffusers(None), "model: expected a diffusers UNet2DModel, got NoneType"),
                       (lambda: from_diffusers(torch.nn.Linear(2, 2)), "model: expected a diffusers UNet2DModel"),
                       (lambda: from_diffusers(UNet.tiny()), "already a fastddpm.UNet"),
                       (lambda: to_diffusers(d), "unet: expected a fastddpm.UNet, got UNet2DModel"),
                       (lambda: config_to_diffusers(dict(d.config)), "cfg: expected a fastddpm.UNetConfig, got dict"),
                       (lambda: config_from_diffusers(None), "config: expected a diffusers UNet2DModel"),
                       (lambda: config_from_diffusers(UNet.tiny().config), "got UNetConfig"),
                       (lambda: unpatch(None), "model: expected a torch.nn.Module"),
                       (lambda: is_patched(None), "model: expected a torch.nn.Module"),
                       (lambda: fastddpm.compat.diffusers.patched_blocks(None), "model: expected a torch.nn.Module"),
                       # a UNet2DConditionModel got through to load_state_dict's list of missing keys
                       (lambda: from_diffusers(diffusers.UNet2DConditionModel(
                           sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                           cross_attention_dim=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D")),
                        "model: expected a diffusers UNet2DModel, got UNet2DConditionModel"),
                       # diffusers' FutureWarning, then KeyError 'items'; "'NoneType' object is not iterable"
                       (lambda: state_dict_from_diffusers(d), "sd: expected a state dict (names to tensors), got "
                                                              "UNet2DModel (pass model.state_dict())"),
                       (lambda: state_dict_to_diffusers(None), "sd: expected a state dict (names to tensors)")]:
        with pytest.raises(TypeError, match=text.replace("(", r"\(").replace(")", r"\)")):
            call()
    for size in ("8", 8.0, True, 0):
        with pytest.raises(UnsupportedDiffusersConfig, match="sample_size"):
            config_from_diffusers({**SMALL["two_levels_attn_low"], "sample_size": size})
    # float(None), "integer modulo by zero", and an error naming fastddpm's field (head_dim), not diffusers' option
    for option, value in (("dropout", None), ("norm_eps", "1e-5"), ("freq_shift", None),
                          ("mid_block_scale_factor", True), ("attention_head_dim", 0), ("attention_head_dim", 8.0)):
        with pytest.raises(UnsupportedDiffusersConfig, match=f"^{option}={value!r} is not supported"):
            config_from_diffusers({**SMALL["two_levels_attn_low"], option: value})


def test_unsupported_model_raises_from_a_real_model():
    d = UNet2DModel(**{**SMALL["two_levels_attn_low"], "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(UnsupportedDiffusersConfig, match="resnet_time_scale_shift"):
        from_diffusers(d)


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------
PATCH_CASES = ["two_levels_attn_low", "three_levels_attn_high_multihead", "all_levels_attention_mid_scale"]


@pytest.mark.parametrize("name", PATCH_CASES)
def test_patch_parity_and_unpatch_restores(name):
    cfg = SMALL[name]
    d = _diffusers_model(cfg)
    x, t = _inputs(cfg, 2)
    sd_before = {k: v.clone() for k, v in d.state_dict().items()}
    with torch.no_grad():
        ref = d(x, t).sample
        assert patch(d) is d and is_patched(d)
        out = d(x, t).sample
        assert _rel(out, ref) < RTOL
        assert d.state_dict().keys() == sd_before.keys()
        assert all(torch.equal(v, sd_before[k]) for k, v in d.state_dict().items())
        patch(d)  # idempotent
        assert _rel(d(x, t).sample, ref) < RTOL
        assert unpatch(d) is d and not is_patched(d)
        assert torch.equal(d(x, t).sample, ref)
    assert type(d.conv_act) is torch.nn.SiLU and type(d.conv_norm_out) is torch.nn.GroupNorm
    assert all(type(m).__module__.startswith("diffusers") or type(m).__module__.startswith("torch")
               for m in d.modules())


def test_patch_swaps_the_fused_ops_in(monkeypatch):
    # The patched model must actually call fastddpm's ops (not just agree with diffusers).
    import fastddpm.compat.diffusers as compat

    calls = {"gn": 0, "attn": 0}
    real_gn, real_attn = compat.group_norm_silu, compat._attention

    def gn(*a, **k):
        calls["gn"] += 1
        return real_gn(*a, **k)

    def attn(*a, **k):
        calls["attn"] += 1
        return real_attn(*a, **k)

    monkeypatch.setattr(compat, "group_norm_silu", gn)
    monkeypatch.setattr(compat, "_attention", attn)
    cfg = SMALL["two_levels_attn_low"]
    d = patch(_diffusers_model(cfg))
    with torch.no_grad():
        d(*_inputs(cfg, 1))
    n_resnets = sum(1 for m in d.modules() if type(m).__name__.endswith("ResnetBlock2D"))
    n_attn = sum(1 for m in d.modules() if type(m).__name__ == "Attention")
    assert calls["gn"] == 2 * n_resnets + n_attn + 1  # two per ResNet, one per attention, the output norm
    assert calls["attn"] == n_attn


def test_patch_training_gradients_match():
    cfg = SMALL["two_levels_attn_low"]
    d = _diffusers_model(cfg).train()
    x, t = _inputs(cfg, 2)
    noise = torch.randn_like(x)

    def grads():
        d.zero_grad(set_to_none=True)
        (d(x, t).sample - noise).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in d.named_parameters()}

    def check(g):
        for n in g0:
            if n.endswith("to_k.bias"):
                # Exactly zero in exact arithmetic (softmax ignores a bias added to every key), so both are
                # rounding noise: bound them against the weight's gradient instead.
                scale = g0[n.replace("bias", "weight")].norm()
                assert g[n].norm() < 1e-5 * scale and g0[n].norm() < 1e-5 * scale, n
                continue
            # gradients are sums over positions and batch: one order of magnitude looser than outputs
            assert _rel(g[n], g0[n]) < 1e-4, n

    g0 = grads()
    patch(d)
    check(grads())
    # diffusers' own gradient checkpointing still works through the patched blocks
    d.enable_gradient_checkpointing()
    check(grads())


def test_patched_model_save_load_and_pickle(tmp_path):
    cfg = SMALL["three_levels_attn_high_multihead"]
    d = patch(_diffusers_model(cfg))
    x, t = _inputs(cfg, 1)
    with torch.no_grad():
        out = d(x, t).sample
    d.save_pretrained(tmp_path / "unet")
    loaded = UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert not is_patched(loaded)
    with torch.no_grad():
        assert _rel(loaded(x, t).sample, out) < RTOL
    torch.save(d, tmp_path / "whole.pt")
    back = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert is_patched(back)
    with torch.no_grad():
        assert torch.equal(back(x, t).sample, out)


def test_a_patched_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """The patched classes existed only once patch() had run in the process: torch.load of a patched model
    elsewhere was "Can't get attribute 'FastddpmResnetBlock2D'"."""
    import subprocess
    import sys

    from _utils import repo_env

    cfg = SMALL["three_levels_attn_high_multihead"]
    d = patch(_diffusers_model(cfg))
    x, t = _inputs(cfg, 1)
    with torch.no_grad():
        out = d(x, t).sample
    torch.save({"model": d, "x": x, "t": t, "out": out}, tmp_path / "whole.pt")
    code = ("import sys, torch; import fastddpm.compat.diffusers as fd\n"
            "o = torch.load(sys.argv[1], weights_only=False)\n"
            "with torch.no_grad(): y = o['model'](o['x'], o['t']).sample\n"
            "print(fd.is_patched(o['model']), torch.equal(y, o['out']), fd.patched_blocks(o['model']))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "whole.pt")], capture_output=True, text=True,
                       env=repo_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["True", "True"], r.stdout
    assert r.stdout.split(" ", 2)[2].strip() == str(patched_blocks(d))
    with pytest.raises(AttributeError, match="has no attribute 'FastddpmNoSuchBlock'"):
        getattr(fastddpm.compat.diffusers, "FastddpmNoSuchBlock")  # noqa: B009


def test_an_attention_processor_made_directly_falls_back_to_diffusers_default():
    """FastddpmAttnProcessor() (for diffusers' set_processor/set_attn_processor) had no processor to fall back
    to: a masked call was "'NoneType' object is not callable", and after unpatch the model could not run."""
    m = _small_unet().eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    with torch.no_grad():
        ref = m(x, t).sample
    blocks = [mod for mod in m.modules() if isinstance(mod, diffusers.models.attention_processor.Attention)]
    for b in blocks:
        b.set_processor(FastddpmAttnProcessor())
    attn = blocks[0]
    h = torch.randn(1, 16, 4, 4)
    with torch.no_grad():  # a mask is a call the processor hands on: diffusers' default processor's result
        mask = torch.zeros(1, 16, 16)
        got = attn.processor(attn, h, attention_mask=mask)
        want = diffusers.models.attention_processor.AttnProcessor2_0()(attn, h, attention_mask=mask)
        assert torch.equal(got, want)
        assert _rel(m(x, t).sample, ref) < RTOL
    unpatch(m)
    assert not is_patched(m)
    with torch.no_grad():
        assert _rel(m(x, t).sample, ref) < RTOL
    with pytest.raises(TypeError, match="original: expected an attention processor"):
        FastddpmAttnProcessor("sdpa")


def test_patched_model_in_ddpm_pipeline():
    cfg = SMALL["two_levels_attn_low"]
    d = _diffusers_model(cfg)
    sched = DDPMScheduler(num_train_timesteps=50)
    ref = DDPMPipeline(unet=d, scheduler=sched)(batch_size=1, num_inference_steps=3, output_type="np",
                                                 generator=torch.Generator().manual_seed(0)).images
    patch(d)
    out = DDPMPipeline(unet=d, scheduler=sched)(batch_size=1, num_inference_steps=3, output_type="np",
                                                 generator=torch.Generator().manual_seed(0)).images
    assert out.shape == ref.shape
    assert abs(out - ref).max() < 1e-4


def test_top_level_exports():
    assert fastddpm.patch is patch and fastddpm.unpatch is unpatch


# ----------------------------------------------------------------------------------------------
# patch() says what it did
# ----------------------------------------------------------------------------------------------
def _small_unet(**kw):
    torch.manual_seed(0)
    base = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return UNet2DModel(**{**base, **kw})


def test_patch_counts_the_blocks_it_patched():
    import warnings

    from fastddpm.compat.diffusers import patched_blocks

    m = _small_unet()
    resnets = sum(type(x).__name__ == "ResnetBlock2D" for x in m.modules())
    attns = sum(type(x).__name__ == "Attention" for x in m.modules())
    assert resnets > 0 and attns > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full patch warns about nothing
        _, n = patch(m, return_count=True)
    assert n == resnets + attns + 1  # + conv_norm_out/conv_act
    assert patched_blocks(m) == {"resnet": resnets, "attention": attns, "norm_out": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patching again: nothing new, nothing to warn about
        assert patch(m, return_count=True)[1] == 0
    unpatch(m)
    assert patched_blocks(m) == {"resnet": 0, "attention": 0, "norm_out": 0}


@pytest.mark.parametrize("what,why", [
    ("linear", "Linear holds no diffusers ResnetBlock2D or Attention block"),
    ("fastddpm", "a fastddpm.UNet runs the fused ops already"),
    ("mish", "ResnetBlock2D with activation Mish"),
])
def test_patch_warns_naming_why(what, why):
    from fastddpm.compat.diffusers import patched_blocks

    if what == "linear":
        m = torch.nn.Linear(2, 2)
    elif what == "fastddpm":
        m = UNet(UNetConfig(sample_size=8, base_channels=8, channel_mult=(1,), norm_num_groups=4,
                            attention_resolutions=()))
    else:
        m = _small_unet(act_fn="mish")
    with pytest.warns(UserWarning, match=why):
        patch(m)
    if what == "mish":  # the mid-block attention and the output norm are still patched, and said so
        counts = patched_blocks(m)
        assert counts["resnet"] == 0 and counts["attention"] > 0
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        patch("not a model")
