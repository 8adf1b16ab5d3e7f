"""Readers of the reference corpus' sources, each on small files written in its publisher's layout
(issue 20): isic2020, isic2024 (HDF5 and JPEG folder), ddi, folders (MED-NODE, Kaggle)."""

import csv
import io
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from dermaflux.corpus.images import scan_image
from dermaflux.corpus.sources import read_source
from dermaflux.corpus.sources.base import SourceError


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_isic2020_maps_known_diagnoses_and_keeps_target_for_unknown(tmp_path):
    root = tmp_path / "isic2020"
    rows = [("ISIC_0000001", "IP_1", "melanoma", "malignant", "1"), ("ISIC_0000002", "IP_1", "nevus", "benign", "0"),
            ("ISIC_0000003", "IP_2", "unknown", "benign", "0"), ("ISIC_0000004", "IP_3", "unknown", "malignant", "1"),
            ("ISIC_0000005", "IP_3", "cafe-au-lait macule", "benign", "0"), ("ISIC_0000006", "IP_4", "unknown", "benign", "0")]
    _csv(root / "ISIC_2020_Training_GroundTruth_v2.csv", [
        {"image_name": i, "patient_id": p, "lesion_id": f"IL_{k}", "sex": "male", "age_approx": "45.0",
         "anatom_site_general_challenge": "torso", "diagnosis": d, "benign_malignant": b, "target": t}
        for k, (i, p, d, b, t) in enumerate(rows)])
    for k, (image, *_rest) in enumerate(rows[:-1]):  # the last row has no image
        _write(root / "train" / f"{image}.jpg", _jpeg(k))
    index = read_source(f"isic2020={root}")
    got = {r.original_id: (r.label, r.malignant, r.melanoma, r.patient_id, r.modality) for r in index.records}
    assert got == {
        "ISIC_0000001": ("mel", True, True, "IP_1", "dermoscopic"), "ISIC_0000002": ("nv", False, False, "IP_1", "dermoscopic"),
        "ISIC_0000003": ("benign", False, False, "IP_2", "dermoscopic"),
        "ISIC_0000004": ("malignant", True, None, "IP_3", "dermoscopic"),
        "ISIC_0000005": ("benign", False, False, "IP_3", "dermoscopic")}
    assert index.input_rows == 6 and [r.original_id for r in index.rejects] == ["ISIC_0000006"]
    assert "image 'ISIC_0000006' not found" in index.rejects[0].reason and index.rejects[0].row == 7


@pytest.mark.parametrize("layout", ["hdf5", "jpeg"])
def test_isic2024_reads_the_hdf5_file_and_the_jpeg_folder(tmp_path, layout):
    root = tmp_path / "isic-2024-challenge"
    ids = [f"ISIC_{9000000 + k}" for k in range(4)]
    meta = [{"isic_id": ids[0], "target": "0", "patient_id": "IP_1", "lesion_id": "", "iddx_full": "Benign",
             "iddx_1": "Benign", "iddx_2": "", "iddx_3": "", "age_approx": "60", "sex": "female",
             "anatom_site_general": "posterior torso", "image_type": "TBP tile: close-up"},
            {"isic_id": ids[1], "target": "1", "patient_id": "IP_1", "lesion_id": "IL_1",
             "iddx_full": "Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma Invasive",
             "iddx_1": "Malignant", "iddx_2": "Malignant melanocytic proliferations (Melanoma)",
             "iddx_3": "Melanoma Invasive", "age_approx": "70", "sex": "male", "anatom_site_general": "head/neck",
             "image_type": "TBP tile: close-up"},
            {"isic_id": ids[2], "target": "1", "patient_id": "IP_2", "lesion_id": "IL_2",
             "iddx_full": "Malignant::Malignant adnexal epithelial proliferations - Follicular",
             "iddx_1": "Malignant", "iddx_2": "Malignant adnexal epithelial proliferations - Follicular", "iddx_3": "",
             "age_approx": "", "sex": "", "anatom_site_general": "", "image_type": "TBP tile: close-up"},
            {"isic_id": "ISIC_9999999", "target": "0", "patient_id": "IP_3", "lesion_id": "", "iddx_full": "Benign",
             "iddx_1": "Benign", "iddx_2": "", "iddx_3": "", "age_approx": "", "sex": "", "anatom_site_general": "",
             "image_type": "TBP tile: close-up"}]
    _csv(root / "train-metadata.csv", meta)
    stored = ids[:3] + [ids[3]]  # ids[3] has an image but no metadata row; ISIC_9999999 has no image
    if layout == "hdf5":
        with h5py.File(root / "train-image.hdf5", "w") as fh:
            for k, isic_id in enumerate(stored):
                fh.create_dataset(isic_id, data=np.void(_jpeg(k)))
    else:
        for k, isic_id in enumerate(stored):
            _write(root / "train-image" / "image" / f"{isic_id}.jpg", _jpeg(k))
    index = read_source(f"isic2024={root}")
    got = {r.original_id: (r.label, r.patient_id, r.lesion_id, r.modality) for r in index.records}
    assert got == {ids[0]: ("benign", "IP_1", None, "total-body crop"), ids[1]: ("mel", "IP_1", "IL_1", "total-body crop"),
                   ids[2]: ("malignant", "IP_2", "IL_2", "total-body crop")}
    reasons = {r.original_id: r.reason for r in index.rejects}
    assert "metadata row without an image" in reasons["ISIC_9999999"]
    if layout == "hdf5":
        assert "HDF5 key 'ISIC_9000003' has no row in" in reasons["ISIC_9000003"] and index.input_rows == 5
        record = next(r for r in index.records if r.original_id == ids[1])
        assert record.image_path.endswith("train-image.hdf5::ISIC_9000001")
        scanned = scan_image(record.image_path)
        assert scanned["format"] == "JPEG" and (scanned["width"], scanned["height"]) == (24, 24)
    else:
        assert index.input_rows == 4


