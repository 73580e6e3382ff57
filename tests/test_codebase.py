"""Rules about the code itself that no op test would notice breaking (issue 16)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def hash_calls(source: str) -> list[int]:
    """Line numbers of calls to the builtin hash() in ``source``.

    Tests have no use for hash() but seeding, and hash() of a str (or of a tuple holding one) changes
    from process to process (PYTHONHASHSEED), so a failure seeded from it cannot be replayed: seed from
    _utils.stable_seed instead."""
    return [n.lineno for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hash"]


def test_hash_calls_finds_a_hash_seed():
    src = "import torch\ng = torch.Generator().manual_seed(hash((shape, 'x')) % 2**31)\nh = 'hash(1)'\n"
    assert hash_calls(src) == [2]
    assert hash_calls("g = torch.Generator().manual_seed(stable_seed(shape, 'x'))\n") == []


def test_no_test_seeds_from_hash():
    files = sorted(TESTS.glob("*.py"))
    assert len(files) > 10, f"found only {len(files)} test files under {TESTS}"
    bad = [f"{f.name}:{line}" for f in files for line in hash_calls(f.read_text())]
    assert not bad, f"hash() in tests (not reproducible across processes; use _utils.stable_seed): {bad}"


def private_fastddpm_imports(source: str) -> list[str]:
    """The fastddpm modules ``source`` imports whose dotted name has a part starting with ``_``
    (fastddpm.triton_kernels' own modules excepted; relative imports stay inside it)."""
    names = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Import):
            mods = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            # `from fastddpm.ops import _dispatch` imports the private module fastddpm.ops._dispatch
            mods = [f"{n.module}.{a.name}" for a in n.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[0] != "fastddpm" or parts[:2] == ["fastddpm", "triton_kernels"]:
                continue
            if any(p.startswith("_") for p in parts[1:]):
                names.append(m)
    return names


def test_private_import_check_finds_private_modules():
    src = ("from fastddpm.ops._layout import batch_major_dense\nfrom fastddpm.ops import _dispatch, reference\n"
           "import fastddpm._C\nfrom fastddpm import ops\nfrom fastddpm.triton_kernels._common import x\n"
           "from ._common import launch_device\n")
    assert private_fastddpm_imports(src) == [
        "fastddpm.ops._layout.batch_major_dense", "fastddpm.ops._dispatch", "fastddpm._C"]


def test_triton_kernels_import_no_private_fastddpm_module():
    # The kernels sit below the package: reaching up into its private modules ties them to its internals
    # and risks import cycles (fastddpm.ops imports the kernels lazily).
    files = sorted((ROOT / "triton_kernels").glob("*.py"))
    assert len(files) >= 6, f"found only {len(files)} files under triton_kernels/"
    bad = {f.name: m for f in files if (m := private_fastddpm_imports(f.read_text()))}
    assert not bad, f"triton_kernels import private fastddpm modules: {bad}"
