#!/usr/bin/env bash
# diffusers' own DDPM and DDIM scheduler tests (tests/schedulers of a huggingface/diffusers source checkout;
# the wheel does not ship them), run with fastddpm's DDPMScheduler and DDIMScheduler put in place of
# diffusers' before the test modules import them.
#
#   scripts/diffusers_scheduler_tests.sh DIFFUSERS_SRC [LOG]
#
# DIFFUSERS_SRC: a diffusers checkout (a folder holding tests/schedulers) or its git folder (a bare clone).
# LOG (default benchmarks/results/diffusers_scheduler_tests.txt): the commits of both, the versions, and
# pytest's report. The exit status is pytest's (2 for a bad DIFFUSERS_SRC).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: scripts/diffusers_scheduler_tests.sh DIFFUSERS_SRC [LOG]" >&2
  exit 2
fi
src=$1
log=${2:-$root/benchmarks/results/diffusers_scheduler_tests.txt}
py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
tmp_log=
trap 'rm -rf "$work"; [ -z "$tmp_log" ] || rm -f "$tmp_log"' EXIT
parts=(tests/__init__.py tests/conftest.py tests/testing_utils.py tests/others tests/schedulers)
missing() {
  echo "DIFFUSERS_SRC: '$src' lacks $1 (expected a diffusers source checkout of tests/schedulers' era)" >&2
  exit 2
}
if [ -d "$src/tests/schedulers" ]; then
  mkdir -p "$work/tests"
  for p in "${parts[@]}"; do
    [ -e "$src/$p" ] || missing "$p"
    cp -r "$src/$p" "$work/$p"
  done
  rev=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo "not a git checkout")
elif git --git-dir="$src" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  for p in "${parts[@]}"; do
    git --git-dir="$src" cat-file -e "HEAD:$p" 2>/dev/null || missing "$p"
  done
  git --git-dir="$src" archive HEAD "${parts[@]}" | tar -x -C "$work"
  rev=$(git --git-dir="$src" rev-parse HEAD)
else
  echo "DIFFUSERS_SRC: expected a diffusers checkout (holding tests/schedulers) or its git folder, got '$src'" >&2
  exit 2
fi
cat >> "$work/tests/schedulers/conftest.py" <<'PY'

# fastddpm's schedulers in place of diffusers' (added by fastddpm's scripts/diffusers_scheduler_tests.sh)
import diffusers
import fastddpm

diffusers.DDPMScheduler = fastddpm.DDPMScheduler
diffusers.DDIMScheduler = fastddpm.DDIMScheduler
PY
tmp_log=$(mktemp "$(dirname "$log")/.tmp-XXXXXX")
{
  echo "# diffusers' DDPM and DDIM scheduler tests with fastddpm's schedulers in their place"
  echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# fastddpm commit: $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet HEAD -- fastddpm || echo ' (with local changes)')"
  echo "# diffusers tests: commit $rev"
  echo "# $("$py" -c 'import diffusers, torch, fastddpm, platform; print(f"diffusers {diffusers.__version__} (installed), torch {torch.__version__}, fastddpm {fastddpm.__version__}, python {platform.python_version()}")')"
  echo "# command: python -m pytest -v -p no:cacheprovider tests/schedulers/test_scheduler_ddpm.py tests/schedulers/test_scheduler_ddim.py"
} > "$tmp_log"
status=0
(cd "$work" && PYTHONPATH="$root" "$py" -m pytest -v -p no:cacheprovider tests/schedulers/test_scheduler_ddpm.py \
  tests/schedulers/test_scheduler_ddim.py) >> "$tmp_log" 2>&1 || status=$?
sed -i "s|$work/||g" "$tmp_log"
chmod "$(printf '%o' $(( 0666 & ~0$(umask) )))" "$tmp_log"  # (mktemp made it 0600 whatever the umask)
mv "$tmp_log" "$log"
tmp_log=
tail -n 1 "$log"
exit $status
