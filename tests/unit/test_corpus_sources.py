"""Source readers on their real layouts (built from real HAM10000 images) and on broken inputs."""

import re

import numpy as np
import pytest

from dermaflux.corpus.sources import SourceError, SourceSpec, read_source, readers
from dermaflux.testing.ham10000 import pick
from dermaflux.testing.sources import (
    build_dermamnist, build_generic_csv, build_ham_subset, build_isic, build_pad_ufes, write_csv,
)


def test_registry_and_spec_syntax():
    assert {"ham10000", "dermamnist", "isic", "pad-ufes-20", "csv"} <= set(readers())
    spec = SourceSpec.parse("csv=/a/b.csv, images=/imgs ,id=file,label=dx,name=clinic")
    assert (spec.reader, spec.path, spec.name) == ("csv", "/a/b.csv", "clinic")
    assert spec.options["images"] == "/imgs"
    with pytest.raises(ValueError, match="READER=PATH"):
        SourceSpec.parse("/just/a/path")
    with pytest.raises(SourceError, match="unknown reader"):
        read_source("derm7pt=/x")


def test_ham10000_full_folder_indexes_every_row(ham10000_dir):
    index = read_source(f"ham10000={ham10000_dir}")
    assert index.input_rows == len(index.records) == 5984 and not index.rejects
    first = index.records[0]
    assert first.image_path.endswith(f"{first.original_id}.jpg") and first.lesion_id.startswith("HAM_")
    assert first.diagnosis_method in {"histo", "follow_up", "consensus", "confocal"}


def test_ham10000_part_folders_and_broken_rows(ham10000_dir, tmp_path):
    built = build_ham_subset(ham10000_dir, tmp_path / "ham")
    index = read_source(f"ham10000={built['root']}")
    assert index.input_rows == built["input_rows"]
    # Images spread over HAM10000_images_part_1/2 are all found.
    assert {r.original_id for r in index.records} >= {r["image_id"] for r in built["rows"]}
    rejects = {r.original_id: r for r in index.rejects}
    missing = rejects["ISIC_MISSING"]
    assert "not found" in missing.reason and missing.file.endswith("HAM10000_metadata.csv") and missing.row > 1
    unknown = next(r for r in index.rejects if "unknown label" in r.reason)
    assert "lupus" in unknown.reason
    # The truncated JPEG is indexed: only decoding (a Ray task) can tell it is broken.
    assert "ISIC_TRUNCATED" in {r.original_id for r in index.records}


def test_csv_missing_a_column_fails_the_source_naming_file_and_column(ham10000_dir, tmp_path):
    rows = pick(ham10000_dir, 1)
    path = write_csv(tmp_path / "HAM10000_metadata.csv", rows, ["lesion_id", "image_id", "age"])
    with pytest.raises(SourceError, match=r"HAM10000_metadata\.csv.*'dx'"):
        read_source(f"ham10000={tmp_path}")
    with pytest.raises(SourceError, match=r"'diagnosis'"):
        read_source(f"csv={path},id=image_id,label=diagnosis")


def test_csv_that_is_not_utf8_fails_naming_file_and_line(tmp_path):
    metadata = tmp_path / "HAM10000_metadata.csv"
    metadata.write_bytes(b"lesion_id,image_id,dx,localization\nHAM_1,ISIC_1,nv,back\n"
                         + "HAM_2,ISIC_2,nv,t\u00eate\n".encode("latin-1"))
    expected = rf"^ham10000: {re.escape(str(metadata))} line 3: byte 18 of the line \(0xea\) is not UTF-8"
    with pytest.raises(SourceError, match=expected):
        read_source(f"ham10000={tmp_path}")
    generic = tmp_path / "labels.csv"
    generic.write_bytes(b"\xef\xbb\xbfimage,dx\n\xff,nv\n")  # a UTF-8 BOM is fine; 0xff is not
    with pytest.raises(SourceError, match=rf"{re.escape(str(generic))} line 2: byte 1 of the line \(0xff\)"):
        read_source(f"csv={generic},id=image,label=dx")


def test_dermamnist_npz_official_splits(ham10000_dir, tmp_path):
    built = build_dermamnist(ham10000_dir, tmp_path / "dermamnist_64.npz")
    index = read_source(f"dermamnist={tmp_path},size=64")
    assert index.input_rows == built["input_rows"]
    splits = [r.official_split for r in index.records]
    assert splits.count("val") == built["counts"]["val"] and splits.count("test") == built["counts"]["test"]
    assert [r.original_id for r in index.rejects] == [built["unknown_id"]]
    assert "expected 0..6" in index.rejects[0].reason
    with np.load(built["path"]) as archive:
        assert archive["train_images"].shape[1:] == (64, 64, 3)
    with pytest.raises(SourceError, match="dermamnist_128"):
        read_source(f"dermamnist={tmp_path},size=128")


def test_isic_one_hot_and_metadata(ham10000_dir, tmp_path):
    dup = pick(ham10000_dir, 1)[0]["image_id"]
    built = build_isic(ham10000_dir, tmp_path / "isic", duplicate_of=dup)
    index = read_source(f"isic={built['root']},split=train")
    assert index.input_rows == built["input_rows"]
    reasons = {r.original_id: r.reason for r in index.rejects}
    assert "unknown label UNK" in reasons[built["unknown_id"]]
    assert "exactly one" in reasons[built["ambiguous_id"]]
    record = index.records[0]
    # split=train is the spec's (every row to train), applied by the plan; the publisher gave none.
    assert index.spec.fixed_split == "train" and record.official_split is None
    assert record.lesion_id.startswith("IL_") and record.site


def test_pad_ufes_groups_and_clinical_fields(ham10000_dir, tmp_path):
    built = build_pad_ufes(ham10000_dir, tmp_path / "pad")
    index = read_source(f"pad-ufes-20={built['root']}")
    assert len(index.records) == built["input_rows"] and not index.rejects
    by_id = {r.original_id: r for r in index.records}
    a, b = (by_id[i] for i in built["same_lesion"])
    assert a.lesion_id == b.lesion_id == "900" and a.patient_id == "PAT_7"
    assert a.skin_type in {"I", "II", "III", "IV", "V", "VI"} and a.sex in {"male", "female"}


def test_generic_csv_maps_columns_and_english_labels(ham10000_dir, tmp_path):
    built = build_generic_csv(ham10000_dir, tmp_path / "clinic")
    index = read_source(built["spec"])
    assert index.spec.name == "clinic" and len(index.records) == built["input_rows"]
    assert {r.label for r in index.records} >= {"mel", "nv"}
    with pytest.raises(SourceError, match="unknown option"):
        read_source(built["spec"] + ",colour=red")