def test_ddi_records_skin_tone_and_maps_disease(tmp_path):
    root = tmp_path / "ddidiversedermatologyimages"
    rows = [{"": "0", "DDI_ID": "1", "DDI_file": "000001.png", "skin_tone": "56", "malignant": "True",
             "disease": "melanoma-in-situ"},
            {"": "1", "DDI_ID": "2", "DDI_file": "000002.png", "skin_tone": "12", "malignant": "False",
             "disease": "verruca-vulgaris"},
            {"": "2", "DDI_ID": "3", "DDI_file": "000003.png", "skin_tone": "34", "malignant": "True",
             "disease": "mycosis-fungoides"},
            {"": "3", "DDI_ID": "4", "DDI_file": "000004.png", "skin_tone": "7", "malignant": "False",
             "disease": "melanocytic-nevi"}]
    _csv(root / "ddi_metadata.csv", rows)
    for k in range(4):
        Image.open(io.BytesIO(_jpeg(k))).save(root / f"00000{k + 1}.png")
    index = read_source(f"ddi={root}")
    got = {r.original_id: (r.label, r.malignant, r.skin_tone, r.modality) for r in index.records}
    assert got == {"000001": ("mel", True, "fitzpatrick V-VI", "clinical"),
                   "000002": ("benign", False, "fitzpatrick I-II", "clinical"),
                   "000003": ("malignant", True, "fitzpatrick III-IV", "clinical")}
    assert "skin_tone='7'" in index.rejects[0].reason


def test_folders_reads_mednode_and_kaggle_layouts_and_refuses_an_unknown_class(tmp_path):
    mednode = tmp_path / "complete_mednode_dataset"
    for k, folder in enumerate(["melanoma", "melanoma", "naevus"]):
        _write(mednode / folder / f"img{k}.jpg", _jpeg(k))
    index = read_source(f"folders={mednode},modality=clinical,name=mednode")
    assert sorted((r.original_id, r.label, r.official_split, r.modality) for r in index.records) == [
        ("melanoma/img0", "mel", None, "clinical"), ("melanoma/img1", "mel", None, "clinical"),
        ("naevus/img2", "nv", None, "clinical")]

    kaggle = tmp_path / "melanoma_cancer_dataset"
    for k, folder in enumerate(["train/benign", "train/malignant", "test/Benign", "test/Malignant"]):
        _write(kaggle / folder / f"melanoma_{k}.jpg", _jpeg(k))
    index = read_source(f"folders={kaggle},name=kaggle")
    assert sorted((r.original_id, r.label, r.official_split) for r in index.records) == [
        ("test/Benign/melanoma_2", "benign", "test"), ("test/Malignant/melanoma_3", "malignant", "test"),
        ("train/benign/melanoma_0", "benign", "train"), ("train/malignant/melanoma_1", "malignant", "train")]
    assert index.published_splits == {"train": 2, "test": 2}

    _write(kaggle / "train" / "psoriasis" / "x.jpg", _jpeg(9))
    with pytest.raises(SourceError, match=r"class folder .*psoriasis.* is not in the label mapping.*naevus"):
        read_source(f"folders={kaggle},name=kaggle")


