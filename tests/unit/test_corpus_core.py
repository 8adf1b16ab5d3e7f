"""The pure core of curation: image checks, near-duplicates, grouped splits, the plan (no Ray)."""

import random
from collections import Counter

import numpy as np
import pytest

from dermaflux.config import load_config
from dermaflux.corpus import dedup, splits
from dermaflux.corpus.images import inspect_image, scan_image
from dermaflux.corpus.plan import build_plan
from dermaflux.corpus.sources import read_source
from dermaflux.testing.ham10000 import pick
from dermaflux.testing.sources import (
    build_dermamnist, build_generic_csv, build_ham_subset, build_isic, build_pad_ufes, reencode, truncated_copy,
)


def test_truncated_and_garbage_images_fail_decoding(ham10000_dir, tmp_path):
    src = ham10000_dir / "images" / f"{pick(ham10000_dir, 1)[0]['image_id']}.jpg"
    good = scan_image(str(src))
    assert good["format"] == "JPEG" and (good["width"], good["height"]) == (224, 224) and len(good["phash"]) == 64
    assert "does not decode" in scan_image(str(truncated_copy(src, tmp_path / "cut.jpg")))["error"]
    assert "does not decode" in inspect_image(b"not an image at all")["error"]
    assert "missing" in scan_image(str(tmp_path / "nope.jpg"))["error"]


def test_phash_sees_reencoded_copies_and_not_other_lesions(ham10000_dir, tmp_path):
    """The default threshold separates a resized/re-compressed copy from a different lesion."""
    cfg = load_config("tiny").curate
    rows = pick(ham10000_dir, 4)
    originals = [scan_image(str(ham10000_dir / "images" / f"{r['image_id']}.jpg"), cfg.phash_size) for r in rows]
    copies = [scan_image(str(reencode(ham10000_dir / "images" / f"{r['image_id']}.jpg", tmp_path / f"{k}.jpg", size=600)),
                         cfg.phash_size) for k, r in enumerate(rows)]
    words = dedup.hash_words([o["phash"] for o in originals] + [c["phash"] for c in copies])
    found = {(i, j) for i, j, _ in dedup.near_pairs(words, cfg.phash_threshold)}
    n = len(rows)
    assert found == {(k, n + k) for k in range(n)}


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (40, 256))
    bits = np.concatenate([base, base[:10] ^ (rng.random((10, 256)) < 0.03)])  # 10 noisy copies
    hexes = ["".join(f"{int(''.join(map(str, row[k:k + 4])), 2):x}" for k in range(0, 256, 4)) for row in bits]
    pairs = dedup.near_pairs(dedup.hash_words(hexes), threshold=20, block=7)
    brute = {(i, j, int((bits[i] != bits[j]).sum())) for i in range(50) for j in range(i + 1, 50)
             if (bits[i] != bits[j]).sum() <= 20}
    assert set(pairs) == brute and len(brute) >= 10


def test_greedy_keep_breaks_chains_and_respects_priority():
    # 0~1 (d=3), 1~2 (d=3), 0 and 2 far apart: keep 0 and 2 when 0 comes first.
    result = dedup.choose_kept(3, [(0, 1, 3), (1, 2, 3)], priority=[0, 1, 2])
    assert result.kept.tolist() == [True, False, True] and result.duplicate_of[1] == 0
    result = dedup.choose_kept(3, [(0, 1, 3), (1, 2, 3)], priority=[1, 0, 2])
    assert result.kept.tolist() == [False, True, False]


def test_grouped_split_keeps_groups_whole_and_stratifies():
    rng = random.Random(1)
    # Patients with 1-3 lesions, lesions with 1-3 images, one label per lesion.
    lesion, patient, labels = [], [], []
    for p in range(600):
        for q in range(rng.randint(1, 3)):
            label = rng.choice(["nv"] * 8 + ["mel", "bcc"])
            for _ in range(rng.randint(1, 3)):
                lesion.append(f"L{p}-{q}"), patient.append(f"P{p}"), labels.append(label)
    n = len(lesion)
    pairs = [(i, i + 1, 2) for i in range(0, 100, 10)]
    groups = splits.group_rows([[f"x/lesion/{a}", f"x/patient/{b}"] for a, b in zip(lesion, patient)], pairs)
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    plan = splits.assign_splits(groups, labels, [None] * n, fractions, seed=3)
    for key in (lesion, patient):
        placed: dict = {}
        for k, s in zip(key, plan.split):
            placed.setdefault(k, set()).add(s)
        assert all(len(v) == 1 for v in placed.values())
    for i, j, _ in pairs:
        assert plan.split[i] == plan.split[j]
    share = Counter(plan.split)
    assert abs(share["test"] / n - 0.1) < 0.03 and abs(share["train"] / n - 0.8) < 0.04
    mel = [s for s, lab in zip(plan.split, labels) if lab == "mel"]
    assert abs(mel.count("test") / len(mel) - 0.1) < 0.05
    again = splits.assign_splits(groups, labels, [None] * n, fractions, seed=3)
    other = splits.assign_splits(groups, labels, [None] * n, fractions, seed=4)
    assert again.split == plan.split and other.split != plan.split


