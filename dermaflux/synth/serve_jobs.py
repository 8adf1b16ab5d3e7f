"""The service's bulk jobs: starting, reading and cancelling them, and the actor that runs each.

A job's images, plan and resume come from `bulk` (shared with `dermaflux generate`); where jobs
live on disk (one root, the id -> out index, the lock, cancel markers) from `jobs.JobStore`.
This module is the lifecycle between them, which the HTTP API calls and nothing else does:

- `BulkJobs.start` claims the job's `out` under the jobs lock and leaves a `BulkJobRunner`
  running (or finds it done); `status` reads the progress record; `cancel` asks the runner to
  stop after its current shard.
- `BulkJobRunner`: a detached actor per running job that walks the job's shards through the
  synthesis deployment (retrying a shard when a replica dies), writes them via `bulk` and stops
  between shards when cancelled.

Job states: running, done, failed, cancelled (the job's progress record) and interrupted (the
record says running but no runner lives: Ray or the service restarted). A re-POST of the same
request resumes an interrupted, failed or cancelled job; nothing resumes by itself at start-up.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import serve

from dermaflux.core import artifacts
from dermaflux.synth import bulk, jobs
from dermaflux.synth.requests import AugmentationRequest, RequestError, SampleRequest, ServiceBusy
from dermaflux.synth.serve_model import SYNTH_DEPLOYMENT, synth_call

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)

JOB_NAMESPACE = "dermaflux-jobs"
RUNNER_EXIT_WAIT_S = 30.0


def runner_namespace(root: Path) -> str:
    """Runners of one jobs root: services with different roots never share job names."""
    return f"{JOB_NAMESPACE}-{artifacts.fingerprint(str(root))}"


@ray.remote(num_cpus=0, max_restarts=-1)
class BulkJobRunner:
    """Runs one job to its end, its cancel or its failure; restarted by Ray if its process dies,
    resuming from the done markers."""

    def __init__(self, root: str, out: str, app_name: str, max_retries: int):
        self.store, self.out = jobs.JobStore(root), Path(out)
        self.thread = threading.Thread(target=self._run, args=(app_name, max_retries), daemon=True)
        self.thread.start()

    def _run(self, app_name: str, max_retries: int) -> None:
        spec = bulk.read_spec(self.out)
        handle = serve.get_deployment_handle(SYNTH_DEPLOYMENT, app_name)

        def generate(samples: list[SampleRequest]) -> list[bytes]:
            responses = [synth_call(handle, s.settings.adapter).generate.remote(s.to_dict()) for s in samples]
            return [r.result(timeout_s=600)["png"] for r in responses]

        # A restart by Ray after the job ended or was cancelled has nothing to do.
        if bulk.job_status(self.out)["state"] == "running":
            try:
                bulk.run_job(self.out, spec, generate, max_retries=max_retries, should_stop=self._cancelled,
                             before_write=lambda: self.store.check_folder(self.out))
            except Exception:  # run_job recorded it in the progress record, where it still could
                log.exception("bulk job %s failed", spec.job_id)
        # A detached actor outlives its caller, so it ends itself (a re-POST starts a new one).
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _cancelled(self) -> bool:
        # Decided under the jobs lock: a re-POST that withdraws the cancel never crosses it.
        with self.store.lock():
            if not jobs.cancel_requested(self.out):
                return False
            self.store.check_folder(self.out)
            bulk.set_state(self.out, "cancelled")
            jobs.clear_cancel(self.out)
            return True


def _conflict(job_id: str, relative: str, out: Path) -> RequestError:
    """Why `out` cannot take this job, in the API's terms (the API has no --force)."""
    spec_file = out / bulk.SPEC_FILE
    owner = artifacts.read_json(spec_file).get("job_id") if spec_file.exists() else None
    if owner is None:
        return RequestError("out", f"{relative!r} is not empty and was not written by a DermaFlux job; "
                            "choose another out", status=409)
    if owner != job_id:
        return RequestError("out", f"{relative!r} holds job {owner!r}; choose another out", status=409)
    return RequestError("job_id", f"job {job_id!r} was started with other targets or settings; repeat the original "
                        "request to resume it, or use a new job_id", status=409)


def _finished(out: Path) -> bool:
    """`out` holds a job whose progress record says done (resuming it starts no runner)."""
    record = out / bulk.PROGRESS_FILE
    return record.is_file() and artifacts.read_json(record).get("state") == "done"


