"""Where the service's bulk jobs live: one root, fixed when the service starts.

    <root>/<out>/                 a job's synthetic set (the `bulk` layout, with progress.json)
    <root>/<out>/cancel.json      a cancel asked for and not yet acted on by the job's runner
    <root>/.jobs/<job_id>.json    the job's index record {"out": ...}: one id, one folder for life
    <root>/.jobs/.lock            serialises starting, cancelling and stopping jobs (flock: threads,
                                  processes, ingress replicas on one node)

A request's `out` is a name or a relative path; it is resolved (symlinks too) and must stay
inside the root, neither inside nor around another job's folder. Every later write into it
re-checks that it is still the real folder it was (`check_folder`): a folder swapped for a link
after acceptance stops the job instead of sending its writes elsewhere. A request's `corpus`
must lie under `synth.corpus_root` (`resolve_corpus`). Pure python: no Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Iterator

from dermaflux.core import artifacts
from dermaflux.synth.requests import RequestError, printable

INDEX_DIR = ".jobs"
CANCEL_FILE = "cancel.json"
MAX_OUT_CHARS = 512
MAX_NAME_BYTES = 255  # NAME_MAX of Linux and macOS file systems: longer gets ENAMETOOLONG
MAX_PATH_BYTES = 4000  # below PATH_MAX (4096), with room for the job's own files
WRITTEN_SUBFOLDERS = ("shards", artifacts.MARKER_DIR)  # where `bulk` writes inside a job folder


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
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise RequestError("out", f"the folder's path would exceed {MAX_PATH_BYTES} bytes; give a shorter out")
        for folder in [path, *path.parents]:
            if folder == self.root:
                break
            if folder.exists() and not folder.is_dir():
                name = folder.relative_to(self.root).as_posix()
                raise RequestError("out", f"{name!r} is an existing file, not a folder", status=409)
        return relative, path

    def folder(self, relative: str) -> Path:
        """The job folder of an accepted `out`, checked to be the real folder it was (`check_folder`)."""
        out = self.root / relative
        self.check_folder(out)
        return out

    def check_folder(self, out: Path) -> None:
        """RequestError (409) unless `out` and every folder between it and the root, and the folders
        `bulk` writes into, are real folders: none swapped for a link (or a file) since acceptance."""
        relative = out.relative_to(self.root)
        folder, chain = self.root, []
        for part in relative.parts:
            folder = folder / part
            chain.append(folder)
        chain += [out / name for name in WRITTEN_SUBFOLDERS]
        for i, folder in enumerate(chain):
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                if i >= len(relative.parts):  # a subfolder not written yet
                    continue
                raise RequestError("out", f"{relative.as_posix()!r} was moved or removed; the job cannot be "
                                   "written", status=409) from None
            if not stat.S_ISDIR(mode):  # lstat: a symlink is not a folder here
                raise RequestError("out", f"{folder.relative_to(self.root).as_posix()!r} was replaced by a link or "
                                   "a file: the job writes nothing through it", status=409)

    def check_overlap(self, job_id: str, out: Path) -> None:
        """RequestError (409) when `out` lies inside another job's folder or contains one: a job's
        files (job.json, shards) inside another's would break it."""
        for folder in out.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            if (folder / artifacts.OWNER_FILE).exists():
                raise RequestError("out", f"{_name(out, self.root)!r} is inside the folder of job "
                                   f"{self._owner(folder)!r}; choose an out outside it", status=409)
        for index in sorted((self.root / INDEX_DIR).glob("*.json")):
            record = artifacts.read_json(index)
            other = (self.root / record["out"]).resolve()
            if record["job_id"] != job_id and other != out and other.is_relative_to(out):
                raise RequestError("out", f"{_name(out, self.root)!r} contains the folder of job "
                                   f"{record['job_id']!r}; choose another out", status=409)

    def _owner(self, folder: Path) -> str:
        spec = folder / "job.json"
        return artifacts.read_json(spec).get("job_id", "?") if spec.exists() else folder.relative_to(self.root).as_posix()

    def _index(self, job_id: str) -> Path:
        return self.root / INDEX_DIR / f"{job_id}.json"

    def out_of(self, job_id: str) -> str | None:
        """The `out` job `job_id` was first started with; None for an unknown job."""
        index = self._index(job_id)
        return artifacts.read_json(index)["out"] if index.exists() else None

    def record(self, job_id: str, relative: str) -> None:
        artifacts.atomic_write_json(self._index(job_id), {"job_id": job_id, "out": relative})


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def resolve_corpus(corpus_root: str | None, corpus: str) -> str:
    """A request's `corpus` as a folder under `corpus_root` (a name, a relative or an absolute path
    inside it), or RequestError naming `corpus`: the service reads no other folder a caller names."""
    if corpus_root is None:
        raise RequestError("corpus", "this service reads no corpus named in a request (synth.corpus_root is not set); "
                           "give class_targets instead")
    if "\0" in corpus or not corpus:
        raise RequestError("corpus", "expected a folder name or path")
    root = Path(corpus_root).expanduser().resolve()
    path = (root / corpus).resolve()
    if not path.is_relative_to(root):
        raise RequestError("corpus", f"{printable(corpus)!r} is outside the corpus root (synth.corpus_root); give "
                           "a corpus folder inside it")
    return str(path)


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
    longest = max(path.parts, key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > MAX_NAME_BYTES:
        raise RequestError("out", f"a folder name in out has {len(os.fsencode(longest))} bytes; at most "
                           f"{MAX_NAME_BYTES} (the file system's limit)")
    return path.as_posix()


def cancel_requested(out: Path) -> bool:
    return (out / CANCEL_FILE).exists()


def request_cancel(out: Path) -> None:
    artifacts.atomic_write_json(out / CANCEL_FILE, {"cancel": True})


def clear_cancel(out: Path) -> None:
    (out / CANCEL_FILE).unlink(missing_ok=True)
