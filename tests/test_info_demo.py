"""`fastddpm info` and the forward-diffusion demo of the README's first command."""

import subprocess
import sys

from PIL import Image

from fastddpm import cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("q_sample", "ddpm_step", "group_norm_silu", "attention"):
        assert op in out
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
