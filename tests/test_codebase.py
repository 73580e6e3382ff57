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
