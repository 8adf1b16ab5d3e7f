"""A real multi-node Ray cluster on this machine: `ray start --block` processes on loopback.

Each node is its own process group, so a test can kill one node (a lost worker machine) and
stopping the cluster never touches Ray instances of other processes (no global `ray stop`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dermaflux.core.runtime import free_port

RAY_BIN = str(Path(sys.executable).with_name("ray"))


class LocalRayCluster:
    def __init__(self, head_cpus: int = 2, env: dict | None = None):
        # Short temp dir: Ray's socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.port = free_port()
        self.dashboard_port = free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start("head", [
            "--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}",
        ])
        self._wait_for_dashboard()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(
            # Every node its own agent HTTP port: the default (52365) is shared by all Ray nodes on the
            # machine, so a second node's agent fails to bind and the Jobs API finds no agent.
            [RAY_BIN, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def add_worker(self, name: str = "worker", num_cpus: int = 2, resources: str | None = None) -> None:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={resources}")
        self._start(name, args)
        self.wait_for_nodes(len(self.nodes))

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.nodes["head"].poll() is not None:
                raise RuntimeError(f"ray head exited: {self.log('head')}")
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"ray dashboard did not come up: {self.log('head')}")

    def alive_nodes(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.dashboard_url}/nodes?view=summary", timeout=5) as resp:
            summary = json.load(resp)["data"]["summary"]
        return sum(1 for n in summary if n["raylet"]["state"] == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.alive_nodes() >= count:
                    return
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout}s")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: the machine is gone."""
        proc = self.nodes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        path = Path(self.temp_dir) / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def shutdown(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            proc = self.nodes.pop(name, None)
            if proc is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
