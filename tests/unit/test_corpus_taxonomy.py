"""The taxonomy tables: one code set, malignancy flags, no guessing of unknown labels."""

from pathlib import Path

from dermaflux.lesion import taxonomy


def test_codes_names_and_malignancy():
    assert set(taxonomy.CODES) == {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc"}
    assert taxonomy.MALIGNANT_CODES == {"mel", "bcc", "akiec", "scc"}
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
        if name != "csv":
            assert taxonomy.source_labels(name), f"reader {name} has no rows in taxonomy.csv"


def test_taxonomy_doc_shows_the_current_table():
    doc = (Path(taxonomy.__file__).parent / "TAXONOMY.md").read_text()
    assert taxonomy.markdown_table() in doc
