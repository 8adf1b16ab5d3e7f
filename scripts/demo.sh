#!/usr/bin/env bash
# The main job on the embedded default: local Ray, the tiny preset, the data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export DERMAFLUX_CACHE=${DERMAFLUX_CACHE:-$PWD/.cache/dermaflux}
exec .venv/bin/dermaflux pipeline --preset tiny --data "${DERMAFLUX_DATA:-../shared/data}" --out "${1:-runs/demo}"
