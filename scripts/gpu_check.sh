#!/usr/bin/env bash
# fastddpm's GPU check: everything a lent GPU machine should tell us, in one run of at most 9 minutes.
#
# The call (the device tool's `run`, from the repository root, after committing, so that the sha names
# exactly what runs; the device machine gets the working tree without .git):
#
#     run(command="FASTDDPM_COMMIT=<sha> bash scripts/gpu_check.sh", timeout_s=600)
#
# with <sha> the output of `git rev-parse --short HEAD` here. Add carry=[".whl"] when .whl/ holds wheels for
# packages the machine lacks (diffusers, for the parity tests). Time limit: the stages together stop by
# --budget seconds (default 540, 9 minutes, the build included); timeout_s=600 leaves a minute of margin.
# Results: at most 8 files under $OUT (no more come back from such a machine), listed below.
#
#     bash scripts/gpu_check.sh [--dry-run] [--only STAGE,...] [--budget SECONDS] [--limit STAGE=SECONDS] [--list]
#
# Stages, in order, each under its own time limit (seconds; never past the budget):
#   env       25   GPU, driver, versions, compilers, the commit, which libstdc++/libgcc_s/libgomp torch loads
#   build    190   fastddpm._C in place for this GPU's architecture only (TORCH_CUDA_ARCH_LIST), all cores
#   bisect    75   the TORCH_CHECK segfault (an argument error raised in a C++ op crashed the process on the
#                  last GPU machine): a tiny load_inline op that throws, built with torch's flags and with
#                  ours, and fastddpm's own op with a bad argument, each in a child process, each printing
#                  the libstdc++/libgcc_s/libgomp it loaded
#   tests    120   one pytest process over the tests that use the GPU (-k cuda: the cuda-marked tests and
#                  every test parametrised on a cuda device), with pytest-xdist where available, so that a
#                  crashing worker is replaced and the other tests still run
#   suite     80   benchmarks/gpu_suite.py --quick --no-compile: every op and backend against float64 on the
#                  device, timed
#   unet      50   the CIFAR-10 U-Net's whole denoising step at batch 1 and 64, fp32 and bf16: eager (checked
#                  against the PyTorch path) and CUDA graph (checked against eager)
#   autotune  rest the same under torch.compile(mode="max-autotune"), only if 90 s or more are left
#
# Files under $OUT (default ./gpu_out): summary.txt (stages, limits, times, exit codes), env.txt, build.log,
# bisect.txt, pytest.txt, gpu_suite.txt (the suite's and the U-Net stages' output), gpu_suite.csv (their
# rows), stages.log (this script's own trace).
#
# --dry-run (no GPU needed; what the tests run on a machine without one): the stage list and limits, the env
# stage's GPU-free part, the bisect (on the CPU), the test selection (collected, not run), the suite's plan,
# and the packing, each for real; the build, the test run and the timed stages are printed, not run.
# Without --dry-run on a machine without a GPU: one line on stderr, exit 2. Exit status otherwise: 0 when
# every stage that ran passed, 1 when one failed (summary.txt says which), 2 for a bad option.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

STAGES=(env build bisect tests suite unet autotune)
declare -A LIMIT=([env]=25 [build]=190 [bisect]=75 [tests]=120 [suite]=80 [unet]=50 [autotune]=0)
declare -A NEEDS_GPU=([env]=0 [build]=1 [bisect]=0 [tests]=1 [suite]=1 [unet]=1 [autotune]=1)
AUTOTUNE_MIN=90
PACK_RESERVE=5
MAX_FILES=8

DRY=0; ONLY=""; BUDGET=540; LIST=0
usage() { echo "gpu_check.sh: $1 (usage: gpu_check.sh [--dry-run] [--only STAGE,...] [--budget SECONDS] [--limit STAGE=SECONDS] [--list])" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || usage "--only needs a stage list"; ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --budget) [ $# -ge 2 ] || usage "--budget needs seconds"; BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    --limit) [ $# -ge 2 ] || usage "--limit needs STAGE=SECONDS"; LIMITS="${LIMITS:-} $2"; shift ;;
    --list) LIST=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown option $1" ;;
  esac
  shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] && [ "$BUDGET" -ge 30 ] || usage "--budget: expected whole seconds >= 30, got $BUDGET"
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || usage "--only: unknown stage $s (stages: ${STAGES[*]})"
  done
