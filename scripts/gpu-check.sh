#!/usr/bin/env bash
# Issue 11's one prepared GPU check: the product's train, generate and serve paths on a FLUX.1-dev-shaped
# random model, the gpu tests, the training bench, and bench/reference/h200-product.json.
#
#   bash scripts/gpu-check.sh --prepare [--dry-run]   HERE (CPU, PyPI reachable): wheels the GPU machine lacks
#                                                     and a few HAM10000 images into .gpu_wheels/ (git-ignored)
#   bash scripts/gpu-check.sh [--only a,b] [--dry-run]   THERE (the lent GPU machine, through the device tool):
#        run(command="DFX_COMMIT=<sha> bash scripts/gpu-check.sh", carry=[".gpu_wheels"], timeout_s=600)
#
# Steps there, in order (each timed, logged, limited by `timeout`; a failed step does not stop the next):
#   install      pip-installs .gpu_wheels/ into /tmp/dfx-site (skipped when already there: a warm machine)
#   smoke        imports ray/deepspeed/diffusers/dermaflux, prints versions and the GPU
#   model        `dermaflux model random --like flux-dev` into /tmp/dfx-gpu/flux-dev-random (~34 GB, once)
#   tests        pytest tests/gpu (train ZeRO-2 + resume + diffusers reload, ZeRO-3, generate, serve)
#   bench-train  bench/train.py --gpu-product: the product's trainer against plain loops, MFU
#   bench-online bench/train.py --gpu-product --gpu-encode online: the same run encoding online (issue 21)
#   report       $OUT/h200-product.json (copy it to bench/reference/ and commit it)
# Outputs: /tmp/dfx-gpu/results (kept while the machine is warm), copied at the end of each call to $OUT (set by
# the device tool; default bench/results/gpu-check): gpu-check.log, steps.tsv, gpu-tests-*.xml,
# gpu-results.jsonl, bench-train.json, h200-product.json (at most 8 files come back from a call).
# Step time limits (seconds) can be changed with DFX_T_<STEP> (e.g. DFX_T_TESTS=900).
#
# Device time is short (15 minutes a task, 10 a call): the whole check takes longer than one call, so split it,
# calling again at once (the machine stays warm ~30 s; then /tmp, the install and the model are still there):
#   1) DFX_GPU_TESTS_K='zero2 or diffusers' bash scripts/gpu-check.sh --only install,smoke,model,tests
#   2) DFX_GPU_TESTS_K='zero3 or generate or serve' bash scripts/gpu-check.sh --only install,model,tests
#   3) bash scripts/gpu-check.sh --only install,model,bench-train,report
# Each call brings back the results gathered so far (kept in /tmp/dfx-gpu/results while the machine is warm).
# shellcheck disable=SC2317  # the step functions are called indirectly, through run_step
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${DFX_GPU_CARRY:-$ROOT/.gpu_wheels}"
WORK="${DFX_GPU_WORK:-/tmp/dfx-gpu}"
SITE="${DFX_GPU_SITE:-/tmp/dfx-site}"
MODEL="$WORK/flux-dev-random"
OUT_DIR="${OUT:-$ROOT/bench/results/gpu-check}"
RESULTS="$OUT_DIR"  # there: $WORK/results, kept across calls on a warm machine and copied to $OUT_DIR
PYTHON="${PYTHON:-python3}"
HAM_IMAGES="${DFX_GPU_HAM_IMAGES:-48}"
ALL_STEPS="install smoke model tests bench-train bench-online report"

MODE=run
DRY_RUN=0
ONLY=""

