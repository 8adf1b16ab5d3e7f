"""External test sets: `split=` on any source, binary label columns (rows without a diagnosis),
placeholder lesion ids, and the audit of test rows that repeat a training source (no Ray)."""

import json

import pytest

from dermaflux.config import load_config
from dermaflux.core.config import ConfigError
from dermaflux.corpus.images import scan_image
from dermaflux.corpus.plan import build_plan
from dermaflux.corpus.sources import SourceError, SourceSpec, read_source
from dermaflux.testing.ham10000 import pick
from dermaflux.testing.sources import build_binary_external, build_ham_subset, reencode, write_csv


def test_split_is_a_constant_and_split_col_a_column():
    assert SourceSpec.parse("isic=/x,split=test").fixed_split == "test"
    assert SourceSpec.parse("csv=/a.csv,id=i,label=l,split=Validation").fixed_split == "val"
    legacy = SourceSpec.parse("csv=/a.csv,id=i,label=l,split=partition")  # the older spelling of split_col
    assert (legacy.fixed_split, legacy.split_column) == (None, "partition")
    named = SourceSpec.parse("csv=/a.csv,id=i,label=l,split_col=test")  # a column that happens to be called test
    assert (named.fixed_split, named.split_column) == (None, "test")
    with pytest.raises(ValueError, match="split='holdout': expected train, val or test"):
        SourceSpec.parse("ham10000=/x,split=holdout")
    with pytest.raises(ValueError, match="not both"):
        SourceSpec.parse("csv=/a.csv,id=i,label=l,split=test,split_col=part")
    with pytest.raises(ConfigError, match="'internal' is reserved"):
        load_config("tiny", extra={"curate": {"sources": ["csv=/a.csv,id=i,label=l,split=test,name=internal"]}})
    with pytest.raises(ConfigError, match="holdout"):
        load_config("tiny", extra={"curate": {"sources": ["isic=/x,split=holdout"]}})


def _table(ham10000_dir, root, n=4):
    rows = pick(ham10000_dir, 1)[:n]
    for row in rows:
        reencode(ham10000_dir / "images" / f"{row['image_id']}.jpg", root / f"{row['image_id']}.jpg", size=64)
    return rows


def test_csv_split_column_both_spellings(ham10000_dir, tmp_path):
    rows = _table(ham10000_dir, tmp_path)
    parts = ["train", "Test", "validation", "holdout"]
    path = write_csv(tmp_path / "cases.csv", [{"file": r["image_id"], "dx": r["dx"], "part": p} for r, p in zip(rows, parts)],
                     ["file", "dx", "part"])
    for option in ("split=part", "split_col=part"):
        index = read_source(f"csv={path},id=file,label=dx,{option}")
        assert [r.official_split for r in index.records] == ["train", "test", "val"]
        assert "expected train, val or test" in index.rejects[0].reason and index.rejects[0].row == 5
        assert index.published_splits == {"train": 1, "test": 1, "val": 1}
    constant = read_source(f"csv={path},id=file,label=dx,split=test")
    assert len(constant.records) == 4 and constant.spec.fixed_split == "test"


def test_csv_binary_melanoma_and_malignant_columns(ham10000_dir, tmp_path):
    built = build_binary_external(ham10000_dir, tmp_path / "ext")
    index = read_source(built["spec"])
    assert index.input_rows == built["input_rows"] and len(index.records) == built["input_rows"] - 1
    assert "unknown label melanoma='maybe'" in index.rejects[0].reason and index.rejects[0].original_id == "ext_bad"
    for record in index.records:
        if record.original_id in built["melanoma"]:
            assert (record.label, record.melanoma, record.malignant) == ("mel", True, True)
        else:  # "not a melanoma": no diagnosis, and it may still be malignant (a bcc)
            assert (record.label, record.melanoma, record.malignant) == (None, False, None)
        assert record.source_label.startswith("melanoma=")
    spellings = {r["melanoma"] for r in built["rows"]}
    assert {"0", "0.0", "false", "no"} <= spellings

    # A benign/malignant column labels every row `benign`/`malignant`: training rows, no split=test needed.
    malignant = read_source(built["spec"].replace("positive=mel", "positive=malignant").replace(",split=test", ""))
    for record in malignant.records:
        flag = record.original_id in built["melanoma"]
        assert record.label == ("malignant" if flag else "benign") and record.official_split is None
        assert record.malignant is flag and record.melanoma is (None if flag else False)

    without_split = built["spec"].replace(",split=test", "")
    with pytest.raises(SourceError, match="clinic: positive=mel gives rows without a diagnosis.*add split=test"):
        read_source(without_split)
    with pytest.raises(SourceError, match="positive='wart': expected mel or malignant"):
        read_source(built["spec"].replace("positive=mel", "positive=wart"))


