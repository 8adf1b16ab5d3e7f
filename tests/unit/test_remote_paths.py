"""Stage folders at URIs: staged locally and copied with pyarrow.fs (fsspec's memory:// here)."""

from __future__ import annotations

import fsspec
import pytest

from dermaflux.config import load_config
from dermaflux.core.storage import download, is_remote, local_path, staged_section, upload


def test_file_uris_are_local_paths():
    assert local_path("file:///data/corpus") == "/data/corpus"
    assert not is_remote("file:///data/corpus") and not is_remote("runs/demo") and is_remote("gs://b/x")


def test_upload_then_download_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "shards").mkdir(parents=True)
    (src / "shards" / "part-0.parquet").write_bytes(b"\x00parquet")
    (src / "manifest.json").write_text("{}")
    upload(src, "memory://bucket/roundtrip")
    back = download("memory://bucket/roundtrip", tmp_path / "back")
    assert (back / "shards" / "part-0.parquet").read_bytes() == b"\x00parquet"
    assert (back / "manifest.json").read_text() == "{}"


def test_staged_section_downloads_inputs_and_uploads_the_output(tmp_path):
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/corpus/manifest.json", b'{"rows": 3}')
    cfg = load_config("tiny", None, ["evaluate.corpus=memory://bucket/corpus", "evaluate.out=memory://bucket/report"])
    with staged_section(cfg.evaluate, ("corpus", "synthetic"), "out") as original:
        assert original == {"corpus": "memory://bucket/corpus", "out": "memory://bucket/report"}
        local_corpus = cfg.evaluate.corpus
        assert not is_remote(local_corpus)
        assert (tmp_path.__class__(local_corpus) / "manifest.json").read_text() == '{"rows": 3}'
        out = tmp_path.__class__(cfg.evaluate.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("# report")
    assert cfg.evaluate.out == "memory://bucket/report"  # restored
    assert memory.cat("/bucket/report/report.md") == b"# report"


def test_a_failed_stage_uploads_nothing():
    cfg = load_config("tiny", None, ["evaluate.out=memory://bucket/failed-run"])
    with pytest.raises(RuntimeError):
        with staged_section(cfg.evaluate, ("corpus",), "out"):
            raise RuntimeError("stage failed")
    assert not fsspec.filesystem("memory").exists("/bucket/failed-run/anything")
