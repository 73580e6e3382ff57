#!/usr/bin/env bash
# One entry point for set-up, the main job and the tests.
#   bash scripts/run.sh demo    set up .venv, build, run `fastddpm info`, sample digits from the
#                               shipped model (digits.png) and write the forward-diffusion strip
#   bash scripts/run.sh test    set up .venv, build, run ruff, ctest and pytest
#   bash scripts/run.sh bench   set up .venv, build, run the quick benchmark suite (python -m benchmarks.run):
#                               append its rows to benchmarks/results/bench_*.csv, redraw the plots there and
#                               put the table into README.md (the Performance section)
#   bash scripts/run.sh setup   set up .venv and build only
# Extra arguments after `test` go to pytest, after `bench` to benchmarks.run (e.g. --full, --only NAME; with
# any, the README is left as it is: its Performance section is the whole quick suite's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${FASTDDPM_VENV:-.venv}"
PY="$VENV/bin/python"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

setup() {
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  echo "== installing dependencies"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "== building fastddpm (FASTDDPM_CUDA=${FASTDDPM_CUDA:-auto})"
  # One build at a time on this machine, whoever starts it.
  flock /tmp/fastddpm-build.lock "$PY" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e . 2>&1 | grep -E "fastddpm build|error|Error" || true
  "$PY" -c "import fastddpm._C" || { echo "fastddpm._C failed to import"; exit 1; }
  "$PY" -c "from fastddpm import _build_info as b; print('== built fastddpm._C:', 'CPU + CUDA kernels (archs ' + b.CUDA_ARCHS + ')' if b.WITH_CUDA else 'CPU kernels only (' + b.CUDA_REASON + ')'); print('== CPU kernel builds:', ', '.join(getattr(b, 'CPU_VARIANTS', {})) or 'none', '(' + getattr(b, 'CPU_VARIANTS_MODE', '?') + ')')"
}

ctest_run() {
  echo "== C++ tests (CMake + ctest)"
  local torch_prefix
  torch_prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$torch_prefix" -DPython3_EXECUTABLE="$PY" \
    -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  cmake --build build/cmake -j "$MAX_JOBS" > build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
  (cd build/cmake && ctest --output-on-failure)
}

cmd="${1-test}"  # no argument: test; an empty one is a mistake, not "test"
shift || true
case "$cmd" in
  setup) setup ;;
  bench)
    setup
    # Timings are taken while no other job that honours this lock runs (the lock is shared by this
    # machine's test and benchmark runs); the report records the load average either way.
    lock=()
    if command -v flock >/dev/null; then lock=(flock -x /tmp/fastddpm-quiet.lock); fi
    # --readme reads the whole quick suite's rows: only then is the README's Performance section rewritten
    readme=(--readme)
    [ $# -eq 0 ] || readme=()
    "${lock[@]}" "$PY" -m benchmarks.run --csv --plot ${readme[@]+"${readme[@]}"} "$@"
    ;;
  demo)
    setup
    "$VENV/bin/fastddpm" info
    "$VENV/bin/fastddpm" sample --model digits --out digits.png
    "$VENV/bin/fastddpm" demo --out demo_forward.png
    ;;
  test)
    # A fastddpm._C that does not import is an error here, not a warning and a silent slow path.
    export FASTDDPM_REQUIRE_EXTENSION=1
    setup
    echo "== ruff"
    "$VENV/bin/ruff" check .
    mkdir -p build
    ctest_run
    echo "== pytest"
    "$PY" -m pytest -q "$@"
    ;;
  -h|--help) echo "usage: bash scripts/run.sh demo|test|bench|setup" ;;
  *) echo "usage: bash scripts/run.sh demo|test|bench|setup" >&2; exit 2 ;;
esac
