"""Curate on real Ray with a user's data at stake: --force never deletes an input or a foreign
folder, a run that keeps nothing fails with the reasons, and a re-run sees a replaced image."""

import csv
import json
import logging
import os
from pathlib import Path

import pytest

from dermaflux.cli import main
from dermaflux.config import load_config
from dermaflux.corpus import stage
from dermaflux.testing.ham10000 import read_metadata, write_ham_folder

pytestmark = pytest.mark.integration


def small_ham(ham_dir: Path, dest: Path, count: int) -> list[dict]:
    """A HAM10000-layout copy of `count` real images, one lesion each, labels mixed (never the shared data)."""
    rows = read_metadata(ham_dir, by_image_id=True)
    picked, lesions = [], set()
    for row in rows[::97]:
        if row["lesion_id"] not in lesions:
            lesions.add(row["lesion_id"])
            picked.append(row)
    picked = picked[:count]
    write_ham_folder(ham_dir, dest, picked)
    return picked


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def quarantine_reasons(out: Path) -> dict[str, str]:
    with open(out / "quarantine.csv", newline="") as fh:
        return {r["original_id"]: r["reason"] for r in csv.DictReader(fh)}


def test_force_refuses_an_input_and_a_foreign_folder(ray_local, ham10000_dir, tmp_path, capsys):
    data = tmp_path / "ham"
    small_ham(ham10000_dir, data, 4)
    before = snapshot(data)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    for out, refusal in [(data, f"{data} is the input {data}"),
                         (tmp_path / "link", f"{tmp_path / 'link'} is the input {data} (resolved: {data}, {data})"),
                         (data / "images", f"{data / 'images'} lies inside the input {data}")]:
        assert main(["curate", "--source", f"ham10000={data}", "--out", str(out), "--force"]) == 2
        assert refusal in capsys.readouterr().err
        assert snapshot(data) == before

    foreign = tmp_path / "mine"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "photos" / "holiday.jpg").write_bytes(b"not dermaflux's")
    (foreign / "notes.txt").write_text("keep me")
    mine = snapshot(foreign)
    assert main(["curate", "--source", f"ham10000={data}", "--out", str(foreign), "--force"]) == 2
    assert "not empty and was not written by dermaflux" in capsys.readouterr().err
    assert snapshot(foreign) == mine and snapshot(data) == before


def test_a_run_that_keeps_nothing_fails_with_the_reasons(ray_local, ham10000_dir, tmp_path, capsys):
    data = tmp_path / "ham"
    rows = small_ham(ham10000_dir, data, 3)
    images = [data / "images" / f"{row['image_id']}.jpg" for row in rows]
    images[0].write_bytes(b"")
    images[1].write_bytes(b"<html>not found</html>")
    images[2].write_bytes(images[2].read_bytes()[:300])
    out = tmp_path / "corpus"
    code = main(["curate", "--source", f"ham10000={data}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"curate kept no row: 3 input rows, 0 duplicates, 3 quarantined (bad_image 3); e.g. {data}" in err
    assert f"every quarantined row is listed in {out / 'quarantine.csv'}" in err
    reasons = quarantine_reasons(out)
    assert reasons[rows[0]["image_id"]].startswith("image does not decode: empty file (0 bytes)")
    assert reasons[rows[1]["image_id"]].startswith("image does not decode: not an image (22 bytes starting b'<html>")
    assert reasons[rows[2]["image_id"]].startswith("image does not decode (OSError: ")
    assert not (out / "manifest.json").exists()


def test_images_above_max_pixels_are_quarantined(ray_local, ham10000_dir, tmp_path, capsys):
    data = tmp_path / "ham"
    rows = small_ham(ham10000_dir, data, 2)
    out = tmp_path / "corpus"
    # The real images (224 x 224 = 50,176 px) are above this limit; the scan tasks apply it.
    code = main(["curate", "--source", f"ham10000={data}", "--out", str(out), "--set", "curate.max_pixels=50000"])
    assert code == 2 and "2 quarantined (bad_image 2)" in capsys.readouterr().err
    reasons = quarantine_reasons(out)
    for row in rows:
        assert reasons[row["image_id"]].startswith(
            "image cannot be read within curate.max_pixels: 224x224 px = 0.1 MP, above the limit of 0.1 MP")


def test_a_replaced_image_is_scanned_again(ray_local, ham10000_dir, tmp_path, caplog):
    data = tmp_path / "ham"
    rows = small_ham(ham10000_dir, data, 6)
    image = data / "images" / f"{rows[2]['image_id']}.jpg"
    good, stat = image.read_bytes(), image.stat()
    # Broken and mended in place, same size, mtime put back: only the file's ctime tells.
    image.write_bytes(bytes(len(good)))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cfg = load_config("tiny", extra={"curate": {"sources": [f"ham10000={data}"], "out": str(tmp_path / "corpus")}})
    first = stage.run(cfg)
    assert first["quarantined"] == 1 and rows[2]["image_id"] in quarantine_reasons(tmp_path / "corpus")

    image.write_bytes(good)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.INFO, logger="dermaflux.corpus.stage"):
        mended = stage.run(cfg)
    assert mended["resumed"] and mended["quarantined"] == 0 and mended["kept"] == first["kept"] + 1
    assert "1 of 6 images are new or changed" in caplog.text
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["reconciliation"]["shard_rows"] == mended["kept"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dermaflux.corpus.stage"):
        again = stage.run(cfg)
    assert "no image changed" in caplog.text and "shards: already written" in caplog.text
    assert again["kept"] == mended["kept"]
