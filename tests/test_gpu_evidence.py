"""The GPU claims, tied to their evidence: the dispatch table (fastddpm/ops/_dispatch.py, GPU_RUN and
GPU_EVIDENCE), the last GPU run's result files (benchmarks/results/<run>.*) and README.md's backend table
must say the same thing. Each fact is re-derived here from the result files, not from the table:

* an op's test file passed on the device <=> its "tests" entry is "passed" (else the entry says how it
  failed, with the counts read from the per-file pytest summary);
* a backend is in an op's "suite" <=> every row of the GPU suite's CSV for that op and provider says "yes";
* auto on CUDA tensors picks "cuda" only for verified ops (test file passed, suite correct), else "triton"
  where the suite measured it correct, else "torch";
* README's cell for an (op, backend) says "verified on <GPU>, <date>, torch <version>, commit <sha>" exactly
  where that pair is verified, and "run, failed: <what>" or "not yet run on a GPU" everywhere else.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess

import pytest
import torch

from fastddpm.ops import _dispatch, _library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = _dispatch.GPU_RUN
EVIDENCE = _dispatch.GPU_EVIDENCE
# README's row name and the GPU suite's op label for each op the dispatch table knows.
README_ROW = {"q_sample": "q_sample", "ddpm_step": "ddpm_step", "philox_normal_": None, "ddim_step": "ddim_step",
              "group_norm_silu_fwd": "group_norm_silu", "attention": "attention"}


def _suite_op(label: str) -> set[str]:
    """The dispatch names a GPU-suite row covers ("ddpm_step[philox]" also runs philox_normal_'s stream)."""
    base = label.split("[")[0]
    names = {"group_norm_silu": "group_norm_silu_fwd"}.get(base, base)
    out = {names}
    if base == "ddpm_step" and "philox" in label:
        out.add("philox_normal_")
    return out


def _pytest_summary() -> dict[str, dict]:
    """tests/<file> -> {"rc": exit code, "passed", "failed", "crashed_after" (tests run before a crash)}."""
    with open(os.path.join(ROOT, RUN["results"] + "_pytest.txt")) as f:
        text = f.read()
    out = {}
    for block in re.split(r"^=== ", text, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        rc = int(re.search(r"^rc=(\d+)", body, re.M).group(1))
        info = {"rc": rc}
        for key in ("passed", "failed"):
            m = re.search(rf"(\d+) {key}", body)
            info[key] = int(m.group(1)) if m else 0
        m = re.search(r"^([.FEsx]*)Fatal Python error: Segmentation fault", body, re.M)
        if m:
            info["crashed_after"] = len(m.group(1))
            info["failed"] = m.group(1).count("F")
        out[name.strip()] = info
    return out


def _suite_rows() -> list[dict]:
    with open(os.path.join(ROOT, RUN["results"] + ".csv"), newline="") as f:
        return list(csv.DictReader(f))


def _suite_correct() -> dict[str, set[str]]:
    """op -> the backends (triton, cuda) whose every GPU-suite row matched float64 on the device."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in _suite_rows():
        if r["provider"] not in ("triton", "cuda"):
            continue
        for op in _suite_op(r["op"]):
            seen.setdefault((op, r["provider"]), []).append(r["ok"])
    out: dict[str, set[str]] = {}
    for (op, b), oks in seen.items():
        if oks and all(ok == "yes" for ok in oks):
            out.setdefault(op, set()).add(b)
    return out


def test_run_facts_match_the_result_files():
    with open(os.path.join(ROOT, RUN["results"] + ".txt")) as f:
        header = f.readline()
    assert RUN["device"] in header and f"torch {RUN['torch']}" in header and RUN["gpu"] in RUN["device"]
    rows = _suite_rows()
    assert rows and all(r["date"].startswith(RUN["date"]) and RUN["device"] in r["machine"] for r in rows)


def test_run_commit_precedes_the_run():
    """The recorded commit exists and was made before the run's first result row."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", ROOT, "show", "-s", "--format=%cI", RUN["commit"]], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"commit {RUN['commit']} is not in this clone's history (shallow clone?)")
    committed = r.stdout.strip().replace("+00:00", "")
    first_row = min(row["date"] for row in _suite_rows())
    assert committed <= first_row, (committed, first_row)


def test_evidence_entries_match_the_pytest_summary():
    summary = _pytest_summary()
    for op, e in EVIDENCE.items():
        info = summary[e["test_file"]]
        if e["tests"] == "passed":
            assert info["rc"] == 0 and info["failed"] == 0 and "crashed_after" not in info, (op, info)
            continue
        assert info["rc"] != 0, (op, info)
        if "crashed_after" in info:
            assert f"crashed (segmentation fault) after {info['crashed_after']} tests" in e["tests"], (op, info)
            if info["failed"]:
                assert e["tests"].startswith(f"{info['failed']} failures"), (op, info)
        else:
            total = info["passed"] + info["failed"]
            assert e["tests"].startswith(f"{info['failed']} of {total} tests failed"), (op, info)


def test_evidence_suite_entries_match_the_csv():
    correct = _suite_correct()
    for op, e in EVIDENCE.items():
        assert set(e["suite"]) == correct.get(op, set()), op
    assert set(correct) <= set(EVIDENCE)  # every op the suite ran has an entry


def test_dispatch_sets_follow_the_evidence():
    summary = _pytest_summary()
    correct = _suite_correct()
    passed = {op for op, e in EVIDENCE.items() if summary[e["test_file"]]["rc"] == 0}
    assert _dispatch.CUDA_VERIFIED_OPS == {op for op in passed if "cuda" in correct.get(op, ())}
    assert _dispatch.TRITON_CORRECT_OPS == {op for op in EVIDENCE if "triton" in correct.get(op, ())}


def _expected_order(op: str) -> tuple[str, ...]:
    summary, correct = _pytest_summary(), _suite_correct()
    ok = correct.get(op, set())
    verified_cuda = op in EVIDENCE and summary[EVIDENCE[op]["test_file"]]["rc"] == 0 and "cuda" in ok
    return (("cuda",) if verified_cuda else ()) + (("triton",) if "triton" in ok else ()) + ("torch",)


def test_auto_on_cuda_tensors_follows_the_evidence():
    """resolve() for CUDA tensors (no GPU needed: it reads only what this build and Triton offer)."""
    cuda = torch.device("cuda", 0)
    for op in list(EVIDENCE) + ["an_op_no_gpu_run_has_seen"]:
        order = _expected_order(op)
        assert _dispatch.cuda_auto_order(op) == order, op
        if op in EVIDENCE and op not in _dispatch.MEASURED_CUDA_ORDER:  # those: the next test, test_attention
            usable = [b for b in order if _dispatch.backend_unavailable_reason(b, op, cuda) is None]
            assert _dispatch.resolve(op, "auto", cuda, torch.float32) == usable[0], op
    if _library.has_kernel("ddpm_step", "CUDA"):  # verified
        assert _dispatch.resolve("ddpm_step", "auto", cuda, torch.float32) == "cuda"
    if _library.has_kernel("q_sample", "CUDA"):  # not verified: its test file crashed on the device
        assert _dispatch.resolve("q_sample", "auto", cuda, torch.float32) != "cuda"
    assert _dispatch.resolve("q_sample", "auto", torch.device("cpu"), torch.float32) in ("cpu", "torch")


def test_measured_orders_name_only_backends_the_run_found_correct():
    correct = _suite_correct()
    for op, by_dtype in _dispatch.MEASURED_CUDA_ORDER.items():
        for dtype, order in by_dtype.items():
            assert order[-1] == "torch", (op, dtype)  # the reference stays the last resort
            assert set(order[:-1]) <= correct.get(op, set()), (op, dtype, order)
            assert _dispatch.cuda_auto_order(op, dtype) == order


def _readme_table() -> dict[str, dict[str, str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Backends and their status"):].splitlines()
    first = next(i for i, ln in enumerate(section) if ln.startswith("|"))
    lines = []
    for ln in section[first:]:  # the table: the consecutive lines from its first
        if not ln.startswith("|"):
            break
        lines.append(ln)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0].split()[0]] = dict(zip(head, cells))
    return rows


def test_readme_backend_table_says_only_what_the_gpu_showed():
    rows = _readme_table()
    summary = _pytest_summary()
    correct = _suite_correct()
    stamp = f"verified on {RUN['gpu']}, {RUN['date']}, torch {RUN['torch']}, commit {RUN['commit']}"
    cols = {"triton": "triton", "cuda": "cuda (CUDA C++)"}
    for op, row_name in README_ROW.items():
        if row_name is None:
            continue
        row = rows[row_name]
        info = summary[EVIDENCE[op]["test_file"]]
        for b, col in cols.items():
            cell = row[col]
            verified = info["rc"] == 0 and b in correct.get(op, ())
            if verified:
                assert stamp in cell, (op, b, cell)
            else:
                assert "verified on" not in cell, (op, b, cell)
                assert (f"run, failed: {EVIDENCE[op]['test_file']}: {EVIDENCE[op]['tests']}" in cell
                        or "not yet run on a GPU" in cell), (op, b, cell)
        auto = row["auto on CUDA tensors"]
        first = _expected_order(op)[0]
        if op == "attention":  # ops.attention sends fp32 to SDPA (measured faster), the rest to auto's choice
            assert f"{first} for fp16/bf16" in auto, auto
        else:
            assert auto.split()[0] == first, (op, auto)
    assert RUN["results"] in open(os.path.join(ROOT, "README.md")).read()
    # no other cell of the table (other ops' rows included) claims a verification
    ops_by_row = {v: k for k, v in README_ROW.items() if v}
    backends_by_col = {v: k for k, v in cols.items()}
    for name, row in rows.items():
        for col, cell in row.items():
            if "verified on" in cell:
                op, b = ops_by_row.get(name), backends_by_col.get(col)
                assert op is not None and b is not None and _dispatch._verified(op, b), (name, col, cell)
