"""`dermaflux curate` end to end on real Ray: every reader, broken inputs, resume, the full HAM10000."""

import csv
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dermaflux.core.artifacts import OutputConflict
from dermaflux.cli import main
from dermaflux.config import load_config
from dermaflux.corpus import stage
from dermaflux.corpus.schema import CORPUS_SCHEMA
from dermaflux.testing.sources import build_dermamnist, build_generic_csv, build_ham_subset, build_isic, build_pad_ufes

pytestmark = pytest.mark.integration


def read_corpus(out: Path):
    files = sorted((out / "shards").glob("*.parquet"))
    assert files, f"no shards in {out}"
    tables = [pq.read_table(f) for f in files]
    for table in tables:
        assert table.schema.remove_metadata().equals(CORPUS_SCHEMA)
    rows = [row for t in tables for row in t.drop(["image"]).to_pylist()]
    return rows, tables


def check_manifest_matches_shards(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    rows, _ = read_corpus(out)
    rec = manifest["reconciliation"]
    assert rec["balanced"] and rec["input_rows"] == rec["kept"] + rec["duplicates"] + rec["test_overlap"] + rec["quarantined"]
    assert rec["kept"] == rec["shard_rows"] == len(rows) == len({r["id"] for r in rows})
    assert manifest["by_split"] == {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert manifest["by_label"] == dict(Counter(r["label"] for r in rows if r["label"] is not None))
    assert manifest["no_diagnosis"]["rows"] == sum(r["label"] is None for r in rows)
    assert all(r["melanoma"] == (r["label"] == "mel") for r in rows if r["label"] is not None)
    with open(out / "quarantine.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == rec["quarantined"]
    with open(out / "duplicates.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == rec["duplicates"]
    with open(out / "test_overlap.csv", newline="") as fh:
        overlap = list(csv.DictReader(fh))
    assert len(overlap) == manifest["test_overlap"]["pairs"]
    assert len({r["test_id"] for r in overlap if r["action"] == "dropped"}) == rec["test_overlap"]
    return manifest


@pytest.fixture(scope="module")
def built(ham10000_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate-sources")
    ham = build_ham_subset(ham10000_dir, root / "ham", per_label=10)
    dup = ham["rows"][3]["image_id"]
    return {
        "ham": ham, "dup": dup,
        "dermamnist": build_dermamnist(ham10000_dir, root / "dm" / "dermamnist_64.npz", duplicate_of=dup),
        "isic": build_isic(ham10000_dir, root / "isic", duplicate_of=dup),
        "pad": build_pad_ufes(ham10000_dir, root / "pad"),
        "csv": build_generic_csv(ham10000_dir, root / "clinic"),
    }


def source_args(b) -> list[str]:
    specs = [f"ham10000={b['ham']['root']}", f"dermamnist={b['dermamnist']['path']}",
             f"isic={b['isic']['root']},split=train", f"pad-ufes-20={b['pad']['root']}", b["csv"]["spec"]]
    return [arg for spec in specs for arg in ("--source", spec)]


def test_cli_curates_every_reader_with_broken_inputs(ray_local, built, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["curate", *source_args(built), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["resumed"] is False
    manifest = check_manifest_matches_shards(out)
    expected_inputs = sum(built[k]["input_rows"] for k in ("ham", "dermamnist", "isic", "pad", "csv"))
    assert manifest["reconciliation"]["input_rows"] == expected_inputs
    assert set(manifest["per_source"]) == {"ham10000", "dermamnist", "isic", "pad-ufes-20", "clinic"}

    with open(out / "quarantine.csv", newline="") as fh:
        quarantine = {(r["source"], r["original_id"]): r for r in csv.DictReader(fh)}
    for image_id, why in built["ham"]["broken"].items():
        row = quarantine[("ham10000", image_id)]
        assert why in row["reason"] and row["file"].endswith("HAM10000_metadata.csv") and int(row["row"]) > 1
    assert "unknown label UNK" in quarantine[("isic", built["isic"]["unknown_id"])]["reason"]
    assert manifest["quarantine"]["by_reason"]["unknown_label"] == 3

    rows, _ = read_corpus(out)
    by_id = {r["id"]: r for r in rows}
    # The HAM image reappearing in DermaMNIST's test split and twice in ISIC is kept once.
    with open(out / "duplicates.csv", newline="") as fh:
        dups = list(csv.DictReader(fh))
    kept_copy = f"dermamnist:{built['dermamnist']['duplicate_id']}"
    assert kept_copy in by_id and by_id[kept_copy]["split"] == "test"
    assert {d["dropped_id"] for d in dups if d["kept_id"] == kept_copy} == {
        f"ham10000:{built['dup']}", "isic:ISIC_8000001", "isic:ISIC_8000002"}
    assert manifest["duplicates"]["cross_source"] >= 2
    assert not ({d["dropped_id"] for d in dups} & set(by_id))
    # Two images of one lesion, and one patient's lesions, land in one split.
    pad_splits = {by_id[f"pad-ufes-20:{i}"]["split"] for i in built["pad"]["same_patient"]}
    assert len(pad_splits) == 1
    assert manifest["split_audit"]["written_splits"]["groups_across_splits"] == 0
    # Published splits kept as published, and counted.
    dm = [r for r in rows if r["source"] == "dermamnist"]
    assert all(r["split"] == r["original_id"].split("_")[0] and r["split_origin"] == "official" for r in dm)
    counts = built["dermamnist"]["counts"]
    assert manifest["published_splits"]["dermamnist"] == {
        "train": {"published": counts["train"], "kept": counts["train"] - 1},  # the label-9 row is quarantined
        "val": {"published": counts["val"], "kept": counts["val"]},
        "test": {"published": counts["test"], "kept": counts["test"]},  # incl. the HAM copy, kept over the others
    }
    assert all(r["split"] == "train" for r in rows if r["source"] == "isic")
    assert (out / "config.yaml").exists()


def test_rerun_resumes_a_different_run_is_refused_and_force_replaces(ray_local, built, tmp_path, caplog):
    out = tmp_path / "corpus"
    args = [f"ham10000={built['ham']['root']}", built["csv"]["spec"]]
    cfg = load_config("tiny", extra={"curate": {"sources": args, "out": str(out)}})
    first = stage.run(cfg)
    shards = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    again = stage.run(cfg)
    assert again["resumed"] and again["kept"] == first["kept"]
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == shards  # nothing rewritten
    # Stopped after the scan, before the shards: the re-run reuses the scan and writes the shards.
    shutil.rmtree(out / "shards")
    (out / ".done" / "shards.json").unlink()
    with caplog.at_level(logging.INFO, logger="dermaflux.corpus.stage"):
        resumed = stage.run(cfg)
    assert "scan: resuming" in caplog.text and resumed["kept"] == first["kept"]
    check_manifest_matches_shards(out)
    other = load_config("tiny", extra={"curate": {"sources": args, "out": str(out), "seed": 7}})
    with pytest.raises(OutputConflict, match="--force"):
        stage.run(other)
    forced = stage.run(load_config("tiny", extra={"curate": {"sources": args, "out": str(out), "seed": 7, "force": True}}))
    assert not forced["resumed"] and json.loads((out / "manifest.json").read_text())["config"]["seed"] == 7
    check_manifest_matches_shards(out)


def test_missing_column_fails_before_any_work(ray_local, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "HAM10000_metadata.csv").write_text("lesion_id,image_id,age\nHAM_1,ISIC_1,40\n")
    code = main(["curate", "--source", f"ham10000={tmp_path / 'src'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "'dx'" in err and "HAM10000_metadata.csv" in err
    assert not (tmp_path / "out").exists()


def test_full_ham10000(ray_local, ham10000_dir, tmp_path):
    """All 5,984 images: one row each, lesions grouped, splits stratified by diagnosis."""
    out = tmp_path / "ham-full"
    summary = stage.run(load_config("tiny", extra={"curate": {"sources": [f"ham10000={ham10000_dir}"], "out": str(out)}}))
    manifest = check_manifest_matches_shards(out)
    assert summary["input_rows"] == 5984 and summary["quarantined"] == 0
    # README: nv 4,323 · bkl 583 · mel 491 · bcc 264 · akiec 183 · vasc 80 · df 60 (before dedup).
    readme = {"nv": 4323, "bkl": 583, "mel": 491, "bcc": 264, "akiec": 183, "vasc": 80, "df": 60}
    dropped = Counter()
    with open(out / "duplicates.csv", newline="") as fh:
        dropped.update(r["dropped_label"] for r in csv.DictReader(fh))
    assert {k: manifest["by_label"].get(k, 0) + dropped[k] for k in readme} == readme
    per_split = manifest["by_split_label"]
    for label, total in manifest["by_label"].items():
        assert abs(per_split["test"].get(label, 0) - 0.1 * total) <= max(2, 0.02 * total), label
    rows, _ = read_corpus(out)
    lesion_splits: dict = {}
    for r in rows:
        lesion_splits.setdefault(r["lesion_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in lesion_splits.values())
    assert manifest["by_malignancy"]["malignant"] == sum(manifest["by_label"].get(k, 0) for k in ("mel", "bcc", "akiec"))
