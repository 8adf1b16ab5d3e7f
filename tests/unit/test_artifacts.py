import pytest

from dermaflux.core.artifacts import (
    OWNER_FILE, OutputConflict, atomic_dir, atomic_path, atomic_write_json, claim_output, is_done, mark_done, read_json,
)


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


def test_claim_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputConflict, match="is a file"):
        claim_output(tmp_path / "out", "curate", "abc", force=True)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_deletes_a_folder_dermaflux_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    refusal = r"not empty and was not written by dermaflux.*never deletes such a folder \(not even when forced\)"
    with pytest.raises(OutputConflict, match=refusal):
        claim_output(tmp_path, "curate", "abc", force=True)
    assert snapshot(tmp_path) == before


def test_force_replaces_only_a_run_of_the_same_stage(tmp_path):
    out = tmp_path / "run"
    claim_output(out, "pipeline", "abc")
    mark_done(out, "stage-curate")
    with pytest.raises(OutputConflict, match=r"holds a different 'pipeline' run.*replaces only a curate run"):
        claim_output(out, "curate", "xyz", force=True)
    assert is_done(out, "stage-curate")


@pytest.mark.parametrize("where", ["is", "contains", "lies inside", "link to"])
def test_an_output_that_overlaps_an_input_is_refused_even_with_force(tmp_path, where):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.jpg").write_bytes(b"jpeg")
    (data / "meta.csv").write_text("image_id\na\n")
    # Even a marker left in the input (a bad earlier run) does not let --force delete it.
    atomic_write_json(data / "images" / OWNER_FILE, {"stage": "curate", "fingerprint": "old"})
    out, given = {"is": (data / "images", data / "images"), "contains": (data, data / "images"),
                  "lies inside": (data / "images" / "corpus", data / "images"),
                  "link to": (tmp_path / "link", data / "images")}[where]
    if where == "link to":
        out.symlink_to(data / "images", target_is_directory=True)
    before = snapshot(data)
    with pytest.raises(OutputConflict) as err:
        claim_output(out, "curate", "new", force=True, inputs=[str(tmp_path / "other.csv"), str(given)])
    message = str(err.value)
    assert f"{out} {'is' if where == 'link to' else where} the input {given}" in message
    assert "never writes into, or replaces, its own input" in message
    assert snapshot(data) == before and not (data / "images" / "corpus").exists()


def test_atomic_dir_never_replaces_a_link(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "shards").symlink_to(tmp_path / "user", target_is_directory=True)
    with pytest.raises(OutputConflict, match="link or a file"):
        with atomic_dir(tmp_path / "run" / "shards") as staging:
            (staging / "part-0.parquet").write_bytes(b"x")
    assert (tmp_path / "user" / "keep.txt").read_text() == "mine"
