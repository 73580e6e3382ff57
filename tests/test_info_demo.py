"""`fastddpm info` and the forward-diffusion demo of the README's first command."""

import subprocess
import sys

from PIL import Image

from fastddpm import cli


def test_info_lists_backends(capsys):
    """Every public op that takes a backend has its line (philox_randn is ddpm_step's noise, prepare_step binds
    the step ops): dpmpp_step was once left out."""
    import inspect

    from fastddpm import ops

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    public = {n for n in ops.__all__ if inspect.isfunction(getattr(ops, n))
              and "backend" in inspect.signature(getattr(ops, n)).parameters} - {"philox_randn", "prepare_step"}
    assert public >= {"q_sample", "ddpm_step", "ddim_step", "dpmpp_step", "group_norm_silu", "attention"}
    for op in public:
        assert f"  {op} " in out.split("backends per op", 1)[1], op
    assert "auto -> cpu" in out and "extension fastddpm._C" in out


def test_demo_writes_strip(tmp_path):
    path = tmp_path / "strip.png"
    assert cli.main(["demo", "--out", str(path), "--timesteps", "0,500,999", "--image-size", "16"]) == 0
    img = Image.open(path)
    assert img.size == ((3 * 16 + 2 * 2) * 8, 16 * 8)  # 3 images, 2-pixel gaps, scaled x8
    px = list(img.getdata())
    # t = 0 is the clean digit (few distinct grey levels); t = 999 is noise.
    assert len(set(px)) > 10


def test_bad_usage_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "fastddpm", "demo", "--timesteps", "a,b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--timesteps" in r.stderr
