"""Small source folders in each corpus reader's layout, built from real HAM10000 images.

Every builder writes into the folder it is given (tmp, never the repo) and returns what the tests
need to know: which ids are duplicates of which, which images share a lesion, which rows are broken.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from dermaflux.testing.ham10000 import METADATA, pick, read_metadata

DERMAMNIST_ORDER = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def reencode(src: Path, dst: Path, size: int | None = None, fmt: str = "JPEG") -> Path:
    """A copy as another dataset would hold it: resized and/or re-compressed (a near duplicate)."""
    image = Image.open(src).convert("RGB")
    if size:
        image = image.resize((size, size), Image.BILINEAR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    image.save(dst, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return dst


def truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def build_ham_subset(ham_dir: Path, root: Path, per_label: int = 6) -> dict:
    """HAM10000 layout (metadata CSV + images in two part folders) with three broken rows."""
    rows = pick(ham_dir, per_label)
    images = ham_dir / "images"
    for k, row in enumerate(rows):
        part = root / f"HAM10000_images_part_{1 + k % 2}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"{row['image_id']}.jpg").write_bytes((images / f"{row['image_id']}.jpg").read_bytes())
    truncated = dict(rows[0], image_id="ISIC_TRUNCATED", lesion_id="HAM_TRUNC")
    truncated_copy(images / f"{rows[0]['image_id']}.jpg", root / "HAM10000_images_part_1" / "ISIC_TRUNCATED.jpg")
    missing = dict(rows[1], image_id="ISIC_MISSING", lesion_id="HAM_MISSING")
    unknown = dict(rows[2], image_id=rows[2]["image_id"] + "_u", dx="lupus", lesion_id="HAM_UNKNOWN")
    (root / "HAM10000_images_part_1" / f"{unknown['image_id']}.jpg").write_bytes(
        (images / f"{rows[2]['image_id']}.jpg").read_bytes())
    all_rows = rows + [truncated, missing, unknown]
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"]
    write_csv(root / METADATA, all_rows, columns)
    return {"root": root, "rows": rows, "input_rows": len(all_rows),
            "broken": {"ISIC_TRUNCATED": "does not decode", "ISIC_MISSING": "not found", unknown["image_id"]: "unknown label"}}


def build_dermamnist(ham_dir: Path, path: Path, size: int = 64, duplicate_of: str | None = None) -> dict:
    """A DermaMNIST-layout .npz (train/val/test, labels 0..6), images are real HAM images at `size` px.

    `duplicate_of`: a HAM image_id also placed in the test split (a cross-source duplicate).
    """
    rows = pick(ham_dir, 3, skip=10)
    images = ham_dir / "images"
    arrays: dict[str, list] = {f"{s}_{kind}": [] for s in ("train", "val", "test") for kind in ("images", "labels")}
    for k, row in enumerate(rows):
        split = ("train", "train", "val", "test")[k % 4] if k % 3 else "train"
        pixels = np.asarray(Image.open(images / f"{row['image_id']}.jpg").convert("RGB").resize((size, size)))
        arrays[f"{split}_images"].append(pixels)
        arrays[f"{split}_labels"].append([DERMAMNIST_ORDER.index(row["dx"])])
    dup_index = None
    if duplicate_of:
        pixels = np.asarray(Image.open(images / f"{duplicate_of}.jpg").convert("RGB").resize((size, size)))
        dup_index = len(arrays["test_images"])
        arrays["test_images"].append(pixels)
        arrays["test_labels"].append([DERMAMNIST_ORDER.index(next(r["dx"] for r in read_metadata(ham_dir)
                                                                  if r["image_id"] == duplicate_of))])
    # One label outside 0..6: MedMNIST never has it, but a hand-made .npz can.
    arrays["train_images"].append(arrays["train_images"][0])
    arrays["train_labels"].append([9])
    out = {k: np.asarray(v, dtype=np.uint8) for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    counts = {s: len(arrays[f"{s}_labels"]) for s in ("train", "val", "test")}
    return {"path": path, "counts": counts, "input_rows": sum(counts.values()),
            "duplicate_id": None if dup_index is None else f"test_{dup_index}", "unknown_id": f"train_{counts['train'] - 1}"}


def build_isic(ham_dir: Path, root: Path, duplicate_of: str) -> dict:
    """ISIC 2019 layout: GroundTruth CSV (one-hot), Metadata CSV, images/<image>.jpg.

    Holds `duplicate_of` (a HAM image) re-encoded under a new ISIC id, the same image again under a
    second id (a within-source duplicate), one UNK row and one row with two diagnoses set.
    """
    columns = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    code_to_col = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC"}
    rows = pick(ham_dir, 2, skip=20)
    images = ham_dir / "images"
    gt, meta = [], []
    for k, row in enumerate(rows):
        image = f"ISIC_9{k:06d}"
        reencode(images / f"{row['image_id']}.jpg", root / "ISIC_2019_Training_Input" / f"{image}.jpg", size=256)
        gt.append({"image": image, **{c: "1.0" if c == code_to_col[row["dx"]] else "0.0" for c in columns}})
        meta.append({"image": image, "age_approx": row["age"], "anatom_site_general": row["localization"],
                     "lesion_id": f"IL_{k:07d}", "sex": row["sex"]})
    dup_dx = next(r["dx"] for r in read_metadata(ham_dir) if r["image_id"] == duplicate_of)
    for image in ("ISIC_8000001", "ISIC_8000002"):
        reencode(images / f"{duplicate_of}.jpg", root / "ISIC_2019_Training_Input" / f"{image}.jpg", size=300)
        gt.append({"image": image, **{c: "1.0" if c == code_to_col[dup_dx] else "0.0" for c in columns}})
        meta.append({"image": image, "lesion_id": f"IL_dup_{image}"})
    reencode(images / f"{rows[0]['image_id']}.jpg", root / "ISIC_2019_Training_Input" / "ISIC_7000001.jpg", size=128)
    gt.append({"image": "ISIC_7000001", **{c: "1.0" if c == "UNK" else "0.0" for c in columns}})
    gt.append({"image": "ISIC_7000002", **{c: "1.0" if c in ("MEL", "NV") else "0.0" for c in columns}})
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", gt, ["image", *columns])
    write_csv(root / "ISIC_2019_Training_Metadata.csv", meta,
              ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"])
    return {"root": root, "input_rows": len(gt), "duplicate_ids": ["ISIC_8000001", "ISIC_8000002"],
            "unknown_id": "ISIC_7000001", "ambiguous_id": "ISIC_7000002"}


def build_pad_ufes(ham_dir: Path, root: Path) -> dict:
    """PAD-UFES-20 layout: metadata.csv + PNGs in imgs_part_1/2; lesion 900 has two images, patient
    PAT_7 has two lesions."""
    rows = pick(ham_dir, 2, skip=30)
    code_to_pad = {"mel": "MEL", "nv": "NEV", "bcc": "BCC", "akiec": "ACK", "bkl": "SEK"}
    rows = [r for r in rows if r["dx"] in code_to_pad]
    images = ham_dir / "images"
    meta = []
    for k, row in enumerate(rows):
        patient = "PAT_7" if k in (0, 1, 2) else f"PAT_{100 + k}"
        lesion = "900" if k in (0, 1) else str(1000 + k)
        img_id = f"{patient}_{lesion}_{k}.png"
        reencode(images / f"{row['image_id']}.jpg", root / f"imgs_part_{1 + k % 2}" / img_id, fmt="PNG")
        meta.append({"patient_id": patient, "lesion_id": lesion, "img_id": img_id, "diagnostic": code_to_pad[row["dx"]],
                     "age": row["age"], "gender": row["sex"].upper(), "region": row["localization"].upper(),
                     "fitspatrick": str(1 + k % 6), "biopsed": "True" if k % 2 else "False", "itch": "False"})
    columns = ["patient_id", "lesion_id", "img_id", "diagnostic", "age", "gender", "region", "fitspatrick",
               "biopsed", "itch"]
    write_csv(root / "metadata.csv", meta, columns)
    same_lesion = [m["img_id"] for m in meta if m["lesion_id"] == "900"]
    same_patient = [m["img_id"] for m in meta if m["patient_id"] == "PAT_7"]
    return {"root": root, "input_rows": len(meta), "same_lesion": same_lesion, "same_patient": same_patient}


def build_generic_csv(ham_dir: Path, root: Path) -> dict:
    """A plain CSV with its own column names and English labels, plus one row whose image is a
    copy of another row's (a within-source duplicate under two ids)."""
    rows = pick(ham_dir, 1, skip=40)
    names = {"mel": "Melanoma", "nv": "nevus", "bcc": "basal cell carcinoma", "akiec": "actinic keratosis",
             "bkl": "benign keratosis", "df": "dermatofibroma", "vasc": "vascular lesion"}
    images = ham_dir / "images"
    table = []
    for k, row in enumerate(rows):
        name = f"case{k:03d}.jpg"
        (root / "pictures").mkdir(parents=True, exist_ok=True)
        (root / "pictures" / name).write_bytes((images / f"{row['image_id']}.jpg").read_bytes())
        table.append({"file": name, "diagnosis": names[row["dx"]], "case": f"c{k}", "years": row["age"]})
    reencode(images / f"{rows[0]['image_id']}.jpg", root / "pictures" / "copy.jpg", size=200)
    table.append({"file": "copy.jpg", "diagnosis": names[rows[0]["dx"]], "case": "c-copy", "years": ""})
    write_csv(root / "cases.csv", table, ["file", "diagnosis", "case", "years"])
    spec = f"csv={root / 'cases.csv'},images={root / 'pictures'},id=file,label=diagnosis,lesion=case,age=years,name=clinic"
    return {"root": root, "spec": spec, "input_rows": len(table), "duplicate_pair": {"case000.jpg", "copy.jpg"}}



