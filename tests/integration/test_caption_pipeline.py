"""`dermaflux caption` on real Ray Data: every image captioned or accounted for, resume, the llm actor pool."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dermaflux.core import artifacts
from dermaflux.caption.schema import CAPTION_SCHEMA
from dermaflux.lesion.captions import caption_from_attributes
from dermaflux.caption.writers import caption_seed
from dermaflux.cli import main as cli_main
from dermaflux.config import load_config
from dermaflux.testing.ham10000 import corpus_rows, write_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(ham10000_dir, tmp_path_factory):
    rows = corpus_rows(ham10000_dir, per_label=2)  # 14 images, all 7 HAM labels
    rows[3]["image"] = b"\xff\xd8 truncated jpeg"
    return write_corpus(rows, tmp_path_factory.mktemp("caption") / "corpus", shards=3), rows


def read_output(out):
    return pq.read_table(out / "shards").to_pylist() if (out / "shards").exists() else []


def test_template_run_captions_every_image_and_resumes(corpus, tmp_path, ray_local, dermaflux_cache, monkeypatch):
    corpus_dir, rows = corpus
    out = tmp_path / "captions"
    cfg = load_config("tiny", extra={"caption": {"corpus": str(corpus_dir), "out": str(out), "batch_size": 4}})
    from dermaflux.caption import stage

    # The driver dies right after the first finished shard: that shard is kept, the rest redone.
    write_shard = stage.write_shard_output

    def write_then_crash(*args):
        write_shard(*args)
        raise RuntimeError("driver killed")

    monkeypatch.setattr(stage, "write_shard_output", write_then_crash)
    with pytest.raises(RuntimeError, match="driver killed"):
        stage.run(cfg)
    monkeypatch.undo()
    assert len(artifacts.done_names(out)) == 1 and not (out / "manifest.json").exists()
    run = stage.run
    first = run(cfg)
    assert first["resumed"] and first["processed_shards"] == 2 and first["rows"] == len(rows) == 14
    assert first["captioned"] == 13 and first["uncaptioned"] == 1
    written = read_output(out)
    captions = {r["id"]: r for r in written}
    assert len(written) == len(captions) == 13  # the kept shard was not captioned twice
    assert pq.read_schema(next((out / "shards").glob("*.parquet"))) == CAPTION_SCHEMA
    uncaptioned = [json.loads(line) for line in (out / "uncaptioned.jsonl").read_text().splitlines()]
    assert [u["id"] for u in uncaptioned] == [rows[3]["id"]] and "unreadable image" in uncaptioned[0]["reason"]
    assert set(captions) | {rows[3]["id"]} == {r["id"] for r in rows}
    for row in rows:
        if row["id"] in captions:
            got = captions[row["id"]]
            attrs = json.loads(got["attributes_json"])
            assert got["label"] == row["label"] == attrs["diagnosis"] and got["image"] == row["image"]
            assert got["caption_writer"] == "template" and got["caption"]
    manifest = artifacts.read_json(out / "manifest.json")
    assert manifest["captioned"] == 13 and set(manifest["per_label"]) == {r["label"] for r in rows}
    tone = manifest["skin_tone"]  # ITA measured on every real image, its distribution in the manifest
    tones = [json.loads(r["attributes_json"]).get("skin_tone") for r in written]
    assert tone["measured"] == sum(t is not None for t in tones) >= 10  # a few images show too little skin
    assert sum(tone["categories"].values()) == tone["measured"] and set(tones) - {None} <= set(tone["categories"])
    assert (out / "config.yaml").exists()

    # Kept and redone shards alike: the caption is the template's for the row's stable seed.
    for image_id, got in captions.items():
        expected = caption_from_attributes(json.loads(got["attributes_json"]), caption_seed(image_id, 0))
        assert got["caption"] == expected
    assert run(cfg)["processed_shards"] == 0

    # The same folder cannot take a different run.
    other = load_config("tiny", extra={"caption": {"corpus": str(corpus_dir), "out": str(out), "seed": 7}})
    with pytest.raises(artifacts.OutputConflict):
        run(other)


def test_cli_llm_writer_on_an_actor_pool(corpus, tmp_path, ray_local, dermaflux_cache, capsys):
    corpus_dir, rows = corpus
    out = tmp_path / "llm"
    code = cli_main([
        "caption", "--corpus", str(corpus_dir), "--out", str(out), "--writer", "llm", "--model", "builtin:tiny-llama",
        "--concurrency", "2", "--set", "caption.max_new_tokens=8", "--set", "caption.batch_size=4",
    ])
    assert code == 0
    assert '"captioned": 13' in capsys.readouterr().out
    summary = artifacts.read_json(out / "manifest.json")
    assert summary["captioned"] == 13 and summary["uncaptioned"] == 1 and summary["model"] == "builtin:tiny-llama"
    written = read_output(out)
    assert {r["caption_writer"] for r in written} <= {"llm", "template"}
    for r in written:
        if r["caption_writer"] == "llm":
            assert r["caption"].startswith("This photo depicts a")
        else:  # a template caption in an llm run is a flagged fallback
            assert any(f.startswith("llm_fallback:") for f in r["caption_flags"])
    assert sum(r["caption_writer"] == "llm" for r in written) >= 10


def test_cli_reports_a_missing_corpus(tmp_path, capsys):
    code = cli_main(["caption", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "caption.corpus" in err and "nope does not exist" in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_run_that_captions_nothing_exits_2_and_lists_why(ham10000_dir, tmp_path, ray_local, dermaflux_cache, capsys):
    rows = corpus_rows(ham10000_dir, per_label=1)[:3]
    for row in rows:
        row["image"] = b"\xff\xd8 truncated jpeg"
    corpus_dir = write_corpus(rows, tmp_path / "corpus", shards=1)
    out = tmp_path / "captions"
    code = cli_main(["caption", "--corpus", str(corpus_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "none of 3 corpus images was captioned" in err and "uncaptioned.jsonl" in err
    listed = [json.loads(line) for line in (out / "uncaptioned.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in listed) == sorted(r["id"] for r in rows)
