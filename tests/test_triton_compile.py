"""Every Triton kernel launch the ops make compiles for an NVIDIA GPU (sm_90) with Triton's own compiler, on
this GPU-less machine (scripts/compile_triton.py). The other Triton tests run the kernels through Triton's
interpreter, which executes their Python: code that Triton's compiler rejects can pass there."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001
        return f"Triton with its CUDA backend does not import: {exc}"
    return None if os.path.exists(ptxas) else f"no ptxas at {ptxas}"


MISSING = _compiler_missing()


@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_every_triton_launch_compiles_for_sm90(tmp_path):
    out = tmp_path / "launches.json"
    _compile("--arch", "90", "--json", str(out))
    launches = json.loads(out.read_text())
    compiled = {(rec["module"].rsplit(".", 1)[-1], rec["name"]) for rec in launches}
    # every kernel of triton_kernels is among the recorded launches: a new kernel cannot escape the check
    import fastddpm.triton_kernels as tk

    defined = set()
    for m in pkgutil.iter_modules(tk.__path__):
        mod = importlib.import_module(f"fastddpm.triton_kernels.{m.name}")
        defined |= {(m.name, n) for n, f in vars(mod).items() if n.endswith("_kernel") and hasattr(f, "fn")}
    assert defined and defined <= compiled, sorted(defined - compiled)
    # the attention kernels' int64 variant (offsets past 2**31 in one (batch, head) slice) was compiled too
    wide = {rec["name"] for rec in launches if rec["constexprs"].get("WIDE") is True}
    assert wide == {"_attn_fwd_kernel", "_attn_bwd_kernel"}, wide
    # the shared memory the attention kernels need, by which the dispatch refuses GPUs with less, is the compiler's
    _check_attention_shared(launches, major=8)
    # sm_75 (T4) stages tiles differently: its figures, from one attention launch per dtype class, kernel and
    # head width (compiling for sm_75 takes seconds a launch)
    one = {}
    for rec in launches:
        if rec["name"] in ("_attn_fwd_kernel", "_attn_bwd_kernel") and rec["signature"]["Q"] in ("*fp16", "*fp32"):
            key = (rec["name"], rec["signature"]["Q"], rec["constexprs"]["BLOCK_D"], rec["constexprs"].get("KEYS"))
            if rec["constexprs"]["BLOCK_D"] >= 64 and not rec["constexprs"]["WIDE"]:
                one.setdefault(key, rec)
    subset, out75 = tmp_path / "sm75_in.json", tmp_path / "sm75.json"
    subset.write_text(json.dumps(list(one.values())))
    _compile("--arch", "75", "--launches", str(subset), "--json", str(out75))
    _check_attention_shared(json.loads(out75.read_text()), major=7)


def _compile(*args: str) -> None:
    """scripts/compile_triton.py with ``args``, in a process without TRITON_INTERPRET; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-W", "ignore", os.path.join(ROOT, "scripts", "compile_triton.py"), *args],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stderr[-4000:]}"


def _check_attention_shared(launches: list[dict], major: int) -> None:
    """triton_kernels.attention.SHARED_BYTES[(major, dtype class)] is, per head-width bucket, the most shared
    memory a compiled forward or backward launch of that bucket needs."""
    from fastddpm.triton_kernels.attention import SHARED_BYTES

    most: dict[tuple[str, int], int] = {}
    for rec in launches:
        if rec["name"] not in ("_attn_fwd_kernel", "_attn_bwd_kernel") or rec["constexprs"]["WIDE"]:
            continue
        cls = "fp32" if rec["signature"]["Q"] == "*fp32" else "half"
        bucket = max(64, rec["constexprs"]["BLOCK_D"])
        most[(cls, bucket)] = max(most.get((cls, bucket), 0), rec["shared"])
    table = {(cls, b): v for (m, cls), row in SHARED_BYTES.items() if m == major for b, v in row.items()}
    assert most == table, (major, most, table)