def _isic_folder(ham10000_dir, root, columns, lesion_ids=None):
    """ISIC 2016/2017-style ground truth (`image_id` + 0.0/1.0 columns) and metadata."""
    rows = pick(ham10000_dir, {"mel": 2, "nv": 2, "bkl": 2}, skip=70)
    gt, meta = [], []
    for k, row in enumerate(rows):
        image = f"ISIC_00{k:05d}"
        reencode(ham10000_dir / "images" / f"{row['image_id']}.jpg", root / "images" / f"{image}.jpg", size=96)
        gt.append({"image_id": image, "melanoma": "1.0" if row["dx"] == "mel" else "0.0",
                   "seborrheic_keratosis": "1.0" if row["dx"] == "bkl" else "0.0"})
        meta.append({"image_id": image, "lesion_id": (lesion_ids or {}).get(k, f"IL_{k + 1:07d}"), "sex": row["sex"]})
    write_csv(root / "ISIC-2017_Test_v2_Part3_GroundTruth.csv", gt, ["image_id", *columns])
    write_csv(root / "ISIC-2017_Test_v2_Metadata.csv", meta, ["image_id", "lesion_id", "sex"])
    return rows


def test_isic_melanoma_only_ground_truth_is_a_binary_source(ham10000_dir, tmp_path):
    rows = _isic_folder(ham10000_dir, tmp_path / "isic2016", ["melanoma"])
    # Before: every 0.0 row was rejected ("exactly one column set to 1"), and the curate kept nothing.
    index = read_source(f"isic={tmp_path / 'isic2016'},split=test")
    assert not index.rejects and len(index.records) == len(rows)
    labels = [(r.label, r.melanoma) for r in index.records]
    assert labels == [("mel", True) if row["dx"] == "mel" else (None, False) for row in rows]
    with pytest.raises(SourceError, match=r"isic: 4 rows have no diagnosis .*add split=test"):
        read_source(f"isic={tmp_path / 'isic2016'}")

    # ISIC 2017's two flags name every diagnosis (neither set: a nevus): no split needed.
    rows = _isic_folder(ham10000_dir, tmp_path / "isic2017", ["melanoma", "seborrheic_keratosis"])
    index = read_source(f"isic={tmp_path / 'isic2017'}")
    assert [r.label for r in index.records] == [row["dx"] for row in rows]
    assert index.records[0].sex in {"male", "female"}  # metadata joined on image_id


@pytest.fixture(scope="module")
def ham(ham10000_dir, tmp_path_factory):
    return build_ham_subset(ham10000_dir, tmp_path_factory.mktemp("ham"), per_label=6)


def _plan(specs, **settings):
    cfg = load_config("tiny").curate.model_copy(update={"sources": specs, **settings})
    indexes = [read_source(s) for s in cfg.sources]
    scans = [scan_image(r.image_path, cfg.phash_size) for index in indexes for r in index.records]
    return build_plan(indexes, scans, cfg)


