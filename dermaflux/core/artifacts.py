"""Atomic writes, manifests and resume markers: the one place stages touch their output folders.

A stage never leaves half a file: everything is written to a temp name beside the target and
renamed into place. A folder remembers which run owns it (a fingerprint of the inputs and the
config), so re-running resumes the same run and refuses to mix two different ones. Nothing here
deletes a folder without that run marker, or one that is, holds or lies inside the run's input.
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
from typing import TYPE_CHECKING, Any, Iterator

from dermaflux.core.config import dump_config

if TYPE_CHECKING:
    from pydantic import BaseModel

OWNER_FILE = ".dermaflux-run.json"
MARKER_DIR = ".done"


class OutputConflict(RuntimeError):
    """The output folder belongs to a different run."""


class NothingKept(ValueError):
    """A stage ran and kept nothing: every input was rejected (the message says why)."""


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
    """Yield a staging folder; it replaces `path` only when the block finishes without error.

    Replacing deletes what is at `path`: callers pass only folders DermaFlux owns (a step folder
    inside a claimed run folder, a Ray checkpoint, the DermaFlux cache), never a user's path.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputConflict(f"{path} is a link or a file, not a folder DermaFlux wrote: not replacing it")
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
    """A JSON file; a run marker or done marker (always an object) that holds anything else is a ValueError."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    # Markers are read with .get(...) by every stage: a list here would surface as an AttributeError.
    if (path.name == OWNER_FILE or path.parent.name == MARKER_DIR) and not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (config dicts, input paths, file sizes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _overlap(out: Path, inputs) -> str | None:
    """How `out` is, contains or lies inside one of `inputs` (symlinks resolved), or None."""
    target = out.expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source:
            how = "is"
        elif target in source.parents:
            how = "contains"
        elif source in target.parents:
            how = "lies inside"
        else:
            continue
        resolved = "" if (str(out), str(given)) == (str(target), str(source)) else f" (resolved: {target}, {source})"
        return f"{out} {how} the input {given}{resolved}"
    return None


def claim_output(out_dir: str | os.PathLike, stage: str, run_fingerprint: str, *, force: bool = False,
                 inputs=()) -> bool:
    """Own `out_dir` for this run. Returns True when resuming the same run, False when fresh.

    Raises OutputConflict when the folder is, contains or lies inside one of the run's `inputs`,
    holds a different run (unless `force`, which replaces a run of the same stage), or holds
    anything without a DermaFlux run marker: `force` never deletes what DermaFlux did not write.
    """
    out = Path(out_dir)
    overlap = _overlap(out, inputs)
    if overlap:
        raise OutputConflict(f"{overlap}: a {stage} run never writes into, or replaces, its own input; "
                             "choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputConflict(f"{out} is a file, not a folder: choose another --out")
    owner_path = out / OWNER_FILE
    if owner_path.exists():
        try:
            owner = read_json(owner_path)
        except (ValueError, OSError) as err:  # not ours to judge, so never replaced, not even when forced
            reason = str(err).removeprefix(f"{owner_path}: ")
            raise OutputConflict(f"{owner_path}: not a DermaFlux run marker ({reason}); choose another --out") from None
        if owner.get("stage") == stage and owner.get("fingerprint") == run_fingerprint:
            return True
        found = (f"{out} holds a different {owner.get('stage')!r} run (fingerprint {owner.get('fingerprint')}, "
                 f"this run {run_fingerprint})")
        if not force:
            raise OutputConflict(f"{found}: choose another --out, or pass --force to replace it")
        if owner.get("stage") != stage:  # --force replaces a run of this stage, not a whole pipeline folder
            raise OutputConflict(f"{found}: --force replaces only a {stage} run; choose another --out")
        if out.is_symlink():  # rmtree refuses a link; replacing its target would delete beyond --out
            raise OutputConflict(f"{found}: {out} is a link to {out.resolve()}: --force never replaces a run through a "
                                 "link; pass the folder itself or choose another --out")
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise OutputConflict(f"{out} is not empty and was not written by dermaflux (no {OWNER_FILE}): DermaFlux "
                             "never deletes such a folder (not even when forced); choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(owner_path, {"stage": stage, "fingerprint": run_fingerprint, "created": time.time()})
    return False


def save_effective_config(cfg: BaseModel, out_dir: str | os.PathLike) -> Path:
    """Each run writes the config it actually used beside its outputs."""
    return atomic_write_text(Path(out_dir) / "config.yaml", dump_config(cfg))


def claim_run(cfg: BaseModel, out_dir: str | os.PathLike, stage: str, run_fingerprint: str, *, force: bool = False,
              inputs=()) -> bool:
    """Every stage's start: own `out_dir` (see claim_output) and write the effective config beside it."""
    from dermaflux.core.progress import open_run_log

    resumed = claim_output(out_dir, stage, run_fingerprint, force=force, inputs=inputs)
    save_effective_config(cfg, out_dir)
    open_run_log(out_dir, stage)  # a CLI run's log goes in the first folder it owns (no-op outside the CLI)
    return resumed


def marker_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / MARKER_DIR / f"{name}.json"


def is_done(out_dir: str | os.PathLike, name: str) -> bool:
    return marker_path(out_dir, name).exists()


def mark_done(out_dir: str | os.PathLike, name: str, info: dict | None = None) -> None:
    atomic_write_json(marker_path(out_dir, name), {"done": time.time(), **(info or {})})


def clear_done(out_dir: str | os.PathLike, name: str) -> None:
    """Forget a finished step (its inputs changed): the next run redoes it."""
    marker_path(out_dir, name).unlink(missing_ok=True)


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