fi
for kv in ${LIMITS:-}; do  # --limit STAGE=SECONDS: another limit for one stage (slow machines, tests)
  k="${kv%%=*}"; v="${kv#*=}"
  [[ " ${STAGES[*]} " == *" $k "* ]] && [[ "$v" =~ ^[0-9]+$ ]] || usage "--limit: expected STAGE=SECONDS, got $kv"
  [ "$k" != autotune ] || usage "--limit: autotune takes the time left (at least ${AUTOTUNE_MIN}s), not a limit of its own"
  [ "$k" != unet ] || [ "$v" -ge 20 ] || usage "--limit: unet needs at least 20 s (its rows stop 10 s before the limit), got $v"
  LIMIT[$k]="$v"
done
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

if [ "$LIST" = 1 ]; then
  for s in "${STAGES[@]}"; do
    lim="${LIMIT[$s]}"; [ "$s" = autotune ] && lim="rest(>=$AUTOTUNE_MIN)"
    printf '%-9s %-12s gpu=%s\n' "$s" "$lim" "${NEEDS_GPU[$s]}"
  done
  echo "budget $BUDGET s; at most $MAX_FILES files under \$OUT"
  exit 0
fi

PY="${PYTHON:-python3}"
if [ "$DRY" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA GPU is visible here (torch.cuda.is_available() is False); run it on a GPU machine, or use --dry-run" >&2
    exit 2
  fi
fi

OUT="${OUT:-gpu_out}"
mkdir -p "$OUT" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastddpm_gpu_check.XXXXXX")" || exit 2
export PYTHONUNBUFFERED=1 FASTDDPM_GPU_CHECK_WORK="$WORK"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
SUMMARY="$OUT/summary.txt"; TRACE="$OUT/stages.log"
FAILED=""
: > "$TRACE"
{
  echo "fastddpm gpu_check $( [ "$DRY" = 1 ] && echo '(dry run) ')$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: FASTDDPM_COMMIT=${FASTDDPM_COMMIT:-<unset>} bash scripts/gpu_check.sh $( [ "$DRY" = 1 ] && echo --dry-run) ${ONLY:+--only $ONLY} --budget $BUDGET"
  echo "budget: $BUDGET s (stages stop by then; $PACK_RESERVE s kept for packing)"
  printf '%-9s %8s %8s %6s  %s\n' stage limit_s took_s rc status
} > "$SUMMARY"
log() { echo "[$(elapsed)s] $*" | tee -a "$TRACE"; }

# run_stage NAME LIMIT FILE CMD...: CMD under `timeout`, its output appended to FILE; one line in summary.txt.
run_stage() {
  local name="$1" limit="$2" file="$3"; shift 3
  local left=$(( BUDGET - $(elapsed) - PACK_RESERVE ))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    printf '%-9s %8s %8s %6s  %s\n' "$name" "$limit" 0 - "skipped: out of time" >> "$SUMMARY"
    log "$name: skipped, out of time"; return 0
  fi
  log "$name: start (limit ${limit}s)"
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" >> "$file"
  # bash -c: a stage may be one of this script's functions (exported below), which `timeout` cannot run itself
  # STAGE_LIMIT: a stage that can wrap up by itself (pytest's summary, the bisect's partial results) stops
  # a little before it is killed
  STAGE_LIMIT="$limit" timeout --kill-after=5 "$limit" bash -c '"$@"' stage "$@" >> "$file" 2>&1
  local rc=$? status=passed
  [ "$rc" = 0 ] || status="failed"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && status="failed: timed out"
  [ "$rc" -gt 128 ] && [ "$rc" != 137 ] && status="failed: killed by signal $(( rc - 128 ))"
  if [ "$name" = autotune ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then
    status="timed out (optional: only the time left)"  # not a failure of the check
  elif [ "$rc" != 0 ]; then
    FAILED="$FAILED $name"
  fi
  printf '%-9s %8s %8s %6s  %s\n' "$name" "$limit" $(( $(date +%s) - t0 )) "$rc" "$status" >> "$SUMMARY"
  log "$name: $status (rc $rc)"
  return 0
}

# dry_stage NAME LIMIT FILE TEXT: a stage that needs the GPU, printed instead of run.
dry_stage() {
  echo "=== $1 (limit $2 s): dry run, would run: $4" >> "$3"
  printf '%-9s %8s %8s %6s  %s\n' "$1" "$2" 0 - "dry run: not run (needs the GPU)" >> "$SUMMARY"
  log "$1: dry run, not run"
}

# ---------------------------------------------------------------------------------------------------
# The stages' own commands
# ---------------------------------------------------------------------------------------------------
stage_env() {
  echo "commit: ${FASTDDPM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here and FASTDDPM_COMMIT unset)')}"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  uname -srm; nproc; c++ --version 2>&1 | head -1; nvcc --version 2>&1 | tail -2
  "$PY" - <<'PY'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
for name in ("xdist", "pytest_timeout", "diffusers"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "present"))
    except Exception:
        print(name, "absent")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", torch.cuda.device_count(), "GPUs")
else:
    print("device: no CUDA device visible")
config = torch.__config__.show()
cxx = [f for f in config.replace("\n", ",").split(",") if "CXX_COMPILER" in f]
print("torch built with:", *[ln.strip(" -") for ln in config.splitlines() if ln.strip().startswith("- GCC")],
      *[f.strip() for f in cxx])
libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if any(k in ln for k in ("libstdc++", "libgcc_s", "libgomp"))})
print("loaded with torch:", *libs, sep="\n  ")
PY
}

