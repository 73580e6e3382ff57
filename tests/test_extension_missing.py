"""A fastddpm._C that fails to import is never a silent slow path: one warning with the reason and the
rebuild command, `fastddpm info` shows it, benchmarks refuse to run under fastddpm's name, and
FASTDDPM_REQUIRE_EXTENSION=1 makes it an error. The broken extension is simulated in a subprocess by an
import hook that fails the import of fastddpm._C the way an ABI mismatch does."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = """
import importlib.abc, sys
class _Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastddpm._C":
            raise ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
        return None
sys.meta_path.insert(0, _Broken())
"""


def _py(tmp_path, code: str, broken: bool = True, **env):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK if broken else "")
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(hook), ROOT] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    for k in ("FASTDDPM_REQUIRE_EXTENSION", "FASTDDPM_BACKEND", "PYTHONWARNINGS"):
        e.pop(k, None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=e, capture_output=True, text=True,
                          timeout=300)


def test_warns_once_with_reason_and_fix(tmp_path):
    r = _py(tmp_path, "import fastddpm, fastddpm.ops, fastddpm.info, importlib; "
                      "import torch; x = torch.randn(2, 8, 4, 4); "
                      "y = fastddpm.ops.group_norm_silu(x, 2, torch.ones(8), torch.zeros(8)); print('ran')")
    assert r.returncode == 0, r.stderr
    assert "ran" in r.stdout
    warns = [ln for ln in r.stderr.splitlines() if "ExtensionMissingWarning" in ln]
    assert len(warns) == 1, r.stderr
    w = warns[0]
    assert "fastddpm._C did not import" in w and "undefined symbol" in w
    assert "pip install --no-build-isolation" in w


def test_info_shows_it(tmp_path):
    r = _py(tmp_path, "from fastddpm.cli import main; raise SystemExit(main(['info']))")
    assert r.returncode == 0, r.stderr
    assert "extension fastddpm._C: NOT importable (ImportError: _C.so: undefined symbol" in r.stdout
    assert "auto -> torch" in r.stdout


def test_require_extension_makes_it_an_error(tmp_path):
    r = _py(tmp_path, "import fastddpm", FASTDDPM_REQUIRE_EXTENSION="1")
    assert r.returncode != 0
    assert "ExtensionImportError" in r.stderr and "undefined symbol" in r.stderr
    assert "FASTDDPM_REQUIRE_EXTENSION=1" in r.stderr
    # And with a working extension the variable changes nothing.
    ok = _py(tmp_path, "import fastddpm; from fastddpm.ops import _library; print(_library.has_c())",
             broken=False, FASTDDPM_REQUIRE_EXTENSION="1")
    assert ok.returncode == 0 and ok.stdout.strip() == "True", ok.stderr


def test_benchmarks_refuse_the_reference(tmp_path):
    code = ("from fastddpm.bench import ops as b\n"
            "try:\n    b.group_norm_silu_providers((1, 32, 8, 8))\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = _py(tmp_path, code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ReferenceRunError benchmark refused: the C++ extension fastddpm._C did not "
                               "import"), r.stdout
    # The suite through the CLI: one line, exit 2, nothing timed.
    r = _py(tmp_path, "from fastddpm.cli import main; raise SystemExit(main(['bench', '--smoke']))")
    assert r.returncode == 2, r.stderr
    assert "fastddpm bench: error: benchmark refused" in r.stderr and "Traceback" not in r.stderr
    # FASTDDPM_BACKEND=torch with a working extension is refused too (the rows would say fastddpm).
    r = _py(tmp_path, code, broken=False, FASTDDPM_BACKEND="torch")
    assert "ReferenceRunError" in r.stdout and "FASTDDPM_BACKEND=torch" in r.stdout, r.stdout + r.stderr
    # And a working build is not refused.
    r = _py(tmp_path, code + "else:\n    print('built')\n", broken=False)
    assert r.stdout.strip() == "built", r.stdout + r.stderr
