#!/usr/bin/env bash
# Run THERE, through the device tool, after scripts/gpu-wheels.sh here:
#
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu"], timeout_s=540)
#
# Installs the carried wheels into the image's python3, runs tests/gpu, the model ceiling
# on CUDA (`tickcast bench --ceiling-only`), then the whole bench on CUDA against the
# carried Tansu broker (the image has no Java), and leaves the outputs in $OUT.
# DEVICE=cpu PYTHON=.venv/bin/python rehearses it here.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
out=${OUT:-/tmp/tickcast-gpu-out}
mkdir -p "$out"
python=${PYTHON:-python3}
device=${DEVICE:-cuda}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$python" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/machine.txt"

# What the image lacks, as scripts/gpu-wheels.sh listed it (msgspec was once left out here).
"$python" -m pip install --quiet --no-index --find-links .gpu/wheels \
  -r .gpu/requirements.txt 2>&1 | tee "$out/install.txt"

"$python" -m pytest tests/gpu -p no:cacheprovider -q -rs 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

# tickcast bench NAME ARGS...: output in $out/bench-NAME.{json,txt}, minus triton's exit noise.
bench() {
  local name=$1
  shift
  "$python" -c 'from daemon.cli import main; raise SystemExit(main())' bench \
    --device "$device" "$@" --json "$out/bench-$name.json" 2>&1 \
    | grep -v -e 'leaked function' -e nanobind | tee "$out/bench-$name.txt"
  return "${PIPESTATUS[0]}"
}

bench "$device" --ceiling-only
bench_rc=$?

# End to end: every phase but the 1M-symbol memory probe (a CPU figure) and the restore
# (its producers are idempotent, which Tansu refuses).
export CALF_TANSU_BIN=${CALF_TANSU_BIN:-$PWD/.gpu/tansu}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
bench "$device-tansu" --broker tansu --symbols 0 ${BENCH_ARGS:-}
e2e_rc=$?

echo "tests rc=$tests_rc ceiling rc=$bench_rc end-to-end rc=$e2e_rc" | tee -a "$out/machine.txt"
exit $(( tests_rc || bench_rc || e2e_rc ))
