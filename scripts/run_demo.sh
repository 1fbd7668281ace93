#!/usr/bin/env bash
# The main job (README): set up .venv if needed, then generate with the shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
