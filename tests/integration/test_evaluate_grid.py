"""`dermaflux evaluate` end to end on real Ray: a small grid of cells as Ray tasks scored on an internal
and an external test set, the paired comparisons and verdicts, the synthetic-set assessment with
planted copies and adherence, the report rendered by headless Chromium, and resume."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermaflux.cli import main
from dermaflux.config import load_config
from dermaflux.corpus.schema import CORPUS_SCHEMA
from dermaflux.evaluate import stage
from dermaflux.testing.ham10000 import build_split_corpus, build_stand_in_synthetic
from dermaflux.testing.html_render import CHROMIUM, render

pytestmark = pytest.mark.integration

STEPS = 8


def add_external_source(corpus, name: str = "clinic", count: int = 16) -> int:
    """Append a test-only source read from a benign/malignant 0/1 column (no diagnosis: label null,
    melanoma unknown), in the layout the curate side writes after issue 13. Returns its row count."""
    shard = sorted((corpus / "shards").glob("*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    donors = [r for r in rows if r["split"] == "val"][:count]
    external = [{**r, "id": f"{name}:{i}", "source": name, "split": "test", "label": None, "melanoma": None}
                for i, r in enumerate(donors)]
    pq.write_table(pa.Table.from_pylist([{**r, "melanoma": r["label"] == "mel"} for r in rows] + external,
                                        schema=CORPUS_SCHEMA), shard)
    return len(external)


@pytest.fixture(scope="module")
def evaluated(ham10000_dir, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("evaluate-grid")
    corpus = build_split_corpus(ham10000_dir, root / "corpus", per_class=16, seed=2)
    train_ids = [r["id"] for r in pq.read_table(sorted((corpus / "shards").glob("*.parquet"))).to_pylist()
                 if r["split"] == "train"]
    planted = {train_ids[1]: "exact", train_ids[20]: "resized_jpeg"}
    synthetic = build_stand_in_synthetic(corpus, root / "synthetic", per_image=1.0, planted=planted)
    external = add_external_source(corpus)
    out = root / "report"
    cfg = load_config("tiny", extra={"evaluate": {
        "corpus": str(corpus), "synthetic": str(synthetic), "out": str(out),
        "fractions": [0.5, 1.0], "ratios": [0, 1], "seeds": 2, "steps": STEPS, "validations": 2,
        "synthetic_only": True, "parallel_cells": 2, "grid_images_per_class": 3, "bootstrap": 300,
        "adherence_max_images": 12, "subgroup_min_per_class": 3,
    }})
    summary = stage.run(cfg)
    return summary, out, corpus, synthetic, planted, external


def test_grid_runs_as_ray_tasks_and_scores_every_test_set_apart(evaluated):
    summary, out, _, _, _, external = evaluated
    assert summary["failed"] == [] and summary["cells"] == 2 * 2 * 3 and summary["ran"] == 12
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 12 and len(list((out / "cells").glob("*.json"))) == 12
    assert results["inputs"]["test_sets"]["clinic"] == external
    for cell in results["cells"]:
        assert set(cell["test_sets"]) == {"internal", "clinic"} and cell["training"]["optimizer_steps"] == STEPS
        assert cell["test_sets"]["clinic"]["images"] == external  # binary: the malignant column scores them all
        predictions = pq.read_table(out / "cells" / f"{cell['id']}.parquet").to_pydict()
        assert {"id", "source", "label", "split", "test_set", "target", "score"} <= set(predictions)
        test_rows = [t for t, s in zip(predictions["test_set"], predictions["split"]) if s == "test"]
        assert test_rows.count("clinic") == external and test_rows.count("internal") == cell["test_sets"][
            "internal"]["images"]
        assert {s for s, t in zip(predictions["source"], predictions["test_set"]) if t == "clinic"} == {"clinic"}
    assert len({tuple(c["test_sets"]["internal"]["label_counts"]) for c in results["cells"]}) == 1
    rows = {(r["real_size"], r["ratio"], r["synthetic_only"], r["test_set"]): r for r in results["summary"]}
    assert len(rows) == 12
    for (size, ratio, synthetic_only, _), row in rows.items():
        assert row["seeds"] == 2 and 0 <= row["auroc_mean"] <= 1 and row["auroc_std"] >= 0
        if synthetic_only:
            assert row["train_real"] == 0 and row["train_synthetic"] > 0
        elif ratio == 0:
            assert row["train_synthetic"] == 0 and row["train_real"] == size
        else:
            assert row["train_synthetic"] == row["train_real"] == size
    assert (out / "config.yaml").exists() and (out / "plots" / "delta_auroc.png").stat().st_size > 1000


def test_pairs_are_compared_with_cis_adjusted_p_values_and_verdicts(evaluated):
    _, out, _, _, _, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    comparisons = results["comparisons"]
    # two sizes x the 1:1 ratio x two test sets; synthetic-only cells have no real-only pair
    assert sorted((c["real_size"], c["test_set"]) for c in comparisons) == sorted(
        (s, t) for s in {c["real_size"] for c in results["cells"]} for t in ("internal", "clinic"))
    for c in comparisons:
        assert c["seeds"] == [0, 1] and c["arm"] == "synthetic"
        for metric in ("auroc", "balanced_accuracy"):
            low, high = c[metric]["ci"]
            assert low <= c[metric]["delta"] <= high and c[metric]["p_value"] <= c[metric]["p_adjusted"] <= 1
            assert c[metric]["family_size"] == len(comparisons) and c[metric]["resolvable"] > 0
        assert c["auroc"]["delong"]["se_seeds"] is not None  # two seeds: a spread to add
    verdicts = results["verdicts"]
    assert len(verdicts) == 4 and {v["verdict"] for v in verdicts} <= {"gain", "loss", "mixed", "no detectable effect"}
    md = (out / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Paired comparisons") < md.index("## Every cell group")
    # Results by subgroup: every comparison broken down, the ITA measured on the real test images.
    sub = results["subgroups"]
    assert {(r["real_size"], r["test_set"]) for r in sub["rows"]} == {(c["real_size"], c["test_set"])
                                                                       for c in comparisons}
    tones = sub["coverage"]["internal"]["skin_tone"]
    assert sum(n for t, n in tones.items() if t != "unknown") >= 0.8 * sum(tones.values())
    assert sub["coverage"]["internal"]["modality"] == {"dermoscopic": sum(tones.values())}
    for r in sub["rows"]:
        assert r["resolvable"] == (min(r["per_class"].values()) >= 3) and ("auroc" in r) == r["resolvable"]
    assert "## Results by subgroup" in md and "not resolvable (< 3 per class)" in md
    assert md.count("real images: ") >= 4 and "Preset: tiny" in md and "Generator: stand-in" in md
    assert str(out.parent) not in md and str(out.parent) not in (out / "report.html").read_text()


def test_assessment_flags_exactly_the_planted_copies_and_measures_adherence(evaluated):
    _, out, _, _, planted, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    assessment = results["assessment"]
    flagged = {f["query_id"]: f["pixel_nearest_id"] for f in assessment["memorisation"]["flagged"]}
    assert set(flagged.values()) == set(planted)
    assert all(q.startswith("synthetic:planted:") for q in flagged)
    assert assessment["memorisation"]["control_real_val_flagged"] == 0
    assert assessment["fid"] > assessment["fid_real_val_vs_test"] >= 0
    assert 0 <= assessment["precision"] <= 1 and 0 <= assessment["recall"] <= 1
    assert "feature_network" in assessment and assessment["feature_network"]["pretrained_weights"] is False
    memorisation_csv = (out / "memorisation.csv").read_text().splitlines()
    assert len(memorisation_csv) == 1 + assessment["synthetic_images"]
    adherence = results["adherence"]
    assert adherence["images"] == 12 and adherence["attributes"]["diagnosis"]["n"] == 12
    assert adherence["attributes"]["colours"]["n"] == 0  # the stand-in set requested no colours
    assert len((out / "adherence.csv").read_text().splitlines()) == 1 + 12


@pytest.mark.skipif(shutil.which(CHROMIUM) is None and not __import__("os").path.exists(CHROMIUM),
                    reason="chromium is not installed (scripts/setup-env.sh installs it)")
def test_report_renders_in_headless_chromium(evaluated):
    _, out, _, _, planted, _ = evaluated
    page = render(out / "report.html")
    tables = {t["id"]: t for t in page["tables"]}
    assert {"summary", "comparisons", "recall", "adherence", "quality", "near-copies", "subgroups"} <= set(tables)
    assert tables["summary"]["rows"] == 1 + 12 and tables["comparisons"]["rows"] == 1 + 4
    assert all(t["height"] > 0 for t in tables.values())
    assert tables["near-copies"]["rows"] == 1 + len(planted)
    images = page["images"]
    broken = [i["src"] for i in images if i["width"] == 0 or i["shown"] == 0]
    assert not broken, broken
    srcs = [i["src"] for i in images]
    has_subgroup_plot = json.loads((out / "results.json").read_text())["subgroups"]["plot"] is not None
    assert sum(s.startswith("plots/") for s in srcs) == 3 + has_subgroup_plot
    assert sum(s.startswith("images/near_copies/") for s in srcs) == 2 * len(planted)
    assert any(s.startswith("images/real/") for s in srcs) and any(s.startswith("images/synthetic/") for s in srcs)


def test_rerun_through_the_cli_resumes_without_training(evaluated, capsys):
    _, out, corpus, synthetic, _, _ = evaluated
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*")}
    flags = ["evaluate", "--corpus", str(corpus), "--synthetic", str(synthetic), "--out", str(out),
             "--fractions", "0.5,1", "--ratios", "0,1", "--steps", str(STEPS), "--synthetic-only",
             "--set", "evaluate.grid_images_per_class=3", "--set", "evaluate.validations=2",
             "--set", "evaluate.bootstrap=300", "--set", "evaluate.adherence_max_images=12"]
    assert main([*flags, "--seeds", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\nreport:")[0])
    assert printed["ran"] == 0 and printed["cells"] == 12
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*")}
    # A third seed with --report-only trains nothing and says which cells are missing.
    assert main([*flags, "--seeds", "3", "--report-only"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\nreport:")[0])
    assert printed["ran"] == 0 and printed["not_run"] == 6
    assert "were not run" in (out / "report.md").read_text()
    # A different training setting is a different run: refused, not mixed in.
    assert main(["evaluate", "--corpus", str(corpus), "--out", str(out), "--steps", str(STEPS + 1)]) == 2


def test_the_synthetic_only_cells_stay_out_of_the_paired_statistics(evaluated):
    _, out, _, _, _, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    assert not [c for c in results["comparisons"] if c["ratio"] == 0]
    synonly = [c for c in results["cells"] if c["synthetic_only"]]
    assert synonly and all(np.isfinite(c["test_sets"]["internal"]["metrics"]["auroc"]) for c in synonly)