usage() {
  sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY="${2:?--only needs a comma-separated list of steps}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ "$MODE" == run && "$DRY_RUN" == 0 ]] && RESULTS="$WORK/results"
mkdir -p "$RESULTS" "$OUT_DIR"
LOG="$RESULTS/gpu-check.log"
export ROOT CARRY WORK SITE MODEL RESULTS PYTHON HAM_IMAGES LOG
STEPS_TSV="$RESULTS/steps.tsv"
FAILED=0

log() {
  printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG"
}

selected() {
  [[ -z "$ONLY" ]] && return 0
  [[ ",$ONLY," == *",$1,"* ]]
}

# run_step NAME DEFAULT_LIMIT_S FUNCTION: times FUNCTION under `timeout`, logs its output, records the result.
run_step() {
  local name="$1" limit="$2" fn="$3" var rc started
  var="DFX_T_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  limit="${!var:-$limit}"
  if ! selected "$name"; then
    return 0
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    log "plan: step $name (limit ${limit}s):"
    "$fn" plan | sed 's/^/      /' | tee -a "$LOG"
    return 0
  fi
  log "step $name: start (limit ${limit}s)"
  started=$(date +%s)
  set +e
  # A child bash (timeout needs a program) with the step's function and strict mode; settings are exported.
  timeout --kill-after=20 "$limit" bash -c "set -euo pipefail; $(declare -f "$fn" log); $fn run" >>"$LOG" 2>&1
  rc=$?
  set -e
  local seconds=$(( $(date +%s) - started ))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$seconds" >>"$STEPS_TSV"
  if [[ "$rc" == 0 ]]; then
    log "step $name: ok in ${seconds}s"
  else
    FAILED=$((FAILED + 1))
    if [[ "$rc" == 124 ]]; then
      log "step $name: TIMED OUT after ${seconds}s"
    else
      log "step $name: FAILED (rc $rc) in ${seconds}s"
    fi
  fi
}

# Each step function takes "plan" (print what it would do) or "run".
step_install() {
  if [[ "$1" == plan ]]; then
    echo "pip install --no-index --no-deps --target $SITE $CARRY/wheels/*.whl; deepspeed from its sdist"
    echo "(--no-build-isolation, DS_BUILD_OPS=0); skipped when $SITE/.done exists"
    return 0
  fi
  if [[ -f "$SITE/.done" ]]; then
    echo "already installed in $SITE"
    return 0
  fi
  shopt -s nullglob
  local wheels=("$CARRY"/wheels/*.whl) sdists=("$CARRY"/wheels/deepspeed-*.tar.gz)
  [[ ${#wheels[@]} -gt 0 ]] || { echo "no wheels in $CARRY/wheels (run --prepare here and carry .gpu_wheels)"; return 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  DS_BUILD_OPS=0 PYTHONPATH="$SITE" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --no-build-isolation --upgrade --target "$SITE" "${sdists[@]}"
  touch "$SITE/.done"
}

step_smoke() {
  if [[ "$1" == plan ]]; then
    echo "import ray, ray.train.torch, ray.serve, ray.data, deepspeed, diffusers, pydantic, tensorboardX and"
    echo "dermaflux's train/synth modules; print versions, the GPU and its free memory"
    return 0
  fi
  "$PYTHON" - <<'PY'
import importlib, torch
for name in ("ray", "ray.train.torch", "ray.serve", "ray.data", "deepspeed", "diffusers", "transformers", "peft",
             "pydantic", "tensorboardX", "dermaflux.cli", "dermaflux.train.ray_trainer", "dermaflux.synth.serve_app"):
    module = importlib.import_module(name)
    print(f"{name:30s} {getattr(module, '__version__', '')}")
free, total = torch.cuda.mem_get_info()
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {free / 2**30:.0f} of {total / 2**30:.0f} GiB free")
PY
}

step_model() {
  if [[ "$1" == plan ]]; then
    echo "python -m dermaflux.cli model random --like flux-dev --out $MODEL   (skipped when written)"
    return 0
  fi
  df -h "$WORK" 2>/dev/null || df -h /tmp
  "$PYTHON" -m dermaflux.cli model random --like flux-dev --out "$MODEL"
  du -sh "$MODEL"
}

step_tests() {
  if [[ "$1" == plan ]]; then
    echo "DFX_GPU_MODEL=$MODEL DERMAFLUX_DATA=$CARRY/data python -m pytest tests/gpu -m gpu -v"
    echo "  --junitxml $RESULTS/gpu-tests-HHMMSS.xml   (figures appended to $RESULTS/gpu-results.jsonl);"
    echo "  DFX_GPU_TESTS_K='zero2 or diffusers' selects a part (the ZeRO-2 run is kept in $WORK for the rest)"
    return 0
  fi
  local selection=()
  [[ -n "${DFX_GPU_TESTS_K:-}" ]] && selection=(-k "$DFX_GPU_TESTS_K")
  DFX_GPU_MODEL="$MODEL" DERMAFLUX_DATA="$CARRY/data" DFX_GPU_RESULTS="$RESULTS/gpu-results.jsonl" \
    DFX_GPU_WORK="$WORK" "$PYTHON" -m pytest "$ROOT/tests/gpu" -m gpu -v -p no:cacheprovider \
    --basetemp "$WORK/pytest" --junitxml "$RESULTS/gpu-tests-$(date +%H%M%S).xml" "${selection[@]}"
}

step_bench_train() {
  if [[ "$1" == plan ]]; then
    echo "python bench/train.py --gpu-product --model $MODEL --data $CARRY/data/ham10000-224 --json $RESULTS/bench-train.json"
    echo "  (dermaflux's Ray Train + DeepSpeed trainer on the flux-dev preset, then plain loops: the same"
    echo "   settings, and diffusers' Flux LoRA defaults: batch 4, no checkpointing, 512 tokens; MFU)"
    return 0
  fi
  "$PYTHON" "$ROOT/bench/train.py" --gpu-product --model "$MODEL" --data "$CARRY/data/ham10000-224" \
    --work "$WORK/bench-train" --json "$RESULTS/bench-train.json"
}

step_bench_online() {
  if [[ "$1" == plan ]]; then
    echo "python bench/train.py --gpu-product --gpu-encode online --model $MODEL --data $CARRY/data/ham10000-224"
    echo "  --json $RESULTS/bench-train-online.json   (the product run of bench-train, encoding online on the GPU:"
    echo "   its samples/s against bench-train.json's cached run on the same batch)"
    return 0
  fi
  "$PYTHON" "$ROOT/bench/train.py" --gpu-product --gpu-encode online --model "$MODEL" \
    --data "$CARRY/data/ham10000-224" --work "$WORK/bench-online" --json "$RESULTS/bench-train-online.json"
}

step_report() {
  if [[ "$1" == plan ]]; then
    echo "python scripts/gpu_check.py report $RESULTS -> $RESULTS/h200-product.json (keys of issue 11)"
    return 0
  fi
  DFX_COMMIT="${DFX_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}" \
    "$PYTHON" "$ROOT/scripts/gpu_check.py" report "$RESULTS"
}

# --- preparation, here -------------------------------------------------------------------------------------

prepare_wheels() {
  if [[ "$1" == plan ]]; then
    echo "pip download (cp312, manylinux x86_64, --no-deps) each line of scripts/gpu-wheels.txt into $CARRY/wheels;"
    echo "deepspeed as its sdist; ray repacked without ray/jars, the dashboard's client build and rllib"
    return 0
  fi
  local wheel_dir="$CARRY/wheels" pip_py="${PREPARE_PYTHON:-$ROOT/.venv/bin/python}"
  [[ -x "$pip_py" ]] || pip_py=python3
  mkdir -p "$wheel_dir"
  local specs=()
  mapfile -t specs < <(grep -v '^#' "$ROOT/scripts/gpu-wheels.txt" | grep -v '^deepspeed' | sed '/^$/d')
  "$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64 -d "$wheel_dir" "${specs[@]}"
  "$pip_py" -m pip download -q --no-deps --no-binary=:all: -d "$wheel_dir" \
    "$(grep '^deepspeed==' "$ROOT/scripts/gpu-wheels.txt")"
  "$pip_py" "$ROOT/scripts/gpu_check.py" slim-ray-wheel "$wheel_dir"
}

prepare_data() {
  if [[ "$1" == plan ]]; then
    echo "copy the first $HAM_IMAGES HAM10000 images (by image id) and their metadata rows from"
    echo "${DERMAFLUX_DATA:-$ROOT/../shared/data}/ham10000-224 into $CARRY/data/ham10000-224"
    return 0
  fi
  local src="${DERMAFLUX_DATA:-$ROOT/../shared/data}/ham10000-224" dst="$CARRY/data/ham10000-224"
  mkdir -p "$dst/images"
  head -n 1 "$src/HAM10000_metadata.csv" >"$dst/HAM10000_metadata.csv"
  local id_col
  id_col=$(head -n 1 "$src/HAM10000_metadata.csv" | tr ',' '\n' | grep -n '^image_id$' | cut -d: -f1)
  # awk, not head: head closing the pipe early would fail sort with SIGPIPE under pipefail
  tail -n +2 "$src/HAM10000_metadata.csv" | sort -t, -k"$id_col,$id_col" | awk -v n="$HAM_IMAGES" 'NR <= n' \
    >>"$dst/HAM10000_metadata.csv"
  tail -n +2 "$dst/HAM10000_metadata.csv" | cut -d, -f"$id_col" | while read -r image_id; do
    cp "$src/images/$image_id.jpg" "$dst/images/"
  done
}

prepare_size() {
  if [[ "$1" == plan ]]; then
    echo "print the size of $CARRY and of the tracked tree: together they must stay under 64 MiB"
    return 0
  fi
  local carry_kib tree_kib
  carry_kib=$(du -sk "$CARRY" | cut -f1)
  tree_kib=$(( $(git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) | tail -n 1 | cut -f1) / 1024 ))
  echo "carried $((carry_kib / 1024)) MiB + tree $((tree_kib / 1024)) MiB (limit 64 MiB)"
  [[ $((carry_kib + tree_kib)) -lt $((62 * 1024)) ]]
}

if [[ "$MODE" == prepare ]]; then
  ONLY="${ONLY:-wheels,data,size}"
  log "gpu-check --prepare into $CARRY$([[ "$DRY_RUN" == 1 ]] && echo ' (dry run)')"
  run_step wheels 900 prepare_wheels
  run_step data 120 prepare_data
  run_step size 60 prepare_size
else
  log "gpu-check on $(hostname) into $RESULTS$([[ "$DRY_RUN" == 1 ]] && echo ' (dry run)'); steps: ${ONLY:-$ALL_STEPS}"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # DS_ACCELERATOR: tests/conftest.py defaults it to cpu for the CPU suites
  export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
  export DERMAFLUX_CACHE="$WORK/cache" RAY_TMPDIR="$WORK/ray"
  mkdir -p "$WORK"
  run_step install 180 step_install
  run_step smoke 90 step_smoke
  run_step model 300 step_model
  run_step tests 1500 step_tests
  run_step bench-train 600 step_bench_train
  run_step bench-online 600 step_bench_online
  run_step report 60 step_report
fi
log "done: $FAILED step(s) failed; steps.tsv: name, exit code, seconds"
if [[ "$RESULTS" != "$OUT_DIR" ]]; then
  cp "$RESULTS"/* "$OUT_DIR"/ 2>/dev/null || true
fi
exit $(( FAILED > 0 ? 1 : 0 ))
