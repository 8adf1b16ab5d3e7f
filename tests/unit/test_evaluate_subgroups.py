"""Results by subgroup from saved per-image predictions: counts, CIs, the worst subgroup, and a
deliberately starved subgroup marked "not resolvable" instead of scored."""

from __future__ import annotations

import numpy as np
import pytest

from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.subgroups import age_band, analyse

N = 240
CLASSES = ["benign", "malignant"]


def make_grid(seed: int = 0):
    """Two seeds of a real-only cell and a 1:1 cell on one test set of N images. Skin tone: 'brown'
    is starved (4 malignant images only); on 'light' the added images help a lot, elsewhere not."""
    rng = np.random.default_rng(seed)
    target = np.tile([0, 1], N // 2)
    tone = np.where(np.arange(N) < 100, "light", "intermediate").astype(object)
    tone[[1, 3, 5, 7]] = "brown"  # four malignant images: below any sensible per-class minimum
    sex = np.where(np.arange(N) % 4 < 2, "male", "female")
    groups = {f"img{i}": {"skin_tone": tone[i], "sex": sex[i], "source": "ham10000"} for i in range(N)}
    cells, predictions = [], {}
    for s in range(2):
        for ratio in (0, 1):
            noise = 1.6 if ratio == 0 else 1.6 - 1.2 * (tone == "light")
            score = 1 / (1 + np.exp(-(2 * target - 1 + rng.normal(0, noise, N))))
            cid = f"c{s}r{ratio}"
            cells.append({"id": cid, "task": "binary", "model": "m", "real_size": 100, "seed": s, "ratio": ratio,
                          "synthetic_only": False, "arm": "synthetic", "test_sets": ["internal"],
                          "classes": CLASSES, "threshold": 0.5, "train_synthetic": 100 * ratio, "train_real": 100})
            predictions[cid] = {"id": [f"img{i}" for i in range(N)], "split": ["test"] * N,
                                "test_set": ["internal"] * N, "target": target.tolist(),
                                "score_benign": (1 - score).tolist(), "score_malignant": score.tolist()}
    return cells, predictions, groups


def test_starved_subgroup_is_counted_not_scored_and_the_rest_get_cis():
    cells, predictions, groups = make_grid()
    cfg = EvaluateConfig(bootstrap=300, subgroup_min_per_class=10, subgroup_attributes=["skin_tone", "sex"])
    result = analyse(cells, predictions, groups, cfg)
    rows = {(r["attribute"], r["subgroup"]): r for r in result["rows"]}
    assert [s for a, s in rows if a == "skin_tone"] == ["light", "intermediate", "brown"]
    starved = rows[("skin_tone", "brown")]
    assert starved["resolvable"] is False and starved["images"] == 4
    assert starved["per_class"] == {"benign": 0, "malignant": 4} and "auroc" not in starved
    light = rows[("skin_tone", "light")]
    assert light["resolvable"] and light["per_class"] == {"benign": 50, "malignant": 46}
    low, high = light["auroc"]["ci"]
    assert low <= light["auroc"]["delta"] <= high and low > 0  # the planted gain on light skin is seen
    inter = rows[("skin_tone", "intermediate")]
    assert inter["auroc"]["ci"][0] < 0 < inter["auroc"]["ci"][1] or abs(inter["auroc"]["delta"]) < 0.05
    assert light["with"]["auroc"] > light["without"]["auroc"]
    assert result["coverage"]["internal"]["skin_tone"] == {"light": 96, "intermediate": 140, "brown": 4}
    worst = {w["attribute"]: w for w in result["worst"]}
    assert worst["skin_tone"]["subgroup"] in {"light", "intermediate"}  # never the unresolvable one
    assert set(worst) == {"skin_tone", "sex"}


def test_raising_the_minimum_makes_every_subgroup_unresolvable():
    cells, predictions, groups = make_grid()
    cfg = EvaluateConfig(bootstrap=100, subgroup_min_per_class=200, subgroup_attributes=["sex"])
    result = analyse(cells, predictions, groups, cfg)
    assert result["rows"] and not any(r["resolvable"] for r in result["rows"]) and result["worst"] == []


def test_a_real_only_grid_gets_levels_without_differences():
    cells, predictions, groups = make_grid()
    base_only = [c for c in cells if c["ratio"] == 0]
    cfg = EvaluateConfig(bootstrap=100, subgroup_min_per_class=10, subgroup_attributes=["sex"])
    rows = analyse(base_only, predictions, groups, cfg)["rows"]
    assert {r["subgroup"] for r in rows} == {"male", "female"}
    assert all("without" in r and "with" not in r and "auroc" not in r for r in rows)


@pytest.mark.parametrize("age, band", [(None, "unknown"), (float("nan"), "unknown"), (29.9, "<30"), (30, "30-44"),
                                       (59, "45-59"), (74.5, "60-74"), (85, "75+")])
def test_age_bands(age, band):
    assert age_band(age) == band


def test_the_report_section_prints_counts_cis_and_not_resolvable(tmp_path):
    from dermaflux.evaluate.subgroup_report import SUBGROUP_HEAD, plot_subgroups, subgroup_lines, subgroup_table

    cells, predictions, groups = make_grid()
    cfg = EvaluateConfig(bootstrap=200, subgroup_min_per_class=10, subgroup_attributes=["skin_tone", "sex"])
    result = analyse(cells, predictions, groups, cfg)
    table = {(r[4], r[5]): r for r in subgroup_table(result, "binary")}
    assert all(len(r) == len(SUBGROUP_HEAD) for r in table.values())
    brown = table[("skin tone (ITA)", "brown")]
    assert brown[6] == "4 (benign 0, malignant 4)" and brown[7] == "not resolvable (< 10 per class)"
    light = table[("skin tone (ITA)", "light")]
    assert light[6] == "96 (benign 50, malignant 46)" and light[9].count("[") == 1 and light[9][0] in "+-"
    lines = subgroup_lines(result, "binary")
    assert any(line.startswith("Worst skin tone (ITA) subgroup") and "ΔAUROC" in line for line in lines)
    assert any("brown 4" in line for line in lines)
    assert plot_subgroups(result, "binary", tmp_path) == "plots/subgroups.png"
    assert (tmp_path / "plots" / "subgroups.png").stat().st_size > 1000
    starved = EvaluateConfig(bootstrap=100, subgroup_min_per_class=500, subgroup_attributes=["sex"])
    nothing = analyse(cells, predictions, groups, starved)
    assert plot_subgroups(nothing, "binary", tmp_path / "none") is None
    assert any("cannot resolve" in line for line in subgroup_lines(nothing, "binary"))


def test_skin_tones_come_from_the_captions_where_they_hold_the_image(ham10000_dir, tmp_path):
    """evaluate.captions: the caption stage's measured ITA category is used as is (no pixels decoded);
    an image the captions lack is measured; measure_tone=False leaves it unknown."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.evaluate.subgroups import UNKNOWN, image_groups
    from dermaflux.testing.ham10000 import build_split_corpus

    corpus = build_split_corpus(ham10000_dir, tmp_path / "corpus", per_class=1, seed=0)
    ids = sorted(i for s in (corpus / "shards").glob("*.parquet") for i in pq.read_table(s, columns=["id"])["id"].to_pylist())
    captioned, rest = ids[0], ids[1]
    (tmp_path / "captions" / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"id": [captioned], "attributes_json": [json.dumps({"skin_tone": "dark"})]}),
                   tmp_path / "captions" / "shards" / "part-0.parquet")
    groups = image_groups(corpus, {captioned, rest}, captions=tmp_path / "captions")
    assert groups[captioned]["skin_tone"] == "dark"  # HAM10000 is never measured dark: it came from the captions
    assert groups[rest]["skin_tone"] not in (UNKNOWN, "dark")  # measured from its pixels
    assert image_groups(corpus, {rest}, measure_tone=False)[rest]["skin_tone"] == UNKNOWN
