#!/usr/bin/env bash
# Create .venv in the checkout and install DermaFlux: `setup-env.sh` what the demo needs,
# `setup-env.sh --test` that plus the test extra and headless Chromium (the report-rendering test).
# Safe to run twice: it reinstalls only when pyproject.toml or this script changed since the last
# successful install of that kind.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=demo
[ "${1:-}" = "--test" ] && mode=test
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra=""
[ "$mode" = test ] && extra="[test]"
stamp=.venv/.dermaflux-installed-$mode
want=$(sha256sum pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
installed=$(cat "$stamp" 2>/dev/null || true)
# The test install includes the demo's.
[ "$mode" = demo ] && [ "$(cat .venv/.dermaflux-installed-test 2>/dev/null)" = "$want" ] && installed=$want
if [ "$installed" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision first: pip takes the pinned wheels from this machine's local index.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".$extra"
  echo "$want" > "$stamp"
fi
[ "$mode" = test ] || exit 0

# Headless Chromium renders the evaluation report in its test (Debian package, installed once).
command -v chromium >/dev/null 2>&1 && exit 0
why=""
if ! command -v apt-get >/dev/null 2>&1; then
  why="no apt-get on this machine"
elif [ "$(id -u)" != 0 ]; then
  why="installing it needs root (sudo apt-get install chromium)"
else
  # Another apt or dpkg (an unattended upgrade, another install) may hold the package lock for a
  # while: wait for it rather than fail (apt waits up to Lock::Timeout; the loop covers `update`).
  why="the package lock stayed busy for 6 attempts"
  for attempt in 1 2 3 4 5 6; do
    if out=$(apt-get -o DPkg::Lock::Timeout=120 update -qq 2>&1 &&
             apt-get -o DPkg::Lock::Timeout=120 install -y -qq chromium 2>&1); then
      why=""
      break
    fi
    case "$out" in
      *"Could not get lock"*|*"Unable to acquire the dpkg"*|*"is held by process"*)
        echo "setup-env: the package lock is busy (attempt $attempt of 6); retrying in 30 s" >&2
        sleep 30 ;;
      *)
        why="apt-get failed: $(printf '%s\n' "$out" | grep -E '^E:' | tail -1)"
        break ;;
    esac
  done
fi
if [ -n "$why" ]; then
  echo "setup-env: headless Chromium is not installed: $why." >&2
  echo "setup-env: only the report-rendering test needs it (tests/integration/test_evaluate_grid.py skips it" >&2
  echo "setup-env: without Chromium); install it with 'apt-get install chromium' and re-run." >&2
fi
exit 0