def test_milk10k_groups_both_images_of_a_lesion_and_records_modality_and_tone(tmp_path):
    root = tmp_path / "milk10k"
    classes = ["AKIEC", "BCC", "BEN_OTH", "BKL", "DF", "INF", "MAL_OTH", "MEL", "NV", "SCCKA", "VASC"]
    _csv(root / "MILK10k_Training_GroundTruth.csv", [
        {"lesion_id": lesion, **{c: "1.0" if c == hot else "0.0" for c in classes}}
        for lesion, hot in (("IL_1", "MEL"), ("IL_2", "BEN_OTH"))])
    meta = []
    for k, (lesion, kind) in enumerate([("IL_1", "dermoscopic"), ("IL_1", "clinical: close-up"),
                                        ("IL_2", "dermoscopic"), ("IL_2", "clinical: close-up")]):
        isic_id = f"ISIC_{k:07d}"
        meta.append({"lesion_id": lesion, "isic_id": isic_id, "image_type": kind, "age_approx": "50", "sex": "female",
                     "skin_tone_class": "3", "site": "trunk"})
        _write(root / lesion / f"{isic_id}.jpg", _jpeg(k))
    _csv(root / "MILK10k_Training_Metadata.csv", meta)
    index = read_source(f"milk10k={root}")
    got = sorted((r.original_id, r.label, r.lesion_id, r.modality, r.skin_tone) for r in index.records)
    assert got == [("ISIC_0000000", "mel", "IL_1", "dermoscopic", "milk10k class 3"),
                   ("ISIC_0000001", "mel", "IL_1", "clinical", "milk10k class 3"),
                   ("ISIC_0000002", "benign", "IL_2", "dermoscopic", "milk10k class 3"),
                   ("ISIC_0000003", "benign", "IL_2", "clinical", "milk10k class 3")]


def test_isic_archive_export_and_derm12345(tmp_path):
    archive = tmp_path / "hiba"
    _csv(archive / "metadata.csv", [
        {"isic_id": "ISIC_1", "attribution": "HIBA", "copyright_license": "CC-BY", "benign_malignant": "malignant",
         "diagnosis_1": "Malignant", "diagnosis_2": "", "diagnosis_3": "Basal cell carcinoma",
         "fitzpatrick_skin_type": "III", "image_type": "dermoscopic", "lesion_id": "IL_9", "patient_id": "IP_9"},
        {"isic_id": "ISIC_2", "attribution": "HIBA", "copyright_license": "CC-BY", "benign_malignant": "",
         "diagnosis_1": "Benign", "diagnosis_2": "", "diagnosis_3": "", "fitzpatrick_skin_type": "",
         "image_type": "clinical: close-up", "lesion_id": "IL_8", "patient_id": "IP_9"}])
    for k in (1, 2):
        _write(archive / f"ISIC_{k}.jpg", _jpeg(k))
    index = read_source(f"isic-archive={archive},name=hiba")
    assert sorted((r.original_id, r.label, r.skin_type, r.modality) for r in index.records) == [
        ("ISIC_1", "bcc", "III", "dermoscopic"), ("ISIC_2", "benign", None, "clinical")]

    derm = tmp_path / "derm12345"
    for part, image_id, sub_class, malignancy in (("train", "d1", "melanoma", "malignant"),
                                                  ("test", "d2", "blue nevus", "benign")):
        _csv(derm / f"derm12345_metadata_{part}.csv", [
            {"image_id": image_id, "split": part, "super_class": "melanocytic", "malignancy": malignancy,
             "main_class_1": "x", "main_class_2": "y", "sub_class": sub_class, "label": "lbl"}])
        _write(derm / part / "lbl" / f"{image_id}.jpg", _jpeg(len(image_id)))
    index = read_source(f"derm12345={derm}")
    assert sorted((r.original_id, r.label, r.official_split) for r in index.records) == [
        ("d1", "mel", "train"), ("d2", "benign", "test")]