stage_build() {
  # fastddpm.triton_kernels is the top-level triton_kernels/ folder (an in-place build has no package_dir)
  [ -e fastddpm/triton_kernels ] || ln -s ../triton_kernels fastddpm/triton_kernels
  local arch
  arch="$("$PY" -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")" || return 1
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" FASTDDPM_CUDA=1 "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -c "import fastddpm._C, fastddpm._build_info as b; print('built:', b.WITH_CUDA, b.CUDA_ARCHS)"
}

write_bisect() {
  cat > "$WORK/bisect.py" <<'PY'
"""Why did an argument error raised in a fastddpm C++ op (TORCH_CHECK) crash the process on the last GPU
machine? Each variant runs in a child process: a crash there is a result, not the end of the bisect."""
import os
import subprocess
import sys
import time

WORK = os.environ.get("FASTDDPM_GPU_CHECK_WORK", "/tmp")
# setup.py's flags for the C++ sources, with its AVX2 build's set (every GPU host seen has AVX2);
# tests/test_gpu_check.py checks that they stay equal
OUR_CFLAGS = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]
OUR_LDFLAGS = ["-fopenmp"]

CHILD_PRELUDE = r'''
import sys, torch
def libs():
    keys = ("libstdc++", "libgcc_s", "libgomp")
    return sorted({ln.split()[-1] for ln in open("/proc/self/maps") if any(k in ln for k in keys)})
def call(what, fn):
    print(what, "...", flush=True)
    try:
        fn()
        print(what, ": returned (expected an error)", flush=True)
    except Exception as exc:
        print(what, ": raised", type(exc).__name__ + ":", str(exc).splitlines()[0][:120], flush=True)
'''

TINY = r'''
from torch.utils.cpp_extension import load_inline
src = """
#include <torch/extension.h>
at::Tensor boom(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 7, "boom: expected a 7-d tensor, got ", x.dim(), "-d");
  return x;
}
TORCH_LIBRARY(NS, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NS, CPU, m) { m.impl("boom", &boom); }
"""
name = sys.argv[1]
mod = load_inline(name=name, cpp_sources=src.replace("NS", name), functions=["boom"],
                  extra_cflags=eval(sys.argv[2]), extra_ldflags=eval(sys.argv[3]),
                  build_directory=sys.argv[4], verbose=False)
print("loaded:", *libs(), sep="\n  ", flush=True)
import subprocess
ldd = subprocess.run(["ldd", mod.__file__], capture_output=True, text=True).stdout.splitlines()
print("the extension links:", *[ln.strip() for ln in ldd if any(k in ln for k in ("libstdc++", "libgcc_s", "libgomp"))],
      sep="\n  ", flush=True)
call("pybind boom(1-d)", lambda: mod.boom(torch.zeros(1)))
call("torch.ops boom(1-d)", lambda: getattr(torch.ops, name).boom(torch.zeros(1)))
'''

