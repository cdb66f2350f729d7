#!/usr/bin/env bash
# Run THERE, through the device tool, after scripts/gpu-wheels.sh here:
#
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu"], timeout_s=540)
#
# Installs the carried wheels into the image's python3, runs tests/gpu and the model
# ceiling on CUDA (`tickcast bench --device cuda --ceiling-only`; the image has no Java,
# so no Kafka phases), and leaves the outputs in $OUT. DEVICE=cpu tries it without a GPU.
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

"$python" -m pip install --quiet --no-index --find-links .gpu/wheels \
  aiokafka orjson pydantic-settings pytest-asyncio arch backtesting 2>&1 | tee "$out/install.txt"

"$python" -m pytest tests/gpu -p no:cacheprovider -q -rs 2>&1 | tee "$out/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

"$python" -c 'from daemon.cli import main; raise SystemExit(main())' bench \
  --device "$device" --ceiling-only --json "$out/bench-$device.json" 2>&1 \
  | grep -v -e 'leaked function' -e nanobind | tee "$out/bench-$device.txt"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc" | tee -a "$out/machine.txt"
exit $(( tests_rc || bench_rc ))
