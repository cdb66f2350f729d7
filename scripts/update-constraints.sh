#!/usr/bin/env bash
# Rewrite constraints.txt: the exact versions a fresh `pip install -e '.[data,dev]'` resolves
# to today, within pyproject.toml's ranges. Run the suite with them (make install && make
# test) before committing the new file: CI installs exactly these.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
  "$venv/bin/pip" install --quiet -e '.[data,dev]' </dev/null
{
  echo "# Exact versions the test suite passes with; .ci/run (make install) installs with"
  echo "# \`pip install -c constraints.txt\`, so CI does not change under us when a dependency"
  echo "# releases. pyproject.toml keeps the ranges users install from. Regenerate with"
  echo "# scripts/update-constraints.sh (make constraints)."
  "$venv/bin/pip" freeze --exclude-editable
} >constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
