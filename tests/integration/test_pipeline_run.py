"""`dermaflux pipeline` for real on a small HAM10000 folder: runs, resumes, refuses a different run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermaflux.testing.ham10000 import build_ham_folder

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("dermaflux"))


def run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DERMAFLUX_CACHE": str(cache), "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_pipeline_runs_resumes_and_points_to_its_summary(tmp_path, ham10000_dir, dermaflux_cache):
    data = tmp_path / "data"
    build_ham_folder(ham10000_dir, data / "ham10000-224", per_class=4)
    (data / "notes").mkdir()  # not a dataset: skipped
    out = tmp_path / "run"
    first = run([CLI, "pipeline", "--preset", "tiny", "--data", str(data), "--out", str(out),
                 "--stages", "curate,caption", "--set", "ray.num_cpus=2"], dermaflux_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/2] curate" in first.stderr and "[2/2] caption" in first.stderr
    summary = json.loads((out / "pipeline.json").read_text())
    assert [summary["stages"][s]["status"] for s in ("curate", "caption")] == ["succeeded", "succeeded"]
    assert sorted((out / "captions" / "shards").glob("*.parquet"))
    assert f"summary: {out}/pipeline.json" in first.stdout and "report: none" in first.stdout

    # The same run again, through the Ray job entrypoint and the run's own effective config: all skipped.
    again = run([sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(out / "config.yaml")],
                dermaflux_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "curate: done earlier, skipped" in again.stderr and "caption: done earlier, skipped" in again.stderr
    final = json.loads(again.stdout.strip().splitlines()[-1])
    assert final["status"] == "succeeded" and final["stages"]["caption"]["status"] == "done earlier"

    # Changed curate settings: curate runs again and refuses its folder, which holds a different run.
    other = run([CLI, "pipeline", "--preset", "tiny", "--data", str(data), "--out", str(out),
                 "--stages", "curate,caption", "--set", "curate.seed=7"], dermaflux_cache)
    assert other.returncode == 2 and str(out) in other.stderr and "different" in other.stderr
