"""The demo's pipeline as a new user runs it, output captured (not a terminal), with a stray Ray instance
on the machine: what the console shows, what the run log holds, and that the run stays on its own Ray.

One pipeline run (a few images per class, a few steps) serves every test here: it is the slow part.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from dermaflux.testing.ray_cluster import LocalRayCluster
from dermaflux.testing.ham10000 import build_ham_folder

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("dermaflux"))
SMALL = {  # the demo's pipeline (tiny preset), shortened to minutes
    # The demo's 2,000 steps train in a Ray Train worker group; 6 steps would train in the driver (launch auto),
    # and this run is here to show the workers' output reaching the run log.
    "pipeline.stage_settings.train.launch": "workers",
    "pipeline.stage_settings.train.steps": 6, "pipeline.stage_settings.train.checkpoint_every": 3,
    "pipeline.stage_settings.train.validate_every": 6, "pipeline.stage_settings.train.log_every": 1,
    "pipeline.stage_settings.train.vae_fit.steps": 6, "pipeline.stage_settings.synth.per_class": 2,
    "pipeline.stage_settings.evaluate.steps": 10, "pipeline.stage_settings.evaluate.sizes": "null",
    "pipeline.stage_settings.evaluate.fractions": "[0.5]", "pipeline.stage_settings.evaluate.seeds": 1,
    "pipeline.stage_settings.evaluate.ratios": "[0,1]",
}
PROGRESS = re.compile(r"^(\d\d):(\d\d):(\d\d) (?P<what>[\w :-]+?): \d+/\d+ \w+ (\(\d+%\)|in )")
# Deprecations our own code caused before (and the source file of any other warning of ours).
OUR_WARNINGS = ("ray_remote_args_fn", "`concurrency` is deprecated", "`torch_dtype` is deprecated",
                "project.license", "/dermaflux/")
WARNING_LINE = re.compile(r"(\w*Warning)[:\s]")


@dataclass
class DemoRun:
    proc: subprocess.CompletedProcess
    folder: Path
    seconds: float
    stray_jobs: list


def _stray_jobs(cluster: LocalRayCluster) -> list:
    """Drivers that ever connected to the stray instance (Ray's State API, plain HTTP)."""
    with urllib.request.urlopen(f"{cluster.dashboard_url}/api/v0/jobs?limit=100", timeout=30) as resp:
        return json.load(resp)["data"]["result"]["result"]


def _wait_for(path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f}s")
        time.sleep(1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ham10000_dir, dermaflux_cache) -> DemoRun:
    root = tmp_path_factory.mktemp("quiet")
    build_ham_folder(ham10000_dir, root / "data" / "ham10000-224", per_class=3)
    # A stray `ray start --head`. Its address file is where Ray looks first for "the" local cluster: the
    # run sees it through RAY_TMPDIR (its own default temp folder), which leaves /tmp/ray of this shared
    # machine alone.
    stray = LocalRayCluster(head_cpus=1, env={"RAY_AUTH_MODE": "disabled"})
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    try:
        (ray_tmp / "ray").symlink_to(stray.temp_dir)
        _wait_for(ray_tmp / "ray" / "ray_current_cluster")  # `ray start` writes it once its node is up
        env = {**os.environ, "DERMAFLUX_CACHE": str(dermaflux_cache), "RAY_TMPDIR": str(ray_tmp),
               # A bar would print every second: the 10 s spacing is then the product's own doing.
               "DERMAFLUX_PROGRESS_INTERVAL": "1"}
        env.pop("RAY_ADDRESS", None)
        args = [CLI, "pipeline", "--preset", "tiny", "--data", "data", "--out", "run"]
        args += [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
        started = time.time()
        proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env, cwd=root, check=False)
        seconds = time.time() - started
        jobs = _stray_jobs(stray)
    finally:  # the stray instance's own processes, by their process group; never a global `ray stop`
        stray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return DemoRun(proc, root / "run", seconds, jobs)


def _console(run: DemoRun) -> list[str]:
    return (run.proc.stdout + run.proc.stderr).splitlines()


def _run_log(run: DemoRun) -> Path:
    logs = sorted((run.folder / "logs").glob("pipeline-*.log"))
    assert len(logs) == 1, logs
    return logs[0]


def test_progress_lines_at_most_one_per_stage_per_10_seconds(demo_run):
    times: dict[str, list[int]] = {}
    for line in _console(demo_run):
        match = PROGRESS.match(line)
        if match:
            h, m, s = (int(match.group(i)) for i in (1, 2, 3))
            times.setdefault(match["what"].split(":")[0], []).append(h * 3600 + m * 60 + s)
    assert set(times) == {"curate", "caption", "train", "generate", "evaluate"}, times  # a display per stage
    for stage, stamps in times.items():
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(gap >= 10 for gap in gaps), (stage, stamps)


def test_no_line_printed_twice_and_no_traceback(demo_run):
    lines = [line for line in _console(demo_run) if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, repeated
    assert not any("Traceback" in line or "Error" in line for line in lines), lines
    assert len(lines) < 80, "\n".join(lines)  # the whole demo: banners, a few messages and bars


def test_run_log_exists_is_printed_once_and_holds_rays_output(demo_run):
    path = _run_log(demo_run)
    console = "\n".join(_console(demo_run))
    assert console.count("log of this run: ") == 1 and f"log of this run: run/logs/{path.name}" in console
    text = path.read_text()
    assert "Started a local Ray instance" in text  # Ray's driver logger
    # The workers' output, forwarded by Ray.
    assert re.search(r"^\(RayTrainWorker pid=\d+\) dermaflux progress: train 6/6", text, re.MULTILINE)
    assert "Execution plan of Dataset" in text  # Ray Data's logger
    assert "=== [5/5] evaluate: done" in text


def test_no_python_warning_of_our_own_making(demo_run):
    text = _run_log(demo_run).read_text().splitlines()
    ours = [line for line in text + _console(demo_run)
            if WARNING_LINE.search(line) and any(marker in line for marker in OUR_WARNINGS)]
    assert not ours, ours
    assert not any("truncated because CLIP can only handle" in line for line in text)


def test_a_stray_ray_instance_is_neither_joined_nor_a_traceback(demo_run):
    assert demo_run.stray_jobs == []  # no driver of this run connected to the stray instance
    text = _run_log(demo_run).read_text()
    assert "Found multiple active Ray instances" not in text and "Traceback" not in text
    # Ray Train's placement-group cleaner asked its own cluster's State API, which knew the controller
    # alive. Joined to the stray one it reported the controller dead at once and quit ("Failed to
    # register placement group with cleaner"); without a State API it warns every second.
    for symptom in ("Failed to register placement group with cleaner", "is dead. Cleaning up placement group",
                    "Failed to query Ray Train Controller actor state"):
        assert symptom not in text, symptom
    summary = json.loads((demo_run.folder / "pipeline.json").read_text())
    assert all(info["status"] == "succeeded" for info in summary["stages"].values()), summary


def test_the_fitted_vae_is_reused_for_the_same_images_and_settings(demo_run, tmp_path):
    from dermaflux.config import load_config
    from dermaflux.core.artifacts import marker_path, read_json
    from dermaflux.train.ray_vae_fit import cache_key, cached_vae_fit

    cfg = load_config(None, demo_run.folder / "train" / "config.yaml")  # the train stage's effective config
    fitted = read_json(marker_path(demo_run.folder / "train", "vae_fit"))
    assert fitted["cache"] in ("stored", "hit") and fitted["psnr_test"] > fitted["psnr_before"]
    started = time.time()
    vae_dir, reused = cached_vae_fit(cfg, tmp_path)  # a hit needs no Ray: it copies the cached VAE
    assert reused["cache"] == "hit" and reused["cache_key"] == fitted["cache_key"]
    assert reused["psnr_test"] == fitted["psnr_test"] and time.time() - started < 60
    weights = "diffusion_pytorch_model.safetensors"
    assert (vae_dir / weights).read_bytes() == (demo_run.folder / "train" / "vae" / weights).read_bytes()
    longer = cfg.model_copy(deep=True)
    longer.train.vae_fit.steps += 1
    fewer = cfg.model_copy(deep=True)
    fewer.train.vae_fit.max_images = 5  # other training images
    assert len({cache_key(cfg), cache_key(longer), cache_key(fewer)}) == 3
