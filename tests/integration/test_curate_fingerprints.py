"""Curate on real Ray after a labels CSV is edited in place with its size and mtime kept (issue 25,
finding 7): the edit is a different run (refused, then replaced with --force), never a resume
onto the old shards (which kept the old labels, or failed with an AssertionError)."""

import os
from pathlib import Path

import pandas as pd
import pytest

from dermaflux.cli import main
from dermaflux.testing.ham10000 import METADATA, read_metadata, write_ham_folder

pytestmark = pytest.mark.integration


def first_rows(ham_dir: Path, dest: Path, count: int) -> Path:
    """A HAM10000-layout copy of the metadata's first `count` rows; returns its CSV."""
    return write_ham_folder(ham_dir, dest, read_metadata(ham_dir)[:count]) / METADATA


def labels_written(out: Path) -> dict[str, str]:
    shards = sorted((out / "shards").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(p, columns=["original_id", "label"]) for p in shards])
    return dict(zip(frame["original_id"], frame["label"]))


def test_a_labels_csv_edited_with_size_and_mtime_kept_is_not_resumed(ray_local, ham10000_dir, tmp_path, capsys):
    labels = first_rows(ham10000_dir, tmp_path / "ham", 6)
    out = tmp_path / "corpus"
    argv = ["curate", "--source", f"ham10000={tmp_path / 'ham'}", "--out", str(out)]
    assert main(argv) == 0
    before = labels_written(out)
    assert set(before.values()) == {"bkl"}

    text, stat = labels.read_bytes(), labels.stat()
    edited = text.replace(b",bkl,", b",bcc,", 1)  # one row's diagnosis: the class counts change
    labels.write_bytes(edited)
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (labels.stat().st_size, labels.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    capsys.readouterr()
    assert main(argv) == 2
    assert f"{out} holds a different 'curate' run" in capsys.readouterr().err
    assert labels_written(out) == before

    assert main([*argv, "--force"]) == 0
    after = labels_written(out)
    changed = {k for k in before if after.get(k) != before[k]}
    assert len(changed) == 1 and after[changed.pop()] == "bcc"
