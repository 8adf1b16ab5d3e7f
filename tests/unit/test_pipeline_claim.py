"""The pipeline's run folder: never inside, or around, a dataset the run curates (refused before Ray starts)."""

import shutil

import pytest

from dermaflux.config import load_config
from dermaflux.core.artifacts import OutputConflict
from dermaflux.pipeline import run_pipeline


def test_run_folder_inside_a_dataset_is_refused(ham10000_dir, tmp_path):
    ham = tmp_path / "data" / "ham10000"
    (ham / "images").mkdir(parents=True)
    with open(ham10000_dir / "HAM10000_metadata.csv") as fh:
        head = [next(fh) for _ in range(3)]
    (ham / "HAM10000_metadata.csv").write_text("".join(head))
    for line in head[1:]:
        name = f"{line.split(',')[1]}.jpg"
        shutil.copyfile(ham10000_dir / "images" / name, ham / "images" / name)
    out = ham / "run"
    settings = {"data": str(tmp_path / "data"), "out": str(out), "stages": ["curate"]}
    cfg = load_config("tiny", extra={"pipeline": settings})
    with pytest.raises(OutputConflict, match=f"{out} lies inside the input {ham}"):
        run_pipeline(cfg, capacity_check=False)
    assert not out.exists()