REAL = r'''
import fastddpm, fastddpm._C
from fastddpm import NoiseSchedule
print("loaded:", *libs(), sep="\n  ", flush=True)
s = NoiseSchedule()
x = torch.randn(2, 3)
call("torch.ops.fastddpm.q_sample(cpu, t out of range)", lambda: torch.ops.fastddpm.q_sample(
    x, x, torch.tensor([0, 5000]), s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod, False))
call("torch.ops.fastddpm.group_norm_silu(cpu, bad groups)", lambda: torch.ops.fastddpm.group_norm_silu(
    torch.randn(2, 6, 3, 3), None, None, None, 4, 1e-5, True))
if torch.cuda.is_available():
    xc = x.cuda()
    call("torch.ops.fastddpm.q_sample(cuda, noise on cpu)", lambda: torch.ops.fastddpm.q_sample(
        xc, x, torch.tensor([0, 1], device="cuda"), s.sqrt_alphas_cumprod.cuda(),
        s.sqrt_one_minus_alphas_cumprod.cuda(), False))
'''


def child(label, code, *args):
    path = os.path.join(WORK, f"bisect_{len(os.listdir(WORK))}.out")
    with open(path, "w") as out:
        p = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + code, *args], stdout=out,
                             stderr=subprocess.STDOUT, text=True)
    return label, p, path


def outcome(rc):
    if rc == 0:
        return "ok (every error raised as a Python exception)"
    if rc < 0:
        import signal
        return f"CRASHED ({signal.Signals(-rc).name})"
    return f"failed (exit {rc})"


def main():
    # The children run at once; each one's output is printed when it ends, and by the deadline (a little
    # before the stage's limit) whatever is still running is stopped and printed as far as it got.
    deadline = time.monotonic() + float(os.environ.get("FASTDDPM_BISECT_SECONDS", "60"))
    os.makedirs(os.path.join(WORK, "ext_torch"), exist_ok=True)
    os.makedirs(os.path.join(WORK, "ext_ours"), exist_ok=True)
    runs = [
        child("fastddpm._C, bad arguments", REAL),
        child("tiny op, torch's flags", TINY, "bisect_torchflags", "[]", "[]", os.path.join(WORK, "ext_torch")),
        child("tiny op, fastddpm's flags " + " ".join(OUR_CFLAGS), TINY, "bisect_ourflags", repr(OUR_CFLAGS),
              repr(OUR_LDFLAGS), os.path.join(WORK, "ext_ours")),
    ]
    results = {}
    while len(results) < len(runs):
        for label, p, path in runs:
            if label in results:
                continue
            late = time.monotonic() > deadline
            if p.poll() is None and not late:
                continue
            if p.poll() is None:
                p.kill()
                p.wait()
                verdict = "did not finish before the stage's limit"
            else:
                verdict = outcome(p.returncode)
            results[label] = (p.returncode, verdict)
            with open(path) as f:
                out = f.read().strip()
            print(f"--- {label}: {verdict}")
            print("    " + out.replace("\n", "\n    "), flush=True)
        time.sleep(0.2)
    print("verdict:")
    for label, (rc, verdict) in results.items():
        print(f"  {label}: {verdict}")
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
PY
}

stage_bisect() {  # the children's deadline: 10 s before the stage's limit
  write_bisect && FASTDDPM_BISECT_SECONDS=$(( STAGE_LIMIT > 20 ? STAGE_LIMIT - 10 : STAGE_LIMIT / 2 )) "$PY" "$WORK/bisect.py"
}

pytest_args() {
  # -v: one line per test as it ends, so that a run cut short still says what passed and what failed
  local args=(tests -k cuda -p no:cacheprovider -v -rfEs --continue-on-collection-errors)
  "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && args+=(--timeout=90)
  if "$PY" -c "import xdist" >/dev/null 2>&1; then
    args+=(-n "$(( $(nproc) < 8 ? $(nproc) : 8 ))")
  else
    echo "(pytest-xdist absent: one process; a crash ends the run)" >&2
  fi
  echo "${args[@]}"
}

stage_tests() {
  # the .whl folder, when carried, holds pure-Python test dependencies (diffusers) the machine lacks
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # SIGINT 10 s before the stage's limit: pytest stops and still prints its summary of failures
  # shellcheck disable=SC2046
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT --kill-after=8 $(( STAGE_LIMIT - 10 )) \
    "$PY" -m pytest $(pytest_args)
}

stage_tests_dry() {
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest tests -k cuda -p no:cacheprovider -q --collect-only \
    --continue-on-collection-errors | tail -n 40
}

SUITE_CMD=("$PY" benchmarks/gpu_suite.py --quick --no-compile --csv "$OUT/gpu_suite.csv")
unet_cmd() { echo "$PY" benchmarks/gpu_suite.py --unet-only --batches 1,64 --dtypes float32,bfloat16 --budget "$1" \
  --csv "$OUT/gpu_suite.csv" "${@:2}"; }