def build_binary_external(ham_dir: Path, root: Path, per_label: int = 2, skip: int = 60,
                          exclude_lesions: set[str] = frozenset(), near_copy_of: str | None = None) -> dict:
    """An external test set as a clinic hands it over: `images/` (HAM images resized to 200 px) and
    `labels.csv` with `image,melanoma` only (0/1, with the other spellings a spreadsheet writes).

    `near_copy_of`: a HAM image_id (in the training source) also placed here, resized (a leak to find).
    One row has an unreadable cell (`maybe`). Lesions in `exclude_lesions` are not used.
    """
    rows = [r for r in pick(ham_dir, per_label, skip=skip) if r["lesion_id"] not in exclude_lesions]
    spellings = (("1", "0"), ("1.0", "0.0"), ("true", "false"), ("yes", "no"))
    images, table = ham_dir / "images", []
    for k, row in enumerate(rows):
        name = f"ext_{k:03d}"
        reencode(images / f"{row['image_id']}.jpg", root / "images" / f"{name}.jpg", size=200)
        table.append({"image": name, "melanoma": spellings[k % 4][0 if row["dx"] == "mel" else 1], "dx": row["dx"]})
    if near_copy_of:
        dx = next(r["dx"] for r in read_metadata(ham_dir) if r["image_id"] == near_copy_of)
        reencode(images / f"{near_copy_of}.jpg", root / "images" / "ext_copy.jpg", size=180)
        table.append({"image": "ext_copy", "melanoma": "1" if dx == "mel" else "0", "dx": dx})
    reencode(images / f"{rows[0]['image_id']}.jpg", root / "images" / "ext_bad.jpg", size=200)
    table.append({"image": "ext_bad", "melanoma": "maybe", "dx": ""})
    write_csv(root / "labels.csv", table, ["image", "melanoma"])
    spec = f"csv={root / 'labels.csv'},images={root / 'images'},id=image,label=melanoma,positive=mel,split=test,name=clinic"
    return {"root": root, "spec": spec, "rows": table, "input_rows": len(table), "bad_id": "ext_bad",
            "near_copy_id": "ext_copy" if near_copy_of else None,
            "melanoma": {r["image"] for r in table if r["dx"] == "mel"}}
