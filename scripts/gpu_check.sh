#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA build of torch already installed (no network
# needed): build fastddpm in place for this GPU, run the test suite (the CUDA tests run
# there instead of skipping), then the GPU benchmark suite. Logs go to ${OUT:-gpu_out}/.
#   bash scripts/gpu_check.sh [quick|full]
# Exit status: the GPU suite's if it failed (1: a backend outside its bound or a row that errored),
# else 1 if a test file failed, else 0 (a failed build: 1, before anything runs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MODE="${1:-quick}"
export PYTHONUNBUFFERED=1
# Wheels carried along (pure-Python test dependencies such as diffusers), if any.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/device.txt"
# An in-place build: fastddpm.triton_kernels is the top-level triton_kernels/ folder.
[ -e fastddpm/triton_kernels ] || ln -s ../triton_kernels fastddpm/triton_kernels
arch="$("$PY" -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")"
( time TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace ) > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
tail -5 "$OUT/build.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m fastddpm info | tee "$OUT/info.txt"
# One pytest process per file, so that a crash in one file does not hide the others.
: > "$OUT/pytest.log"
failed=""
for f in ${TEST_FILES:-tests/test_*.py}; do
  case "$f" in *test_train.py|*test_cli.py) continue ;; esac
  echo "=== $f" | tee -a "$OUT/pytest.log"
  # The whole output goes to a file first: a pipe cut short by head would kill pytest with SIGPIPE.
  log="$OUT/pytest_$(basename "$f" .py).log"
  timeout "${PYTEST_TIMEOUT:-240}" "$PY" -m pytest "$f" -q -p no:cacheprovider -rf ${PYTEST_ARGS:-} > "$log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed|error|Segmentation|Fatal|Timeout" "$log" | head -30 | tee -a "$OUT/pytest.log"
  echo "rc=$rc" | tee -a "$OUT/pytest.log"
  [ "$rc" = 0 ] || failed="$failed $f"
done
# The suite's exit code (1: a backend outside its bound against float64, or a row that errored) is the
# script's, not tail's.
if [ "$MODE" = full ]; then quick=""; keep=80; else quick="--quick"; keep=60; fi
"$PY" benchmarks/gpu_suite.py $quick --csv "$OUT/gpu_suite.csv" 2>&1 | tee "$OUT/gpu_suite.log" | tail -"$keep"
suite_rc="${PIPESTATUS[0]}"
echo "gpu_suite rc=$suite_rc"
[ -z "$failed" ] || echo "test files that failed:$failed"
[ "$suite_rc" = 0 ] || exit "$suite_rc"
[ -z "$failed" ] || exit 1