stage_suite_dry() {
  "$PY" - <<'PY'
import sys
sys.path.insert(0, ".")
from benchmarks import gpu_suite
cases = gpu_suite.plan(quick=True)
print(f"gpu_suite --quick: {len(cases)} cases:", ", ".join(sorted({c.label for c in cases})))
PY
}

# Packing: every result is one of at most MAX_FILES plain files directly under $OUT; a log too large to
# come back keeps its head and tail.
pack() {
  local f n
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt $(( 15 * 1024 * 1024 )) ]; then
      { head -c 2000000 "$f"; echo; echo "[... cut: the file was over 15 MiB ...]"; tail -c 8000000 "$f"; } > "$WORK/cut" && mv "$WORK/cut" "$f"
    fi
  done
  n=$(find "$OUT" -mindepth 1 | wc -l)
  echo "files under \$OUT: $n (at most $MAX_FILES): $(cd "$OUT" && ls | tr '\n' ' ')" >> "$SUMMARY"
  if [ "$n" -gt "$MAX_FILES" ]; then
    echo "packing: $n entries under $OUT, more than $MAX_FILES come back" >> "$SUMMARY"; FAILED="$FAILED pack"
  fi
}

export PY OUT WORK
export -f stage_env stage_build write_bisect stage_bisect pytest_args stage_tests stage_tests_dry stage_suite_dry

# ---------------------------------------------------------------------------------------------------
for s in "${STAGES[@]}"; do
  wanted "$s" || continue
  lim="${LIMIT[$s]}"
  case "$s" in
    env) run_stage env "$lim" "$OUT/env.txt" stage_env ;;
    build)
      if [ "$DRY" = 1 ]; then dry_stage build "$lim" "$OUT/build.log" "TORCH_CUDA_ARCH_LIST=<this GPU> MAX_JOBS=$(nproc) FASTDDPM_CUDA=1 $PY setup.py -q build_ext --inplace"
      else run_stage build "$lim" "$OUT/build.log" stage_build; fi ;;
    bisect) run_stage bisect "$lim" "$OUT/bisect.txt" stage_bisect ;;
    tests)
      if [ "$DRY" = 1 ]; then
        dry_stage tests "$lim" "$OUT/pytest.txt" "$PY -m pytest $(pytest_args 2>/dev/null)"
        run_stage tests-collect 60 "$OUT/pytest.txt" stage_tests_dry
      else run_stage tests "$lim" "$OUT/pytest.txt" stage_tests; fi ;;
    suite)
      if [ "$DRY" = 1 ]; then
        dry_stage suite "$lim" "$OUT/gpu_suite.txt" "${SUITE_CMD[*]}"
        run_stage suite-plan 60 "$OUT/gpu_suite.txt" stage_suite_dry
      else run_stage suite "$lim" "$OUT/gpu_suite.txt" "${SUITE_CMD[@]}"; fi ;;
    unet)
      # shellcheck disable=SC2046
      if [ "$DRY" = 1 ]; then dry_stage unet "$lim" "$OUT/gpu_suite.txt" "$(unet_cmd $(( lim - 10 )))"
      else run_stage unet "$lim" "$OUT/gpu_suite.txt" $(unet_cmd $(( lim - 10 ))); fi ;;
    autotune)
      left=$(( BUDGET - $(elapsed) - PACK_RESERVE ))
      # shellcheck disable=SC2046
      if [ "$DRY" = 1 ]; then dry_stage autotune "rest" "$OUT/gpu_suite.txt" "$(unet_cmd '<seconds left - 60>' --max-autotune) (only with >= ${AUTOTUNE_MIN}s left)"
      elif [ "$left" -ge "$AUTOTUNE_MIN" ]; then
        run_stage autotune "$left" "$OUT/gpu_suite.txt" $(unet_cmd $(( left - 60 )) --max-autotune)
      else
        printf '%-9s %8s %8s %6s  %s\n' autotune "$left" 0 - "skipped: ${left}s left, under ${AUTOTUNE_MIN}s" >> "$SUMMARY"
      fi ;;
  esac
done
pack
if [ -n "$FAILED" ]; then
  echo "result: failed:$FAILED (total $(elapsed)s)" | tee -a "$SUMMARY"
  rc=1
else
  echo "result: every stage that ran passed (total $(elapsed)s)" | tee -a "$SUMMARY"
  rc=0
fi
rm -rf "$WORK"
exit "$rc"
