"""Generation targets over label x subgroup: parsing, the plan, and --balance filling a starved subgroup."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dermaflux.config import load_config
from dermaflux.synth import bulk, stage
from dermaflux.synth.requests import RequestError
from dermaflux.synth.subgroup_targets import balance_cells, cell_counts, corpus_subgroups, parse_targets

# The train split of a captioned corpus: nv mostly very light skin, brown skin starved (one image).
REAL = {"nv": {"very_light": 10, "light": 4, "brown": 1}, "mel": {"light": 5, "brown": 2}}


@pytest.fixture
def starved_corpus(tmp_path):
    rows = []
    for label, tones in REAL.items():
        for tone, n in tones.items():
            for i in range(n):
                attrs = {"diagnosis": label, "skin_tone": tone, "ita": 0.0}
                rows.append({"id": f"x:{label}{tone}{i}", "label": label, "split": "train",
                             "attributes_json": json.dumps(attrs)})
    rows.append({"id": "x:test", "label": "nv", "split": "test", "attributes_json": json.dumps({"skin_tone": "dark"})})
    (tmp_path / "corpus" / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus" / "shards" / "part-00000.parquet")
    return tmp_path / "corpus"


def test_targets_parse_into_plain_counts_and_cells():
    plain, cells = parse_targets("mel:skin_tone=brown:200, nv:300, mel:skin_tone=dark:5, bcc:sex=female:7")
    assert plain == {"nv": 300}
    assert cells == [("mel", "skin_tone", "brown", 200), ("mel", "skin_tone", "dark", 5), ("bcc", "sex", "female", 7)]
    for bad, words in (("mel:skin_tone=olive:3", "skin_tone"), ("mel:age=40:3", "attribute 'age'"),
                       ("mel-200", "expected LABEL:COUNT")):
        with pytest.raises(RequestError, match=words):
            parse_targets(bad)


def test_balance_fills_the_starved_subgroup_up_to_the_best_represented(starved_corpus, tmp_path):
    counts = corpus_subgroups(starved_corpus, "skin_tone")
    assert counts == {label: Counter(tones) for label, tones in REAL.items()}  # the test row is not counted
    assert balance_cells(counts, "skin_tone") == [("mel", "skin_tone", "brown", 3), ("nv", "skin_tone", "light", 6),
                                                  ("nv", "skin_tone", "brown", 9)]
    cfg = load_config("tiny", extra={"synth": {"out": str(tmp_path / "syn"), "corpus": str(starved_corpus),
                                               "balance": "skin_tone", "targets": "nv:2"}})
    spec = stage.job_spec(cfg)
    assert spec.targets == {"mel": 3, "nv": 17}
    items = bulk.plan_items(spec)
    made = Counter((i.label, json.loads(i.attributes_json).get("skin_tone")) for i in items)
    assert made == {("mel", "brown"): 3, ("nv", "light"): 6, ("nv", "brown"): 9, ("nv", None): 2}
    for label, tones in REAL.items():  # real + synthetic: every subgroup now at the best-represented count
        best = max(tones.values())
        assert all(n + made[(label, tone)] == best for tone, n in tones.items())
    brown = [i for i in items if json.loads(i.attributes_json).get("skin_tone") == "brown"]
    assert all("brown skin" in i.prompt for i in brown)  # the request is in the caption the adapter learned
    again = bulk.JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    images = [{"label": i.label, "attributes": json.loads(i.attributes_json)} for i in items]
    assert cell_counts(spec.cells, images)["nv:skin_tone=brown"] == {"asked": 9, "written": 9}


def test_a_job_without_cells_keeps_its_fingerprint(tmp_path):
    cfg = load_config("tiny", extra={"synth": {"out": str(tmp_path / "syn"), "per_class": 2}})
    spec = stage.job_spec(cfg)
    assert spec.cells == () and "cells" not in spec.to_dict()


def test_the_bulk_endpoint_takes_subgroup_targets_as_generate_does(tmp_path):
    """POST /v1/augmentations `targets` builds the same job as `generate --targets` (one JobSpec builder)."""
    from pydantic import ValidationError

    from dermaflux.synth.requests import AugmentationRequest

    text = "mel:skin_tone=brown:3,nv:2"
    cfg = load_config("tiny", extra={"synth": {"out": str(tmp_path / "set"), "targets": text}})
    request = AugmentationRequest(job_id="set", targets=text)
    spec = bulk.job_spec(cfg, request, {})
    assert spec == stage.job_spec(cfg)
    assert spec.targets == {"mel": 3, "nv": 2} and spec.cells == (("mel", "skin_tone", "brown", 3),)
    with pytest.raises(RequestError, match=r"targets\[0\]"):
        bulk.job_spec(cfg, AugmentationRequest(job_id="set", targets="mel:skin_tone=blue:3"), {})
    with pytest.raises(ValidationError, match="exactly one of"):
        AugmentationRequest(job_id="set", targets=text, class_targets={"nv": 1})
