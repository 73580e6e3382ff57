"""`fastddpm <command>` under FASTDDPM_REQUIRE_EXTENSION=1 with a broken fastddpm._C: one line naming the
reason and the fix, exit status 2, no traceback, whether run as the console script or `python -m`. A plain
`import fastddpm` still raises (tests/test_extension_missing.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_extension_missing import HOOK, ROOT


def _run(tmp_path, argv, require="1"):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    e = dict(os.environ, OMP_NUM_THREADS="1", FASTDDPM_REQUIRE_EXTENSION=require)
    e["PYTHONPATH"] = os.pathsep.join([str(hook), ROOT] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    for k in ("FASTDDPM_DEBUG", "PYTHONWARNINGS"):
        e.pop(k, None)
    return subprocess.run(argv, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=300)


SCRIPT = os.path.join(os.path.dirname(sys.executable), "fastddpm")


@pytest.mark.parametrize("how", ["script", "module"])
def test_info_one_line_exit_2(tmp_path, how):
    if how == "script":
        if not os.path.isfile(SCRIPT):
            pytest.skip(f"no console script at {SCRIPT} (fastddpm not pip-installed in this environment)")
        argv = [SCRIPT, "info"]
    else:
        argv = [sys.executable, "-m", "fastddpm", "info"]
    r = _run(tmp_path, argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "fastddpm._C did not import" in lines[0] and "undefined symbol" in lines[0]
    assert "pip install --no-build-isolation" in lines[0] and "FASTDDPM_REQUIRE_EXTENSION=1" in lines[0]
    assert r.stdout == ""


def test_without_require_info_still_reports(tmp_path):
    r = _run(tmp_path, [sys.executable, "-m", "fastddpm", "info"], require="0")
    assert r.returncode == 0, r.stderr
    assert "extension fastddpm._C: NOT importable" in r.stdout
