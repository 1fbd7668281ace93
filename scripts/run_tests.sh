#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv if needed, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
if [ "$rc" -eq 5 ]; then
  echo "run_tests.sh: pytest collected no tests" >&2
fi
exit "$rc"
