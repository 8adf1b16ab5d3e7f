"""Data assembly for the grid: synthetic images only ever join training; inputs are checked."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.data import (
    assemble_cell,
    read_corpus,
    read_synthetic,
    sample_synthetic,
    stratified_subsample,
)
from dermaflux.evaluate.grid import build_cells
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic


@pytest.fixture(scope="module")
def small_inputs(ham10000_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-data")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=12)
    synthetic = build_stand_in_synthetic(corpus, root / "synthetic", per_image=2.0)
    return corpus, synthetic, read_corpus(corpus, 32), read_synthetic(synthetic, 32)


def test_no_synthetic_image_enters_val_or_test_in_any_cell(small_inputs):
    _, _, real, synthetic = small_inputs
    cfg = EvaluateConfig(fractions=[0.5, 1.0], ratios=[0, 1, 1.5, 4], seeds=2, tasks=["binary", "multiclass"],
                         synthetic_only=True)
    cells = build_cells(cfg, int((real.split == "train").sum()), has_synthetic=True)
    assert len(cells) == 2 * 2 * 2 * (4 + 1)
    real_split = dict(zip(real.ids.tolist(), real.split.tolist()))
    synthetic_ids = set(synthetic.ids.tolist())
    test_sets = set()
    for cell in cells:
        data = assemble_cell(real, synthetic, cell.task, cell.real_size, cell.ratio, cell.seed,
                             synthetic_only=cell.synthetic_only)
        assert {real_split[i] for i in data.val_ids} == {"val"}
        assert {real_split[i] for i in data.test_ids} == {"test"}
        assert not (set(data.val_ids) | set(data.test_ids)) & synthetic_ids
        train_syn = {i for i, s in zip(data.train_ids, data.train_is_synthetic) if s}
        train_real = [i for i, s in zip(data.train_ids, data.train_is_synthetic) if not s]
        assert train_syn <= synthetic_ids
        assert {real_split[i] for i in train_real} <= {"train"}
        if cell.synthetic_only:
            assert not train_real and len(train_syn) > 0
        else:
            # ratio x adds x synthetic images per real one (the pool here holds 2 per real train image)
            expected = round(cell.ratio * len(train_real))
            assert len(train_syn) == min(expected, len(synthetic_ids))
            assert abs(len(train_real) - cell.real_size) <= len(set(real.labels))  # rounding per class
        assert len(data.train_x) == len(data.train_y) == len(data.train_ids)
        test_sets.add(tuple(data.test_ids))
    assert len(test_sets) == 1  # every cell is scored on the same real test images


def test_a_synthetic_set_claiming_a_test_split_is_refused(small_inputs, tmp_path):
    _, synthetic_dir, _, _ = small_inputs
    shard = sorted((synthetic_dir / "shards").glob("*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    rows[3]["split"] = "test"
    (tmp_path / "shards").mkdir()
    import pyarrow as pa
    from dermaflux.synth.schema import SYNTHETIC_SCHEMA

    bad = tmp_path / "shards" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA), bad)
    with pytest.raises(ValueError, match=r"part-00000\.parquet row 3 .*split 'test'"):
        read_synthetic(tmp_path, 32)


def test_corpus_without_a_needed_column_names_the_file(small_inputs, tmp_path):
    corpus_dir, _, _, _ = small_inputs
    shard = sorted((corpus_dir / "shards").glob("*.parquet"))[0]
    (tmp_path / "shards").mkdir()
    pq.write_table(pq.read_table(shard).drop_columns(["malignant"]), tmp_path / "shards" / "part-0.parquet")
    with pytest.raises(ValueError, match=r"part-0\.parquet: missing column\(s\) \['malignant'\]"):
        read_corpus(tmp_path, 32)


def test_sizes_larger_than_the_train_split_are_refused():
    cfg = EvaluateConfig(sizes=[2500, 5000])
    with pytest.raises(ValueError, match=r"evaluate.sizes \[5000\] exceed the corpus train split \(4000 images\)"):
        build_cells(cfg, 4000, has_synthetic=False)
    # Without a synthetic set only the real-only cells exist.
    cells = build_cells(EvaluateConfig(ratios=[0, 1, 2]), 4000, has_synthetic=False)
    assert {c.ratio for c in cells} == {0.0}


def test_subsampling_keeps_rare_classes_and_matches_the_synthetic_mix():
    rng = np.random.default_rng(0)
    labels = np.array(["nv"] * 90 + ["mel"] * 8 + ["df"] * 2)
    picked = stratified_subsample(labels, 20, rng)
    counts = {c: int((labels[picked] == c).sum()) for c in ("nv", "mel", "df")}
    assert counts == {"nv": 18, "mel": 2, "df": 1}
    syn_labels = np.array(["nv"] * 50 + ["mel"] * 50)
    chosen = sample_synthetic(labels[picked], syn_labels, 40, rng)
    assert len(chosen) == len(set(chosen.tolist())) == 40
    assert (syn_labels[chosen] == "mel").sum() >= 4  # mel share of the real subset, no df in the pool
