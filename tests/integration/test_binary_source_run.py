"""A source that says only benign or malignant (an ISIC 2024-style `target` column) goes the whole way:
curate (train/val/test), caption, train (tiny preset, two steps), generate `benign`/`malignant`,
evaluate (binary task) -- issue 20 point 1."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from dermaflux.cli import main
from dermaflux.testing.ham10000 import pick
from dermaflux.testing.sources import reencode, write_csv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def binary_source(ham10000_dir, tmp_path_factory):
    """`train-metadata.csv` (isic_id, target 0/1, patient_id) and `train-image/image/<isic_id>.jpg`, 64 px."""
    root = tmp_path_factory.mktemp("slice")
    rows = pick(ham10000_dir, {"mel": 10, "bcc": 6, "nv": 10, "bkl": 6}, skip=20)
    table = []
    for k, row in enumerate(rows):
        isic_id = f"ISIC_{9000000 + k}"
        reencode(ham10000_dir / "images" / f"{row['image_id']}.jpg", root / "train-image" / "image" / f"{isic_id}.jpg",
                 size=64)
        table.append({"isic_id": isic_id, "target": int(row["dx"] in ("mel", "bcc")), "patient_id": row["lesion_id"]})
    write_csv(root / "train-metadata.csv", table, ["isic_id", "target", "patient_id"])
    spec = (f"csv={root / 'train-metadata.csv'},images={root / 'train-image'},id=isic_id,label=target,"
            "positive=malignant,patient=patient_id,name=slice")
    return {"spec": spec, "rows": table}


def test_a_benign_malignant_source_curates_captions_trains_generates_and_evaluates(ray_local, binary_source, tmp_path,
                                                                                    tiny_model_dir):
    corpus, captions, run, synthetic, report = (tmp_path / name for name in
                                                ("corpus", "captions", "train", "synthetic", "report"))
    assert main(["curate", "--source", binary_source["spec"], "--out", str(corpus),
                 "--set", "curate.val_fraction=0.2", "--set", "curate.test_fraction=0.2"]) == 0
    rows = pq.read_table(corpus / "shards", columns=["label", "malignant", "melanoma", "split", "patient_id"]).to_pylist()
    assert len(rows) == len(binary_source["rows"])
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for split in ("train", "val", "test"):  # stratified by malignancy
        assert {r["label"] for r in rows if r["split"] == split} == {"benign", "malignant"}, split
    assert all(r["malignant"] == (r["label"] == "malignant") for r in rows)
    assert all(r["melanoma"] is (None if r["malignant"] else False) for r in rows)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["malignancy_only"]["rows"] == len(rows) and manifest["no_diagnosis"]["rows"] == 0

    assert main(["caption", "--corpus", str(corpus), "--out", str(captions)]) == 0
    captioned = pq.read_table(captions / "shards", columns=["label", "caption"]).to_pylist()
    assert len(captioned) == len(rows)
    for row in captioned:  # the reference's wording: "a benign lesion", no diagnosis word
        assert f"{row['label']} lesion" in row["caption"].lower(), row
        assert not any(word in row["caption"].lower() for word in ("melanoma", "nevus", "carcinoma", "keratosis"))

    assert main(["train", "--captions", str(captions), "--out", str(run), "--steps", "2",
                 "--set", "train.checkpoint_every=2", "--set", "train.validate_every=2",
                 "--set", "train.validation_steps=1", "--set", "train.vae_fit.steps=2",
                 "--set", "train.vae_fit.eval_images=4"]) == 0
    assert (run / "final").is_dir()

    assert main(["generate", "--lora", str(run / "final"), "--out", str(synthetic), "--steps", "1",
                 "--set", "synth.class_targets={benign: 2, malignant: 2}", "--set", "synth.corpus=" + str(corpus),
                 "--set", "synth.width=32", "--set", "synth.height=32"]) == 0
    generated = pq.read_table(synthetic / "shards", columns=["label", "malignant", "prompt"]).to_pylist()
    assert sorted(r["label"] for r in generated) == ["benign", "benign", "malignant", "malignant"]
    assert all(r["malignant"] == (r["label"] == "malignant") for r in generated)

    assert main(["evaluate", "--corpus", str(corpus), "--synthetic", str(synthetic), "--out", str(report),
                 "--fractions", "1.0", "--ratios", "0,1", "--seeds", "1", "--steps", "5", "--task", "binary"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["cells"] and "internal" in (report / "report.md").read_text()
