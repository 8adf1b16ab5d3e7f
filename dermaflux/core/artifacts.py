"""Atomic writes, manifests and resume markers: the one place stages touch their output folders.

A stage never leaves half a file: everything is written to a temp name beside the target and
renamed into place. A folder remembers which run owns it (a fingerprint of the inputs and the
config), so re-running resumes the same run and refuses to mix two different ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

OWNER_FILE = ".dermaflux-run.json"
MARKER_DIR = ".done"


class OutputConflict(RuntimeError):
    """The output folder belongs to a different run."""


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a filename (pyarrow, PIL, torch.save); rename on success."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder; it replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config dicts, input paths, file sizes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def claim_output(out_dir: str | os.PathLike, stage: str, run_fingerprint: str, *, force: bool = False) -> bool:
    """Own `out_dir` for this run. Returns True when resuming the same run, False when fresh.

    Raises OutputConflict when the folder holds a different run of this stage (unless `force`,
    which wipes it) or any other non-empty content DermaFlux did not write.
    """
    out = Path(out_dir)
    owner_path = out / OWNER_FILE
    if owner_path.exists():
        owner = read_json(owner_path)
        if owner.get("stage") == stage and owner.get("fingerprint") == run_fingerprint:
            return True
        if not force:
            raise OutputConflict(
                f"{out} holds a different {owner.get('stage')!r} run (fingerprint {owner.get('fingerprint')}, "
                f"this run {run_fingerprint}): choose another --out, or pass --force to replace it"
            )
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not force:
            raise OutputConflict(f"{out} is not empty and was not written by dermaflux {stage}: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(owner_path, {"stage": stage, "fingerprint": run_fingerprint, "created": time.time()})
    return False


def claim_run(cfg, out_dir: str | os.PathLike, stage: str, run_fingerprint: str, *, force: bool = False) -> bool:
    """Every stage's start: own `out_dir` (see claim_output) and write the effective config beside it."""
    from dermaflux.core.config import save_effective_config
    from dermaflux.core.progress import open_run_log

    resumed = claim_output(out_dir, stage, run_fingerprint, force=force)
    save_effective_config(cfg, out_dir)
    open_run_log(out_dir, stage)  # a CLI run's log goes in the first folder it owns (no-op outside the CLI)
    return resumed


def marker_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / MARKER_DIR / f"{name}.json"


def is_done(out_dir: str | os.PathLike, name: str) -> bool:
    return marker_path(out_dir, name).exists()


def mark_done(out_dir: str | os.PathLike, name: str, info: dict | None = None) -> None:
    atomic_write_json(marker_path(out_dir, name), {"done": time.time(), **(info or {})})


def done_names(out_dir: str | os.PathLike) -> set[str]:
    folder = Path(out_dir) / MARKER_DIR
    return {p.stem for p in folder.glob("*.json")} if folder.exists() else set()


def parquet_shards(folder: str | os.PathLike, required: list[str], what: str, made_by: str) -> list[Path]:
    """`<folder>/shards/*.parquet`, each checked for the `required` columns, with errors that say
    which folder or shard is wrong and which stage writes it (`made_by`)."""
    import pyarrow.parquet as pq

    shards = sorted((Path(folder) / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{Path(folder) / 'shards'}: no *.parquet {what} shards; run `{made_by}` first")
    for shard in shards:
        missing = [c for c in required if c not in set(pq.read_schema(shard).names)]
        if missing:
            raise ValueError(f"{shard}: {what} shard lacks column(s) {missing}")
    return shards
