"""Where the service's bulk jobs live: one root, fixed when the service starts.

    <root>/<out>/                 a job's synthetic set (the `bulk` layout, with progress.json)
    <root>/<out>/cancel.json      a cancel asked for and not yet acted on by the job's runner
    <root>/.jobs/<job_id>.json    the job's index record {"out": ...}: one id, one folder for life
    <root>/.jobs/.lock            serialises starting, cancelling and stopping jobs (flock: threads,
                                  processes, ingress replicas on one node)

A request's `out` is a name or a relative path; it is resolved (symlinks too) and must stay
inside the root. Pure python: no Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path, PurePosixPath
from typing import Iterator

from dermaflux.core import artifacts
from dermaflux.synth.requests import RequestError

INDEX_DIR = ".jobs"
CANCEL_FILE = "cancel.json"
MAX_OUT_CHARS = 512


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        (self.root / INDEX_DIR).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        # One open file description per call: flock then excludes threads of one process too.
        with open(self.root / INDEX_DIR / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def resolve_out(self, out: str | None, job_id: str) -> tuple[str, Path]:
        """(`out` as given, normalised; its folder), or RequestError naming `out`."""
        relative = _relative_out(job_id if out is None else out)
        path = (self.root / relative).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            raise RequestError("out", f"{relative!r} resolves outside the jobs root (through a symlink)")
        for folder in [path, *path.parents]:
            if folder == self.root:
                break
            if folder.exists() and not folder.is_dir():
                name = folder.relative_to(self.root).as_posix()
                raise RequestError("out", f"{name!r} is an existing file, not a folder", status=409)
        return relative, path

    def folder(self, relative: str) -> Path:
        return self.root / relative

    def _index(self, job_id: str) -> Path:
        return self.root / INDEX_DIR / f"{job_id}.json"

    def out_of(self, job_id: str) -> str | None:
        """The `out` job `job_id` was first started with; None for an unknown job."""
        index = self._index(job_id)
        return artifacts.read_json(index)["out"] if index.exists() else None

    def record(self, job_id: str, relative: str) -> None:
        artifacts.atomic_write_json(self._index(job_id), {"job_id": job_id, "out": relative})


def _relative_out(out: str) -> str:
    """A plain relative path: no absolute path, no `..`, no hidden names (the index lives in one)."""
    if not out or len(out) > MAX_OUT_CHARS or "\0" in out:
        raise RequestError("out", f"expected a folder name or relative path of 1 to {MAX_OUT_CHARS} characters")
    path = PurePosixPath(out)
    if path.is_absolute():
        raise RequestError("out", f"{out!r} is an absolute path; give a name or a relative path inside the jobs root")
    if ".." in path.parts:
        raise RequestError("out", f"{out!r} contains '..'; give a name or a relative path inside the jobs root")
    if not path.parts or any(part.startswith(".") for part in path.parts):
        raise RequestError("out", f"{out!r}: names starting with '.' are reserved; give a plain folder name")
    return path.as_posix()


def cancel_requested(out: Path) -> bool:
    return (out / CANCEL_FILE).exists()


def request_cancel(out: Path) -> None:
    artifacts.atomic_write_json(out / CANCEL_FILE, {"cancel": True})


def clear_cancel(out: Path) -> None:
    (out / CANCEL_FILE).unlink(missing_ok=True)
