#!/usr/bin/env bash
# The main job on the embedded default: local Ray, the tiny preset, every stage of the pipeline.
#   bash scripts/demo.sh [OUT]     OUT: the run folder (default runs/demo; re-run to resume)
# DERMAFLUX_DATA: the folder of datasets (default ../shared/data); DERMAFLUX_CACHE: built models and
# the fitted-VAE cache (default .cache/dermaflux in the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export DERMAFLUX_CACHE=${DERMAFLUX_CACHE:-$PWD/.cache/dermaflux}
exec .venv/bin/dermaflux pipeline --preset tiny --data "${DERMAFLUX_DATA:-../shared/data}" --out "${1:-runs/demo}"
