"""`dermaflux evaluate` end to end on real Ray: a small grid of cells as Ray tasks, the synthetic-set
assessment with planted copies, the report rendered by headless Chromium, and resume."""

import json
import shutil

import pytest

from dermaflux.cli import main
from dermaflux.config import load_config
from dermaflux.evaluate import stage
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic
from dermaflux.testing.html_render import CHROMIUM, render

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(ham10000_dir, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("evaluate-grid")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=16, seed=2)
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((corpus / "shards").glob("*.parquet"))).to_pylist()
    train_ids = [r["id"] for r in rows if r["split"] == "train"]
    planted = {train_ids[1]: "exact", train_ids[20]: "resized_jpeg"}
    synthetic = build_stand_in_synthetic(corpus, root / "synthetic", per_image=1.0, planted=planted)
    out = root / "report"
    cfg = load_config("tiny", extra={"evaluate": {
        "corpus": str(corpus), "synthetic": str(synthetic), "out": str(out),
        "fractions": [0.5, 1.0], "ratios": [0, 1], "seeds": 2, "epochs": 2, "synthetic_only": True,
        "parallel_cells": 2, "grid_images_per_class": 3,
    }})
    summary = stage.run(cfg)
    return summary, out, corpus, synthetic, planted


def test_grid_runs_as_ray_tasks_and_writes_results(evaluated):
    summary, out, _, _, _ = evaluated
    assert summary["failed"] == [] and summary["cells"] == 2 * 2 * 3 and summary["ran"] == 12
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 12 and len(list((out / "cells").glob("*.json"))) == 12
    test_sets = {tuple(c["test_label_counts"]) for c in results["cells"]}
    assert len(test_sets) == 1  # the same real test split for every cell
    rows = {(r["real_size"], r["ratio"], r["synthetic_only"]): r for r in results["summary"]}
    assert len(rows) == 6
    for row in rows.values():
        assert row["seeds"] == 2 and 0 <= row["balanced_accuracy_mean"] <= 1 and row["balanced_accuracy_std"] >= 0
        if row["ratio"] == 0 and not row["synthetic_only"]:
            assert row["train_synthetic"] == 0 and row["balanced_accuracy_gain"] == 0
        elif row["synthetic_only"]:
            assert row["train_real"] == 0 and row["train_synthetic"] > 0
        else:
            assert row["train_synthetic"] == row["train_real"]
    assert (out / "config.yaml").exists() and (out / "plots" / "balanced_accuracy.png").stat().st_size > 1000


def test_assessment_flags_exactly_the_planted_copies(evaluated):
    _, out, _, _, planted = evaluated
    assessment = json.loads((out / "results.json").read_text())["assessment"]
    flagged = {f["query_id"]: f["pixel_nearest_id"] for f in assessment["memorisation"]["flagged"]}
    assert set(flagged.values()) == set(planted)
    assert all(q.startswith("synthetic:planted:") for q in flagged)
    assert assessment["memorisation"]["control_real_val_flagged"] == 0
    assert assessment["fid"] > assessment["fid_real_val_vs_test"] >= 0
    assert 0 <= assessment["precision"] <= 1 and 0 <= assessment["recall"] <= 1
    assert "feature_network" in assessment and assessment["feature_network"]["pretrained_weights"] is False
    memorisation_csv = (out / "memorisation.csv").read_text().splitlines()
    assert len(memorisation_csv) == 1 + assessment["synthetic_images"]


@pytest.mark.skipif(shutil.which(CHROMIUM) is None and not __import__("os").path.exists(CHROMIUM),
                    reason="chromium is not installed (scripts/setup-env.sh installs it)")
def test_report_renders_in_headless_chromium(evaluated):
    _, out, _, _, planted = evaluated
    page = render(out / "report.html")
    tables = {t["id"]: t for t in page["tables"]}
    assert {"summary", "recall", "quality", "near-copies"} <= set(tables)
    assert tables["summary"]["rows"] == 1 + 6 and all(t["height"] > 0 for t in tables.values())
    assert tables["near-copies"]["rows"] == 1 + len(planted)
    images = page["images"]
    broken = [i["src"] for i in images if i["width"] == 0 or i["shown"] == 0]
    assert not broken, broken
    srcs = [i["src"] for i in images]
    assert sum(s.startswith("plots/") for s in srcs) == 2
    assert sum(s.startswith("images/near_copies/") for s in srcs) == 2 * len(planted)
    assert any(s.startswith("images/real/") for s in srcs) and any(s.startswith("images/synthetic/") for s in srcs)
    md = (out / "report.md").read_text()
    assert "| task |" in md and "plots/balanced_accuracy.png" in md


def test_rerun_through_the_cli_resumes_without_training(evaluated, capsys):
    _, out, corpus, synthetic, _ = evaluated
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    code = main(["evaluate", "--corpus", str(corpus), "--synthetic", str(synthetic), "--out", str(out),
                 "--fractions", "0.5,1", "--ratios", "0,1", "--seeds", "2", "--epochs", "2", "--synthetic-only",
                 "--set", "evaluate.grid_images_per_class=3"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.split("\nreport:")[0])
    assert printed["ran"] == 0 and printed["cells"] == 12
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    # A third seed with --report-only trains nothing and says which cells are missing.
    code = main(["evaluate", "--corpus", str(corpus), "--synthetic", str(synthetic), "--out", str(out),
                 "--fractions", "0.5,1", "--ratios", "0,1", "--seeds", "3", "--epochs", "2", "--synthetic-only",
                 "--report-only", "--set", "evaluate.grid_images_per_class=3"])
    printed = json.loads(capsys.readouterr().out.split("\nreport:")[0])
    assert code == 0 and printed["ran"] == 0 and printed["not_run"] == 6
    assert "were not run" in (out / "report.md").read_text()
    # A different training setting is a different run: refused, not mixed in.
    assert main(["evaluate", "--corpus", str(corpus), "--out", str(out), "--epochs", "5"]) == 2
