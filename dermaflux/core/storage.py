"""Stage inputs and outputs at cloud URIs: staged through a local folder, copied with pyarrow.fs.

Stages write local folders through dermaflux.core.artifacts (atomic renames need a POSIX filesystem).
A job whose config names a URI (s3://, gs://, any scheme pyarrow or an installed fsspec
implementation knows) gets the remote input copied down first, writes its output to a local
staging folder (seeded from the remote copy, so a re-run resumes) and copies it up on success.
`file://` URIs and plain paths are used in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from dermaflux.core.config import ConfigModel

log = logging.getLogger(__name__)


def scheme_of(path: str) -> str:
    parsed = urlparse(str(path))
    # A Windows drive letter or a plain relative path has no real scheme.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_remote(path: str | None) -> bool:
    return path is not None and scheme_of(path) not in ("", "file")


def local_path(path: str) -> str:
    """`file:///a/b` -> `/a/b`; plain paths unchanged."""
    if scheme_of(path) == "file":
        parsed = urlparse(path)
        return parsed.path if not parsed.netloc else f"//{parsed.netloc}{parsed.path}"
    return str(path)


def filesystem_for(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI: pyarrow's own (s3, gs, hdfs), else fsspec's."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError, OSError):  # ArrowInvalid / ArrowNotImplementedError: unknown scheme
        pass
    try:
        import fsspec
    except ImportError as err:
        raise ValueError(f"{uri}: pyarrow does not know scheme {scheme_of(uri)!r} and fsspec is not installed") from err
    try:
        fs, inner = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"{uri}: no filesystem for scheme {scheme_of(uri)!r} (install its fsspec package, e.g. s3fs or gcsfs): {err}"
        ) from err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def remote_exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(uri)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def download(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a remote folder (or file) to `local_dir`."""
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(uri)
    info = fs.get_file_info(inner)
    local = Path(local_dir)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    local.parent.mkdir(parents=True, exist_ok=True)
    if info.type == pafs.FileType.File:
        local.mkdir(parents=True, exist_ok=True)
        target = local / Path(inner).name
        pafs.copy_files(inner, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def upload(local_dir: str | os.PathLike, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, inner = filesystem_for(uri)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local_dir), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _staging_root() -> Path:
    root = Path(os.environ.get("DERMAFLUX_STAGING") or tempfile.gettempdir()) / "dermaflux-staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def staged_section(section: ConfigModel, inputs: tuple[str, ...], output: str = "out") -> Iterator[dict]:
    """Point a stage's config section at local copies of its remote paths for the block.

    Yields {field: original value} of what was rewritten; on success a remote output is copied up.
    `file://` values are rewritten to plain paths. The section is restored afterwards.
    """
    original: dict = {}
    staging = Path(tempfile.mkdtemp(prefix="job-", dir=_staging_root()))

    def localise(field: str, value: str, index: int | None = None) -> str:
        if not is_remote(value):
            return local_path(value)
        name = field if index is None else f"{field}-{index}"
        log.info("copying %s to %s", value, staging / name)
        return str(download(value, staging / name))

    try:
        for field in inputs:
            value = getattr(section, field)
            if value is None:
                continue
            original[field] = value
            if isinstance(value, list):
                setattr(section, field, [localise(field, v, i) for i, v in enumerate(value)])
            else:
                setattr(section, field, localise(field, value))
        out_value = getattr(section, output) if output else None  # `serve` writes no output folder
        remote_out = out_value if is_remote(out_value) else None
        if out_value is not None:
            original[output] = out_value
            if remote_out:
                local_out = staging / "out"
                if remote_exists(remote_out):  # resume a run that was copied up before
                    download(remote_out, local_out)
                setattr(section, output, str(local_out))
            else:
                setattr(section, output, local_path(out_value))
        yield original
        if remote_out:
            log.info("copying %s to %s", getattr(section, output), remote_out)
            upload(getattr(section, output), remote_out)
    finally:
        for field, value in original.items():
            setattr(section, field, value)
        shutil.rmtree(staging, ignore_errors=True)
