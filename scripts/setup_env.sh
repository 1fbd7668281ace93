#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs
# the pinned stack into it. Safe to run repeatedly: it reinstalls only when
# pyproject.toml or this script changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.cryptogen_installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# CPU build of torch first, pinned, so nothing below can pull a CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[test,bench]"
# crypten 0.4.1's metadata asks for `sklearn` (a dead package) and torchvision;
# it needs neither for what we use. Install it without its metadata.
$PIP install --no-deps "crypten==0.4.1"
"$VENV/bin/python" -c "import cryptogen_hf.crypten_compat as c; c.import_crypten()"
echo "$want" > "$STAMP"
