"""An external test set end to end on real Ray: a clinic's folder of images with an `image,melanoma`
(0/1) CSV curated into the test split beside a HAM10000 subset, audited against it (one of its images
is a resized copy of a HAM training-source image), and evaluated."""

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dermaflux.cli import main
from dermaflux.corpus.schema import CORPUS_SCHEMA
from dermaflux.testing.sources import build_binary_external, build_ham_subset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sources(ham10000_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    ham = build_ham_subset(ham10000_dir, root / "ham", per_label=10)
    copied = ham["rows"][12]["image_id"]
    clinic = build_binary_external(ham10000_dir, root / "clinic", per_label=2,
                                   exclude_lesions={r["lesion_id"] for r in ham["rows"]}, near_copy_of=copied)
    return {"ham": ham, "clinic": clinic, "copied": copied}


def read_rows(out: Path) -> dict[str, dict]:
    tables = [pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet"))]
    assert tables and all(t.schema.remove_metadata().equals(CORPUS_SCHEMA) for t in tables)
    return {row["id"]: row for t in tables for row in t.drop(["image"]).to_pylist()}


@pytest.fixture(scope="module")
def curated(ray_local, sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "corpus"
    args = ["curate", "--source", f"ham10000={sources['ham']['root']}", "--source", sources["clinic"]["spec"],
            "--out", str(out)]
    assert main(args) == 0
    return out


def test_the_external_source_is_all_test_rows_with_binary_labels(curated, sources):
    clinic = sources["clinic"]
    rows = read_rows(curated)
    external = {r["original_id"]: r for r in rows.values() if r["source"] == "clinic"}
    expected = {r["image"] for r in clinic["rows"]} - {clinic["bad_id"], clinic["near_copy_id"]}
    assert set(external) == expected
    assert {(r["split"], r["split_origin"]) for r in external.values()} == {("test", "spec")}
    for name, row in external.items():
        want = ("mel", True, True) if name in clinic["melanoma"] else (None, False, None)
        assert (row["label"], row["melanoma"], row["malignant"]) == want, name
    ham = [r for r in rows.values() if r["source"] == "ham10000"]
    assert {r["split"] for r in ham} == {"train", "val", "test"}
    assert all(r["melanoma"] == (r["label"] == "mel") and r["label"] is not None for r in ham)

    manifest = json.loads((curated / "manifest.json").read_text())
    rec = manifest["reconciliation"]
    assert rec["input_rows"] == rec["kept"] + rec["duplicates"] + rec["test_overlap"] + rec["quarantined"]
    assert rec["kept"] == len(rows) and rec["test_overlap"] == 1
    entry = manifest["per_source"]["clinic"]
    assert entry["test_only"] and entry["split"] == "test" and not manifest["per_source"]["ham10000"]["test_only"]
    assert entry["by_split"] == {"train": 0, "val": 0, "test": len(expected)}
    undiagnosed = sum(r["label"] is None for r in external.values())
    assert undiagnosed and entry["no_diagnosis"] == undiagnosed and entry["by_label"] == {"mel": len(expected) - undiagnosed}
    assert manifest["no_diagnosis"]["rows"] == undiagnosed and manifest["no_diagnosis"]["by_split"]["test"] == undiagnosed
    assert manifest["no_diagnosis"]["melanoma"] == {"melanoma": 0, "not_melanoma": undiagnosed, "unknown": 0}
    assert manifest["by_split_label"]["test"]["no_diagnosis"] == undiagnosed
    assert manifest["by_label"] == dict(Counter(r["label"] for r in rows.values() if r["label"]))
    with open(curated / "quarantine.csv", newline="") as fh:
        reasons = {r["original_id"]: r["reason"] for r in csv.DictReader(fh)}
    assert "unknown label melanoma='maybe'" in reasons[clinic["bad_id"]]


def test_the_copy_of_a_training_image_is_reported_and_kept_out_of_the_test_set(curated, sources):
    manifest = json.loads((curated / "manifest.json").read_text())
    overlap = manifest["test_overlap"]
    assert overlap["policy"] == "drop" and overlap["pairs"] == 1 and overlap["dropped"] == 1
    assert overlap["by_kind"] == {"near_duplicate": 1} and overlap["test_only_sources"] == ["clinic"]
    with open(curated / overlap["file"], newline="") as fh:
        pairs = list(csv.DictReader(fh))
    assert [(p["test_id"], p["train_id"], p["action"]) for p in pairs] == [
        ("clinic:ext_copy", f"ham10000:{sources['copied']}", "dropped")]
    assert pairs[0]["train_split"] == read_rows(curated)[f"ham10000:{sources['copied']}"]["split"]
    assert 0 <= int(pairs[0]["distance"]) <= manifest["config"]["phash_threshold"]
    assert manifest["split_audit"]["written_splits"]["near_duplicate_pairs_across_splits"] == 0


def test_a_binary_source_alone_curates_and_refuses_train_rows(ray_local, sources, tmp_path, capsys):
    # Before: 1,512 of 1,512 such rows were quarantined ("unknown label melanoma='0.0'") and the run exited 0.
    spec = sources["clinic"]["spec"]
    assert main(["curate", "--source", spec, "--out", str(tmp_path / "alone")]) == 0
    summary, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)  # then the headline line
    assert summary["kept"] == sources["clinic"]["input_rows"] - 1 and summary["by_split"]["test"] == summary["kept"]
    assert main(["curate", "--source", spec.replace(",split=test", ""), "--out", str(tmp_path / "no-split")]) == 2
    err = capsys.readouterr().err
    assert "positive=mel gives rows without a diagnosis" in err and "add split=test" in err


def test_evaluate_runs_on_the_corpus_with_an_external_test_set(curated, tmp_path, capsys):
    # Issue 26: under the binary task the melanoma-only set holds malignant rows alone (its other rows have
    # no malignancy): not scorable, so no metric, Δ, p-value, verdict or control line, and one note saying so.
    report = tmp_path / "report"
    # min_test_per_class 1: the internal set of this small corpus holds a single melanoma (the default, 2,
    # would leave it unscored too; the unit tests pin that rule).
    args = ["evaluate", "--corpus", str(curated), "--out", str(report), "--fractions", "0.5", "--ratios", "0",
            "--seeds", "1", "--steps", "10", "--task", "melanoma", "--task", "binary", "--controls",
            "--set", "evaluate.min_test_per_class=1"]
    assert main(args) == 0  # the report names each test set; accuracy is not the point
    summary, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)  # then the headline line
    results = json.loads((report / "results.json").read_text())
    clinic = [r for r in read_rows(curated).values() if r["source"] == "clinic"]
    melanomas = sum(r["label"] == "mel" for r in clinic)
    assert results["not_scorable"] == [{"task": "binary", "test_set": "clinic", "images": melanomas,
                                        "counts": {"benign": 0, "malignant": melanomas},
                                        "left_out": len(clinic) - melanomas, "min_per_class": 1}]
    assert summary["not_scorable"] == [f"binary/clinic: benign 0, malignant {melanomas}"]
    assert not [k for k in summary["auroc"] if k.startswith("binary/") and "/clinic/" in k]
    scored = {(c["task"], c["test_set"]) for c in results["comparisons"] + results["control_checks"]}
    assert scored == {("melanoma", "internal"), ("melanoma", "clinic"), ("binary", "internal")}
    rows = [r for r in results["summary"] if (r["task"], r["test_set"]) == ("binary", "clinic")]
    assert rows and all(not r["scorable"] and r["balanced_accuracy_mean"] != r["balanced_accuracy_mean"] for r in rows)
    text = (report / "report.md").read_text()
    assert results["cells"] and "internal" in text and "clinic" in text
    assert text.count("Not scorable for this task: clinic under the binary task") == 1
    assert text.count(f"not scorable for this task: benign 0, malignant {melanomas}") == len(rows)
    assert "binary · resnet18 · clinic" not in text and "Scoring: a test set scores a task only when" in text
