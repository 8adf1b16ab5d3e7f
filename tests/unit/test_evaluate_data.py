"""Data assembly for the grid: synthetic images only ever join training; inputs are checked."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate import controls
from dermaflux.evaluate.data import (
    assemble_cell,
    find_test_sets,
    read_corpus,
    read_synthetic,
    sample_synthetic,
    stratified_subsample,
    targets,
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
        assert {real_split[i] for i in data.test_ids} == {"test"} and list(data.tests) == ["internal"]
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
            assert len(train_syn) == min(expected, len(synthetic_ids)) and data.synthetic_wanted == expected
            assert len(train_real) == cell.real_size  # exactly the size asked for
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
    assert counts == {"nv": 17, "mel": 2, "df": 1}  # exactly 20: largest remainders, df keeps its one image
    for count in (3, 7, 33, 99):
        assert len(stratified_subsample(labels, count, rng)) == count
    syn_labels = np.array(["nv"] * 50 + ["mel"] * 50)
    chosen = sample_synthetic(labels[picked], syn_labels, 40, rng)
    assert len(chosen) == len(set(chosen.tolist())) == 40
    assert (syn_labels[chosen] == "mel").sum() >= 4  # mel share of the real subset, no df in the pool


def test_sizes_give_exactly_n_real_images_for_every_seed(small_inputs):
    _, _, real, _ = small_inputs
    n_train = int((real.split == "train").sum())
    for size in (7, 20, 31, n_train):
        for seed in range(3):
            data = assemble_cell(real, None, "multiclass", size, 0.0, seed)
            assert len(data.train_ids) == len(set(data.train_ids)) == size


def _with_external_source(corpus_dir: Path, out: Path) -> Path:
    """The corpus plus an external, test-only source ("clinic") read from a 0/1 melanoma column: 1 is
    label mel, 0 has no diagnosis (label and malignant null), as the curate side writes after issue 13."""
    import pyarrow as pa

    from dermaflux.corpus.schema import CORPUS_SCHEMA

    rows = pq.read_table(sorted((corpus_dir / "shards").glob("*.parquet"))).to_pylist()
    external = []
    for i, r in enumerate([r for r in rows if r["split"] == "val"][:12]):
        is_mel = r["label"] == "mel"
        external.append({**r, "id": f"clinic:{i}", "source": "clinic", "split": "test",
                         "label": "mel" if is_mel else None, "malignant": True if is_mel else None, "melanoma": is_mel})
    for r in rows:
        r["melanoma"] = r["label"] == "mel"
    (out / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows + external, schema=CORPUS_SCHEMA), out / "shards" / "part-00000.parquet")
    return out


def test_each_test_source_is_scored_apart_and_rows_without_a_diagnosis_are_counted(small_inputs, tmp_path):
    corpus_dir, _, _, _ = small_inputs
    real = read_corpus(_with_external_source(corpus_dir, tmp_path / "corpus"), 32)
    sets = find_test_sets(real)
    assert list(sets) == ["internal", "clinic"] and len(sets["clinic"]) == 12
    assert set(real.source[sets["internal"]].tolist()) == {"ham10000"}
    positives = int(sum(real.labels[sets["clinic"]] == "mel"))
    assert 0 < positives < 12
    multiclass = assemble_cell(real, None, "multiclass", 20, 0.0, 0)
    clinic = multiclass.tests["clinic"]  # only the melanomas have a diagnosis; the rest are counted out
    assert len(clinic.y) == positives and clinic.left_out == 12 - positives
    melanoma = assemble_cell(real, None, "melanoma", 20, 0.0, 0)
    assert len(melanoma.tests["clinic"].y) == 12 and melanoma.tests["clinic"].left_out == 0
    assert melanoma.tests["clinic"].y.sum() == positives
    binary = assemble_cell(real, None, "binary", 20, 0.0, 0)
    assert binary.tests["clinic"].left_out == 12 - positives  # malignant unknown for "not melanoma"
    mel = targets(real, "melanoma", ("other", "melanoma"))
    known = np.array([lab is not None for lab in real.labels])
    assert (mel[real.labels == "mel"] == 1).all() and (mel[(real.labels != "mel") & known] == 0).all()
    # An older corpus without the melanoma column gets it from the label.
    old = read_corpus(corpus_dir, 32)
    assert [m for m, lab in zip(old.melanoma, old.labels) if lab == "mel"] and all(
        m == (lab == "mel") for m, lab in zip(old.melanoma, old.labels))


def test_a_train_row_without_a_diagnosis_is_refused(small_inputs, tmp_path):
    corpus_dir, _, _, _ = small_inputs
    folder = _with_external_source(corpus_dir, tmp_path / "corpus")
    shard = folder / "shards" / "part-00000.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    first_train = next(i for i, r in enumerate(rows) if r["split"] == "train")
    rows[first_train]["label"] = None
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), shard)
    with pytest.raises(ValueError, match=rf"row {first_train} .*a train row needs a label"):
        read_corpus(folder, 32)


def test_controls_never_give_a_cell_its_own_real_images_and_read_back_as_a_synthetic_set(small_inputs, tmp_path):
    corpus_dir, _, real, _ = small_inputs
    sets = controls.build_controls(real)
    extra = controls.control_table(real, sets["real-extra"])
    shuffled = controls.control_table(real, sets["shuffled"])
    assert (shuffled.origin == extra.origin).all() and sorted(shuffled.labels) == sorted(extra.labels)
    assert (shuffled.labels != extra.labels).mean() > 0.3  # permuted, same class mix
    n_train = int((real.split == "train").sum())
    for seed in range(3):
        data = assemble_cell(real, extra, "multiclass", n_train // 3, 1.0, seed)
        real_ids = {i for i, s in zip(data.train_ids, data.train_is_synthetic) if not s}
        made_from = {i.split(":", 2)[2] for i, s in zip(data.train_ids, data.train_is_synthetic) if s}
        assert len(made_from) == n_train // 3 and not made_from & real_ids
        baseline = assemble_cell(real, None, "multiclass", n_train // 3, 0.0, seed)
        assert set(baseline.train_ids) == real_ids  # the control pairs with the same real subset
    # The whole train split as real subset leaves nothing to add: a shortfall, not a leak.
    full = assemble_cell(real, extra, "binary", n_train, 1.0, 0)
    assert full.synthetic_shortfall == n_train and not full.train_is_synthetic.any()
    folder = controls.write_control_set(tmp_path / "shuffled", corpus_dir, real, sets["shuffled"])
    back = controls.with_origin(read_synthetic(folder, 32), json.loads((folder / "manifest.json").read_text()))
    assert set(back.split) == {"synthetic"} and sorted(back.ids) == sorted(shuffled.ids)
    order = np.argsort(back.ids)
    assert (back.origin[order] == shuffled.origin[np.argsort(shuffled.ids)]).all()
    assert (back.labels[order] == shuffled.labels[np.argsort(shuffled.ids)]).all()


def test_the_matched_control_copies_the_synthetic_cells_class_mix_and_duplicates_where_a_class_runs_out(small_inputs):
    _, _, real, synthetic = small_inputs
    extra = controls.control_table(real, controls.build_controls(real)["real-extra"])
    # A set balanced over classes (3 per diagnosis), as `generate --per-class` makes: at 1:4 the pool
    # runs short of the real subset's majority class and the draw fills from the others.
    balanced = synthetic.take(np.concatenate([np.flatnonzero(synthetic.labels == lab)[:3]
                                              for lab in sorted(set(synthetic.labels))]))
    n_train = int((real.split == "train").sum())
    size = n_train // 4
    for seed in range(2):
        syn = assemble_cell(real, balanced, "melanoma", size, 4.0, seed)
        matched = assemble_cell(real, extra, "melanoma", size, 4.0, seed, mix_of=balanced)
        assert matched.train_ids[:size] == syn.train_ids[:size]  # the same real subset
        added = lambda d: sorted(d.train_labels[d.train_is_synthetic].tolist())  # noqa: E731
        real_mix = sorted(syn.train_labels[~syn.train_is_synthetic].tolist())
        assert added(matched) == added(syn) != sorted(real_mix * 4)[: len(added(syn))]
        made_from = [i.split(":", 2)[2] for i, s in zip(matched.train_ids, matched.train_is_synthetic) if s]
        assert not set(made_from) & set(matched.train_ids[:size])  # never the cell's own images
        assert matched.synthetic_duplicated == len(made_from) - len(set(made_from)) == 0
        assert matched.synthetic_wanted == syn.train_is_synthetic.sum() and matched.synthetic_shortfall == 0
    # Ten times the synthetic cell's images of each class: the real pool of a class runs out, and its
    # images are used again, as evenly as possible, and counted.
    big = balanced.take(np.repeat(np.arange(len(balanced)), 10))
    big.ids = np.array([f"{i}#{k}" for k, i in enumerate(big.ids)], dtype=object)
    syn = assemble_cell(real, big, "binary", size, 4.0, 0)
    matched = assemble_cell(real, extra, "binary", size, 4.0, 0, mix_of=big)
    made_from = [i.split(":", 2)[2] for i, s in zip(matched.train_ids, matched.train_is_synthetic) if s]
    assert matched.synthetic_duplicated == len(made_from) - len(set(made_from)) > 0
    assert added(matched) == added(syn)
    label_of = dict(zip(real.ids.tolist(), real.labels.tolist()))
    for label in set(label_of[i] for i in made_from):
        counts = np.unique([i for i in made_from if label_of[i] == label], return_counts=True)[1]
        assert counts.max() - counts.min() <= 1, label
    with pytest.raises(ValueError, match="matched control"):
        from dermaflux.evaluate.grid import Cell, run_cell

        run_cell(Cell("binary", "resnet10t", size, 4.0, 0, arm="matched"), real, extra, EvaluateConfig())
    cells = build_cells(EvaluateConfig(ratios=[0, 4], seeds=1, controls=True), n_train, has_synthetic=True)
    assert {c.arm for c in cells} == {"synthetic", "real-extra", "shuffled", "matched"}
    assert "matched" not in {c.arm for c in build_cells(EvaluateConfig(controls=True), n_train, has_synthetic=False)}


def test_benign_malignant_rows_train_the_binary_task_and_the_others_say_how_many_they_leave_out(small_inputs, tmp_path):
    """Rows labelled only `benign`/`malignant` (in every split): the binary task trains and scores on
    them; the multiclass task leaves them out of its pool and test sets; the melanoma task leaves
    out only the bare `malignant` ones (a benign lesion is not a melanoma)."""
    import pyarrow as pa

    from dermaflux.corpus.schema import CORPUS_SCHEMA

    corpus_dir, _, _, _ = small_inputs
    rows = pq.read_table(sorted((corpus_dir / "shards").glob("*.parquet"))).to_pylist()
    coarse = []
    for i, r in enumerate(rows):
        r["melanoma"] = r["label"] == "mel"
        if i % 3 == 0:  # a third of every split: the source says only benign or malignant
            malignant = bool(r["malignant"])
            coarse.append({**r, "id": f"bm:{i}", "source": "bm", "label": "malignant" if malignant else "benign",
                           "melanoma": None if malignant else False})
    (tmp_path / "corpus" / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows + coarse, schema=CORPUS_SCHEMA), tmp_path / "corpus" / "shards" / "p.parquet")
    real = read_corpus(tmp_path / "corpus", 32)
    coarse_test = [i for i in find_test_sets(real)["internal"] if real.labels[i] in ("benign", "malignant")]
    bare_malignant = sum(real.labels[i] == "malignant" for i in coarse_test)
    assert coarse_test and bare_malignant

    binary = assemble_cell(real, None, "binary", 60, 0.0, 0)
    assert {lab for lab in binary.train_labels} & {"benign", "malignant"} and binary.tests["internal"].left_out == 0
    multiclass = assemble_cell(real, None, "multiclass", 40, 0.0, 0)
    assert not {"benign", "malignant"} & set(multiclass.classes) and (multiclass.train_y >= 0).all()
    assert not {"benign", "malignant"} & set(multiclass.train_labels.tolist())
    assert multiclass.tests["internal"].left_out == len(coarse_test)
    melanoma = assemble_cell(real, None, "melanoma", 40, 0.0, 0)
    assert melanoma.tests["internal"].left_out == bare_malignant and (melanoma.train_y >= 0).all()
