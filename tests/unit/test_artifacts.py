import pytest

from dermaflux.core.artifacts import OutputConflict, atomic_path, atomic_write_json, claim_output, is_done, mark_done, read_json


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert read_json(target) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_claim_resumes_same_run_and_refuses_another(tmp_path):
    out = tmp_path / "out"
    assert claim_output(out, "curate", "abc") is False
    mark_done(out, "shard-0", {"rows": 3})
    assert claim_output(out, "curate", "abc") is True and is_done(out, "shard-0")
    with pytest.raises(OutputConflict, match="different 'curate' run"):
        claim_output(out, "curate", "xyz")
    assert claim_output(out, "curate", "xyz", force=True) is False
    assert not is_done(out, "shard-0")


def test_claim_refuses_foreign_content(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not empty"):
        claim_output(tmp_path, "caption", "abc")
