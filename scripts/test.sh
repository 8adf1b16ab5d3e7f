#!/usr/bin/env bash
# The test command: sets up the environment (with the test extra and Chromium), then runs the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh --test || exit 1
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export DERMAFLUX_CACHE=${DERMAFLUX_CACHE:-$PWD/.cache/dermaflux}
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
