"""The taxonomy tables: one code set, malignancy flags, no guessing of unknown labels."""

from pathlib import Path

from dermaflux.lesion import taxonomy


def test_codes_names_and_malignancy():
    assert set(taxonomy.DIAGNOSIS_CODES) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc"}
    assert set(taxonomy.CODES) == {*taxonomy.DIAGNOSIS_CODES, "benign", "malignant"}
    assert taxonomy.MALIGNANT_CODES == {"mel", "bcc", "akiec", "scc", "malignant"}
    assert taxonomy.malignancy_code(True) == "malignant" and taxonomy.malignancy_code(False) == "benign"
    assert not taxonomy.is_diagnosis("benign") and taxonomy.is_diagnosis("nv")
    assert taxonomy.is_malignant("mel") and not taxonomy.is_malignant("nv")
    assert taxonomy.display_name("bcc") == "basal cell carcinoma"


def test_source_labels_map_and_unknown_ones_do_not():
    assert taxonomy.map_label("ham10000", "mel") == "mel"
    assert taxonomy.map_label("dermamnist", "0") == "akiec" and taxonomy.map_label("dermamnist", "6") == "vasc"
    assert taxonomy.map_label("isic", "AK") == "akiec" and taxonomy.map_label("isic", "SCC") == "scc"
    assert taxonomy.map_label("pad-ufes-20", "SEK") == "bkl" and taxonomy.map_label("pad-ufes-20", "NEV") == "nv"
    assert taxonomy.map_label("isic", "UNK") is None
    assert taxonomy.map_label("dermamnist", "7") is None
    # A source with its own rows does not fall back to the generic vocabulary...
    assert taxonomy.map_label("ham10000", "melanoma") is None
    # ...a source without rows (a generic CSV) does.
    assert taxonomy.map_label("clinic", " Melanoma ") == "mel"
    assert taxonomy.map_label("clinic", "psoriasis") is None


def test_every_reader_has_rows_and_every_row_a_known_code():
    from dermaflux.corpus.sources import readers

    for name in readers():
        if name not in ("csv", "folders", "derm12345", "isic-archive"):  # generic "*" rows / ISIC's (isic2024) rows
            assert taxonomy.source_labels(name), f"reader {name} has no rows in taxonomy.csv"


def test_taxonomy_doc_shows_the_current_table():
    doc = (Path(taxonomy.__file__).parent / "TAXONOMY.md").read_text()
    assert taxonomy.markdown_table() in doc


def test_a_finer_diagnosis_maps_and_the_binary_label_stays_where_the_table_has_none():
    from dermaflux.corpus.sources.base import SourceRecord, diagnosis_fields

    assert diagnosis_fields("clinic", "melanoma", True) == ({"label": "mel"}, None)
    assert diagnosis_fields("clinic", "unknown", False) == ({"label": "benign"}, None)
    assert diagnosis_fields("clinic", "psoriasis", True) == ({"label": "malignant"}, None)
    assert diagnosis_fields("clinic", "nevus", None) == ({"label": "nv"}, None)
    fields, why = diagnosis_fields("clinic", "nevus", True)
    assert fields is None and "contradicts the source's malignant flag" in why
    assert diagnosis_fields("clinic", None, None)[0] is None
    record = SourceRecord("s", "1", "f", 2, "i.jpg", "target=1", "malignant", "s")
    assert (record.malignant, record.melanoma) == (True, None)
    record = SourceRecord("s", "1", "f", 2, "i.jpg", "target=0", "benign", "s")
    assert (record.malignant, record.melanoma) == (False, False)