def test_external_test_set_never_changes_the_training_rows_and_its_overlap_is_audited(ham10000_dir, ham, tmp_path):
    copied = ham["rows"][5]["image_id"]
    ext = build_binary_external(ham10000_dir, tmp_path / "ext", exclude_lesions={r["lesion_id"] for r in ham["rows"]},
                                near_copy_of=copied)
    alone = _plan([f"ham10000={ham['root']}"])
    plan = _plan([f"ham10000={ham['root']}", ext["spec"]])
    training = lambda p: p.kept[p.kept["source"] == "ham10000"][["id", "split"]].values.tolist()
    assert training(plan) == training(alone)

    clinic = plan.kept[plan.kept["source"] == "clinic"].set_index("original_id")
    assert set(clinic["split"]) == {"test"} and set(clinic["split_origin"]) == {"spec"}
    assert ext["near_copy_id"] not in clinic.index and ext["bad_id"] not in clinic.index
    for name, row in clinic.iterrows():
        expected = ("mel", True, True) if name in ext["melanoma"] else (None, False, None)
        label = row["label"] if isinstance(row["label"], str) else None  # pandas holds a missing string as NaN
        assert (label, row["melanoma"], row["malignant"]) == expected, name
    assert [(o["test_id"], o["train_id"], o["kind"], o["action"]) for o in plan.test_overlap] == [
        ("clinic:ext_copy", f"ham10000:{copied}", "near_duplicate", "dropped")]
    assert plan.test_overlap[0]["distance"] <= 24 and plan.test_only == ["clinic"]
    entry = plan.summary["per_source"]["clinic"]
    assert entry == {"input_rows": ext["input_rows"], "kept": ext["input_rows"] - 2, "duplicates": 0,
                     "test_overlap": 1, "quarantined": 1, "capped": 0}

    kept = _plan([f"ham10000={ham['root']}", ext["spec"]], test_overlap="keep")
    assert training(kept) == training(alone)
    assert kept.kept.set_index("id").loc["clinic:ext_copy", "split"] == "test"
    assert [o["action"] for o in kept.test_overlap] == ["kept"] and kept.summary["test_overlap"] == 0
    leaks = kept.audit_final["near_duplicate_pairs_across_splits"]
    assert leaks == (0 if kept.test_overlap[0]["train_split"] == "test" else 1)


def test_shared_lesion_ids_are_overlap_and_placeholders_group_nothing(ham10000_dir, ham, tmp_path):
    # Test rows 0 and 1 carry a training lesion's id (ISIC-archive ids: HAM10000 uses the same ones);
    # rows 2 and 3 the placeholder ISIC metadata writes for "no lesion id".
    shared = ham["rows"][0]["lesion_id"]
    _isic_folder(ham10000_dir, tmp_path / "isic", ["melanoma"],
                 lesion_ids={0: shared, 1: shared, 2: "IL_0000000", 3: "IL_0000000"})
    plan = _plan([f"ham10000={ham['root']}", f"isic={tmp_path / 'isic'},split=test"])
    overlap = sorted((o["test_id"], o["kind"], o["key"]) for o in plan.test_overlap)
    assert overlap == [(f"isic:ISIC_00{k:05d}", "lesion", f"isic-archive/lesion/{shared}") for k in (0, 1)]
    kept = plan.kept.set_index("id")
    assert "isic:ISIC_0000000" not in kept.index and plan.summary["test_overlap"] == 2
    assert plan.placeholder_ids == {"isic": {"ids": 2, "values": ["IL_0000000"]}}
    placeholder = kept.loc["isic:ISIC_0000002"]
    assert not isinstance(placeholder["lesion_id"], str)  # missing (pandas: NaN)
    assert json.loads(placeholder["metadata_json"])["lesion_id_placeholder"] == "IL_0000000"


def test_rows_without_a_diagnosis_are_left_uncaptioned_with_the_reason(ham10000_dir):
    from dermaflux.caption.batch import extract_row

    image = (ham10000_dir / "images" / f"{pick(ham10000_dir, 1)[0]['image_id']}.jpg").read_bytes()
    attributes, flags, reason = extract_row({"image": image, "label": None, "melanoma": False, "malignant": None})
    assert (attributes, flags) == ("", [])
    assert reason.startswith("no diagnosis:") and "melanoma=false, malignant=unknown" in reason
    assert extract_row({"image": image, "label": "nv", "malignant": False})[2] is None


def test_older_corpora_get_melanoma_from_the_label():
    import pyarrow as pa

    from dermaflux.corpus.schema import CORPUS_SCHEMA, with_melanoma

    old = pa.table({"id": ["a", "b"], "label": ["mel", "nv"], "malignant": [True, False], "split": ["train", "test"]})
    derived = with_melanoma(old)
    assert derived.column_names == ["id", "label", "malignant", "melanoma", "split"]
    assert derived.column("melanoma").to_pylist() == [True, False]
    new = pa.table({"label": ["mel", None], "melanoma": [None, False]})
    assert with_melanoma(new).column("melanoma").to_pylist() == [True, False]
    fields = {f.name: f for f in CORPUS_SCHEMA}
    assert all(fields[name].nullable for name in ("label", "malignant", "melanoma"))