def test_official_split_is_kept_and_its_group_followed():
    groups = [0, 0, 2, 3]
    official = ["test", None, "train", None]
    plan = splits.assign_splits(groups, ["a"] * 4, official, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert plan.split[:3] == ["test", "test", "train"]
    assert plan.origin[:3] == ["official", "dermaflux", "official"]
    audit = splits.audit_splits(["train", "test"], [0, 0], [], ["a", "b"], [True, True])
    assert audit["groups_across_splits"] == 1 and audit["group_examples"] == [["a", "b"]]


@pytest.fixture(scope="module")
def sources(ham10000_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ham = build_ham_subset(ham10000_dir, root / "ham")
    dup = ham["rows"][3]["image_id"]
    return {
        "ham": ham,
        "dermamnist": build_dermamnist(ham10000_dir, root / "dm" / "dermamnist_64.npz", duplicate_of=dup),
        "isic": build_isic(ham10000_dir, root / "isic", duplicate_of=dup),
        "pad": build_pad_ufes(ham10000_dir, root / "pad"),
        "csv": build_generic_csv(ham10000_dir, root / "clinic"),
        "dup": dup,
    }


def specs_of(built):
    return [f"ham10000={built['ham']['root']}", f"dermamnist={built['dermamnist']['path']}",
            f"isic={built['isic']['root']}", f"pad-ufes-20={built['pad']['root']}", built["csv"]["spec"]]


def test_plan_reconciles_dedups_across_sources_and_never_leaks(sources):
    cfg = load_config("tiny", overrides=[]).curate.model_copy(update={"sources": specs_of(sources)})
    indexes = [read_source(s) for s in cfg.sources]
    scans = [scan_image(r.image_path, cfg.phash_size) for index in indexes for r in index.records]
    plan = build_plan(indexes, scans, cfg)
    total = sum(i.input_rows for i in indexes)
    s = plan.summary
    assert s["input_rows"] == total == s["kept"] + s["duplicates"] + s["quarantined"]
    # The HAM image reappears in DermaMNIST's test split and twice in ISIC: kept once, the
    # published test copy wins.
    dup_rows = [d for d in plan.duplicates if d["kept_id"] == f"dermamnist:{sources['dermamnist']['duplicate_id']}"]
    assert {d["dropped_id"] for d in dup_rows} == {f"ham10000:{sources['dup']}", "isic:ISIC_8000001", "isic:ISIC_8000002"}
    assert all(d["distance"] <= cfg.phash_threshold for d in plan.duplicates)
    pair = {d["dropped_id"] for d in plan.duplicates if d["dropped_source"] == "clinic"} | \
           {d["kept_id"] for d in plan.duplicates if d["dropped_source"] == "clinic"}
    assert pair == {f"clinic:{name}" for name in sources["csv"]["duplicate_pair"]}
    reasons = Counter(r.reason.split(" (")[0] for r in plan.quarantine)
    assert sum("unknown label" in r for r in reasons.elements()) == 3  # ham lupus, isic UNK, dermamnist 9
    assert any("does not decode" in r.reason and r.original_id == "ISIC_TRUNCATED" for r in plan.quarantine)
    kept = plan.kept.set_index("id")
    # Official DermaMNIST splits are kept as published.
    dm = kept[kept["source"] == "dermamnist"]
    assert (dm["split_origin"] == "official").all()
    assert (dm["split"] == [i.split("_")[0] for i in dm["original_id"]]).all()
    # One lesion (and one patient) never straddles splits.
    pad = kept[kept["source"] == "pad-ufes-20"]
    assert pad.loc[[f"pad-ufes-20:{i}" for i in sources["pad"]["same_patient"]], "split"].nunique() == 1
    assert plan.audit_final["groups_across_splits"] == 0 and plan.audit_final["near_duplicate_pairs_across_splits"] == 0
    assert kept["malignant"].tolist() == [lab in {"mel", "bcc", "akiec", "scc"} for lab in kept["label"]]


def test_published_split_audit_finds_a_leak_and_resplit_replaces_it(ham10000_dir, tmp_path):
    """DermaMNIST-style leak: one image in both train and test of the published split."""
    from PIL import Image

    rows = pick(ham10000_dir, 2)
    pixels = [np.asarray(Image.open(ham10000_dir / "images" / f"{r['image_id']}.jpg").convert("RGB").resize((64, 64)))
              for r in rows]
    order = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    labels = [[order.index(r["dx"])] for r in rows]
    np.savez(tmp_path / "dermamnist_64.npz",
             train_images=np.asarray(pixels, dtype=np.uint8), train_labels=np.asarray(labels),
             test_images=np.asarray(pixels[:1], dtype=np.uint8), test_labels=np.asarray(labels[:1]))
    base = load_config("tiny").curate.model_copy(update={"sources": [f"dermamnist={tmp_path / 'dermamnist_64.npz'}"]})
    indexes = [read_source(s) for s in base.sources]
    scans = [scan_image(r.image_path, base.phash_size) for r in indexes[0].records]

    kept = build_plan(indexes, scans, base)
    assert kept.audit_given["near_duplicate_pairs_across_splits"] == 1
    assert kept.audit_given["pair_examples"][0][:2] == ["dermamnist:train_0", "dermamnist:test_0"]
    # The published test copy survives, the train copy goes: test stays as published, no leak left.
    assert [(d["dropped_id"], d["kept_id"]) for d in kept.duplicates] == [("dermamnist:train_0", "dermamnist:test_0")]
    assert kept.audit_final["near_duplicate_pairs_across_splits"] == 0
    assert set(kept.kept["split_origin"]) == {"official"}

    resplit = build_plan(indexes, scans, base.model_copy(update={"official_splits": "resplit"}))
    assert set(resplit.kept["split_origin"]) == {"dermaflux"} and resplit.summary["duplicates"] == 1


def test_source_caps_leave_out_whole_lesions_and_reconcile(sources):
    specs = specs_of(sources)
    specs[0] += ",max_per_label=3"
    cfg = load_config("tiny", overrides=[]).curate.model_copy(update={"sources": specs})
    indexes = [read_source(s) for s in cfg.sources]
    scans = [scan_image(r.image_path, cfg.phash_size) for index in indexes for r in index.records]
    plan = build_plan(indexes, scans, cfg)
    ham = plan.kept[plan.kept["source"] == "ham10000"]
    assert max(Counter(ham["label"]).values()) <= 3 and plan.capped
    assert {c["source"] for c in plan.capped} == {"ham10000"} and plan.caps == {"ham10000": {"max_per_label": 3}}
    assert plan.summary["per_source"]["ham10000"]["capped"] == len(plan.capped) and plan.summary["balanced"]
    capped_ids = {c["id"] for c in plan.capped}
    kept_lesions = set(ham["lesion_id"].dropna())
    capped_lesions = {r.lesion_id for r in indexes[0].records if f"ham10000:{r.original_id}" in capped_ids}
    assert not kept_lesions & capped_lesions  # a lesion is kept or left out whole
    again = build_plan(indexes, scans, cfg)
    assert [c["id"] for c in again.capped] == [c["id"] for c in plan.capped]


def test_scan_tasks_grow_with_the_corpus_within_bounds():
    from dermaflux.corpus.ray_pipeline import MAX_SCAN_BATCH, scan_batch_size

    curate = load_config("tiny").curate
    assert scan_batch_size(500_000, curate, 2) == MAX_SCAN_BATCH  # not 7,800 tasks of 64
    assert scan_batch_size(5_984, curate, 2) == 187  # HAM10000: 32 tasks for 2 CPUs
    assert scan_batch_size(100, curate, 2) == curate.batch_size  # never below batch_size
    assert scan_batch_size(5_984, curate, 64) == curate.batch_size  # a large cluster: many small tasks
    assert scan_batch_size(5_984, curate.model_copy(update={"num_workers": 1}), 64) == 374  # the slots given
    assert scan_batch_size(5_984, curate.model_copy(update={"cpus_per_worker": 2.0}), 2) == 374
    assert scan_batch_size(500_000, curate.model_copy(update={"scan_batch": 50}), 2) == 50  # set by hand