class BulkJobs:
    """The bulk jobs of one service (one jobs root): what the HTTP API's job routes call."""

    def __init__(self, cfg: DermaFluxConfig, adapter_paths: dict[str, str]):
        self.cfg, self.adapter_paths = cfg, adapter_paths
        self.store = jobs.JobStore(cfg.synth.jobs_root)
        self.runners = runner_namespace(self.store.root)

    def start(self, body: AugmentationRequest) -> dict:
        """Start (or resume, or find done) the job `body` describes; its status."""
        if body.corpus is not None:
            body = body.model_copy(update={"corpus": jobs.resolve_corpus(self.cfg.synth.corpus_root, body.corpus)})
        spec = bulk.job_spec(self.cfg, body, self.adapter_paths)
        relative, out = self.store.resolve_out(body.out, body.job_id)
        with self.store.lock():
            self._start(body.job_id, relative, out, spec)
        return self._status(body.job_id, relative)

    def status(self, job_id: str) -> dict:
        return self._status(job_id, self._known(job_id))

    def cancel(self, job_id: str) -> dict:
        """Ask the job's runner to stop after its current shard (a job with no runner is cancelled now)."""
        relative = self._known(job_id)
        out = self.store.folder(relative)
        with self.store.lock():
            state = bulk.job_status(out)["state"]
            if state == "done":
                raise RequestError("job_id", f"job {job_id!r} is done; there is nothing to cancel", status=409)
            if state == "running" and self._runner(job_id) is not None:
                jobs.request_cancel(out)
            elif state != "cancelled":
                bulk.set_state(out, "cancelled")
        return self._status(job_id, relative)

    def _runner(self, job_id: str):
        try:
            return ray.get_actor(job_id, namespace=self.runners)
        except ValueError:
            return None

    def _await_exit(self, job_id: str) -> None:
        """A runner that recorded its end (done, failed, cancelled) is leaving: wait until it has."""
        deadline = time.monotonic() + RUNNER_EXIT_WAIT_S
        while self._runner(job_id) is not None:
            if time.monotonic() > deadline:
                raise ServiceBusy("job_id", f"job {job_id!r} is still stopping", self.cfg.synth.limits.retry_after_s)
            time.sleep(0.1)

    def _running_jobs(self) -> int:
        return sum(a["namespace"] == self.runners for a in ray.util.list_named_actors(all_namespaces=True))

    def _known(self, job_id: str) -> str:
        relative = self.store.out_of(job_id)
        if relative is None:
            raise RequestError("job_id", f"no job {job_id!r}", status=404)
        return relative

    def _status(self, job_id: str, relative: str) -> dict:
        out = self.store.folder(relative)
        status = bulk.job_status(out)
        if status["state"] == "running" and self._runner(job_id) is None:
            with self.store.lock():  # a start in progress holds the lock until its runner exists
                status = bulk.job_status(out)
                if status["state"] == "running" and self._runner(job_id) is None:
                    status["state"] = "interrupted"  # no runner: Ray or the service restarted
        return {**status, "out": relative, "cancel_requested": jobs.cancel_requested(out)}

    def _admit_runner(self) -> None:
        limit = self.cfg.synth.limits.max_running_jobs
        if self._running_jobs() >= limit:
            raise ServiceBusy("job_id", f"{limit} bulk jobs are running (synth.limits.max_running_jobs); "
                              "retry when one ends", self.cfg.synth.limits.retry_after_s)

    def _start(self, job_id: str, relative: str, out: Path, spec: bulk.JobSpec) -> None:
        """Under the jobs lock: admit the job, claim `out` for it, then leave it running (or done)."""
        known = self.store.out_of(job_id)
        if known is not None and known != relative:
            raise RequestError("out", f"job {job_id!r} writes to {known!r}: a job id names one output for life; "
                               f"use a new job_id for {relative!r}", status=409)
        self.store.check_overlap(job_id, out)
        if self._runner(job_id) is None and not _finished(out):
            self._admit_runner()  # before the claim: a refused job leaves no folder holding its `out`
        try:
            bulk.prepare_job(out, spec)
        except artifacts.OutputConflict:
            raise _conflict(job_id, relative, out) from None
        if self._runner(job_id) is not None and bulk.job_status(out)["state"] != "running":
            self._await_exit(job_id)
        if self._runner(job_id) is not None:
            jobs.clear_cancel(out)  # a re-POST withdraws a cancel the runner has not acted on
        elif bulk.job_status(out)["state"] != "done":
            self._admit_runner()  # again: a runner that was leaving has now left
            jobs.clear_cancel(out)
            bulk.set_state(out, "running")
            BulkJobRunner.options(name=job_id, namespace=self.runners, lifetime="detached", get_if_exists=True).remote(
                str(self.store.root), str(out), self.cfg.synth.app_name, self.cfg.synth.job_max_retries
            )
        if known is None:
            self.store.record(job_id, relative)
