"""Class targets of generation and bulk jobs come from the corpus: only the classes its train split
has (from its manifest, else its shards); asking for another is an error naming both."""

import json
import logging

import pytest

from dermaflux.config import load_config
from dermaflux.corpus.schema import class_counts
from dermaflux.lesion import taxonomy
from dermaflux.synth import bulk
from dermaflux.synth.requests import AugmentationRequest, RequestError
from dermaflux.synth.stage import class_targets
from dermaflux.testing.ham10000 import build_class_corpus


@pytest.fixture(scope="module")
def corpus(ham10000_dir, tmp_path_factory):
    # Train rows of nv, mel and df; one test row each (test rows are not classes to top up).
    return build_class_corpus(ham10000_dir, tmp_path_factory.mktemp("corpus") / "corpus", {"nv": 3, "mel": 2, "df": 1})


def test_per_class_generates_only_the_corpus_classes(corpus, caplog):
    cfg = load_config("tiny", extra={"synth": {"per_class": 2, "corpus": str(corpus)}})
    with caplog.at_level(logging.INFO, logger="dermaflux.synth.stage"):
        assert class_targets(cfg) == {"df": 2, "mel": 2, "nv": 2}
    assert "classes of corpus" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dermaflux.synth.stage"):  # no corpus: as before, and said
        assert class_targets(load_config("tiny", extra={"synth": {"per_class": 1}})) == {c: 1 for c in sorted(taxonomy.DIAGNOSIS_CODES)}
    assert "no synth.corpus given" in caplog.text


def test_an_absent_class_is_an_error_naming_it_and_the_corpus_classes(corpus):
    cfg = load_config("tiny", extra={"synth": {"per_class": 2, "corpus": str(corpus), "class_targets": {"scc": 4}}})
    with pytest.raises(RequestError, match=r"synth\.class_targets\.scc: class 'scc' is not in the train split of "
                                           r"corpus .* \(it has df, mel, nv\)"):
        class_targets(cfg)
    zero = load_config("tiny", extra={"synth": {"corpus": str(corpus), "class_targets": {"mel": 3, "scc": 0}}})
    assert class_targets(zero) == {"mel": 3, "scc": 0}  # a zero asks for nothing
    request = AugmentationRequest(job_id="j", class_targets={"bcc": 1, "nv": 2}, corpus=str(corpus))
    with pytest.raises(RequestError, match="class 'bcc' is not in") as err:
        bulk.job_spec(load_config("tiny"), request, {})
    assert err.value.field == "class_targets.bcc"
    ok = AugmentationRequest(job_id="j", class_targets={"nv": 2}, corpus=str(corpus))
    assert bulk.job_spec(load_config("tiny"), ok, {}).targets == {"nv": 2}


def test_class_counts_read_the_manifest_first(corpus, tmp_path):
    assert class_counts(corpus) == {"df": 1, "mel": 2, "nv": 3}  # no manifest here: from the shards
    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "manifest.json").write_text(json.dumps(
        {"by_split_label": {"train": {"bkl": 4, "no_diagnosis": 0}, "test": {"mel": 1, "no_diagnosis": 9}}}))
    assert class_counts(curated) == {"bkl": 4} and class_counts(curated, "test") == {"mel": 1}
    (curated / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="not a corpus manifest"):
        class_counts(curated)
