"""Issue 25, findings 7-9: what a careless user's files do to curate's fingerprint, the image
scan and the CLI's config reading. Each bad input ends in a clear refusal (exit 2, one line),
never a traceback, a stale run or an unbounded read."""

import io
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dermaflux.cli import main
from dermaflux.testing.ham10000 import METADATA, read_metadata, write_ham_folder
from dermaflux.config import ConfigError, load_config
from dermaflux.core import artifacts
from dermaflux.core.config import PRESET_DIR
from dermaflux.corpus import stage as curate_stage
from dermaflux.corpus.images import inspect_image, scan_image
from dermaflux.synth.config import AuthConfig
from dermaflux.synth.guard import read_token


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- finding 7: a labels CSV edited in place with its size and mtime kept -----------------------

def copy_ham(ham_dir: Path, dest: Path, count: int) -> Path:
    """A HAM10000-layout copy of the metadata's first `count` rows; returns its CSV."""
    return write_ham_folder(ham_dir, dest, read_metadata(ham_dir)[:count]) / METADATA


def test_a_labels_csv_edited_with_its_size_and_mtime_kept_is_another_run(ham10000_dir, tmp_path):
    labels = copy_ham(ham10000_dir, tmp_path / "ham", 3)
    cfg = load_config("tiny", extra={"curate": {"sources": [f"ham10000={tmp_path / 'ham'}"]}})
    before = curate_stage.run_fingerprint_of(cfg.curate, curate_stage.index_sources(cfg.curate.sources))
    text, stat = labels.read_bytes(), labels.stat()
    assert b",bkl," in text
    labels.write_bytes(text.replace(b",bkl,", b",bcc,", 1))  # another diagnosis, same length
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `touch -r`: size and mtime as before
    assert labels.stat().st_size == stat.st_size and labels.stat().st_mtime_ns == stat.st_mtime_ns
    after = curate_stage.run_fingerprint_of(cfg.curate, curate_stage.index_sources(cfg.curate.sources))
    assert after != before
    # The same bytes again are the same run (the fingerprint is the content's, not the inode's).
    labels.write_bytes(text)
    assert curate_stage.run_fingerprint_of(cfg.curate, curate_stage.index_sources(cfg.curate.sources)) == before


# --- finding 8: images whose bytes do not match their header, and reads without a bound ---------

def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 64 px JPEG (about 4 KB) whose frame header is rewritten to claim `width` x `height`."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height, width
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_jpeg_claiming_more_pixels_than_its_bytes_hold_is_refused_before_decoding():
    data = jpeg_claiming(7000, 7000)
    assert len(data) < 16_384
    started = time.perf_counter()
    error = inspect_image(data)["error"]
    assert time.perf_counter() - started < 0.3  # the 49 MP decode (about 0.6 s, 488 MiB) never starts
    assert error.startswith(f"image data does not match its header: a 7000x7000 px JPEG needs at least "), error
    assert f"the file holds {len(data):,} bytes (truncated or forged)" in error


def test_real_jpegs_pass_the_header_check(ham10000_dir, tmp_path):
    real = next(iter(sorted((ham10000_dir / "images").glob("*.jpg")))).read_bytes()
    assert "error" not in inspect_image(real)
    image = Image.open(io.BytesIO(real))
    for options in ({"progressive": True, "quality": 5}, {"quality": 1, "subsampling": 2}):
        buffer = io.BytesIO()
        image.convert("L").save(buffer, "JPEG", **options)
        assert "error" not in inspect_image(buffer.getvalue()), options
    # One flat colour, the most compressible JPEG there is: still above the bound.
    flat = io.BytesIO()
    Image.new("RGB", (1024, 1024), (90, 60, 50)).save(flat, "JPEG", quality=1, progressive=True)
    assert "error" not in inspect_image(flat.getvalue())


def test_a_truncated_jpeg_is_refused_even_when_a_library_allows_truncated_images(ham10000_dir, monkeypatch):
    real = next(iter(sorted((ham10000_dir / "images").glob("*.jpg")))).read_bytes()
    # Some libraries set this process-wide; the scan must not inherit it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    error = inspect_image(real[: len(real) * 2 // 3])["error"]
    assert error.startswith("image does not decode (OSError: image file is truncated"), error
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # put back as it was


def test_a_sparse_multi_gigabyte_file_is_refused_from_its_size(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(2 * 1024**3)  # sparse: no disk, no memory unless read
    assert scan_image(str(huge))["error"] == (
        f"image file {huge} holds 2,147,483,648 bytes, above curate.max_image_bytes = 268,435,456: not read")
    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg_claiming(64, 64))
    assert scan_image(str(small), max_bytes=1000)["error"].endswith("above curate.max_image_bytes = 1,000: not read")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_device_or_fifo_behind_an_image_name_is_refused_unread(tmp_path, target):
    if target == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)  # opening it for reading would wait for a writer forever
    link = tmp_path / "image.jpg"
    link.symlink_to(target)
    assert scan_image(str(link))["error"] == (
        f"image file {link} is not a regular file (a device, FIFO or socket): not read")


# --- finding 9: the CLI's config reading: exit 2 and one line, never a traceback ----------------

def test_a_folder_as_config_says_so(tmp_path, capsys):
    err = cli_error(capsys, ["curate", "--config", str(tmp_path)])
    assert err == f"dermaflux curate: error: config file {tmp_path} is a folder, not a YAML file"


@pytest.mark.parametrize("override, needle", [
    ("x=[unclosed", "--set 'x=[unclosed': not valid YAML (while parsing a flow sequence"),
    ("curate.seed=!!python/name:os.system", "--set 'curate.seed=!!python/name:os.system': not valid YAML (could not "
     "determine a constructor for the tag 'tag:yaml.org,2002:python/name:os.system'"),
])
def test_a_set_value_that_is_not_yaml_is_one_line(capsys, override, needle):
    err = cli_error(capsys, ["curate", "--set", override])
    assert err.startswith(f"dermaflux curate: error: {needle}"), err


def test_a_yaml_tag_in_a_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("curate:\n  seed: !!python/object/apply:os.system ['true']\n")
    err = cli_error(capsys, ["curate", "--config", str(config)])
    assert err.startswith(f"dermaflux curate: error: {config}: not valid YAML (could not determine a constructor "), err
    assert "line 2, column 9" in err


def alias_bomb(levels: int, width: int = 10) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])  # a million nodes once expanded; a billion (115 s and 2.5 GB before)
def test_a_yaml_alias_bomb_fails_fast(tmp_path, capsys, levels):
    config = tmp_path / "bomb.yaml"
    config.write_text(alias_bomb(levels))
    started = time.perf_counter()
    err = cli_error(capsys, ["curate", "--config", str(config)])
    assert time.perf_counter() - started < 5
    assert err.startswith(f"dermaflux curate: error: {config}: YAML aliases expand to more than 100,000 values"), err
    # The same bound for a --set value (the bomb as one flow mapping).
    err = cli_error(capsys, ["curate", "--set", "curate.seed={" + ", ".join(alias_bomb(levels).splitlines()) + "}"])
    assert "YAML aliases expand to more than 100,000 values" in err


def test_a_config_file_too_large_is_refused_unread(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text("# padding\n" * 200_000)
    err = cli_error(capsys, ["curate", "--config", str(config)])
    assert err == f"dermaflux curate: error: config file {config} holds 2,000,000 bytes; a config is at most 1,048,576"


def test_preset_names_are_plain_names(tmp_path, capsys):
    elsewhere = tmp_path / "x.yaml"
    elsewhere.write_text("curate: {seed: 7}\n")
    sneaky = os.path.relpath(tmp_path / "x", PRESET_DIR)  # ../../../tmp/.../x
    for argv in (["curate", "--preset", sneaky], ["curate", "--preset", "../tiny"]):
        err = cli_error(capsys, argv)
        assert err.startswith(f"dermaflux curate: error: unknown preset {argv[-1]!r}; available: flux-dev, tiny"), err
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: {sneaky}\n")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, config)


def fake_run(folder: Path, owner) -> Path:
    folder.mkdir()
    (folder / artifacts.OWNER_FILE).write_text(owner)
    return folder


def test_force_never_replaces_a_run_through_a_link(tmp_path):
    real = fake_run(tmp_path / "real", '{"stage": "curate", "fingerprint": "old"}')
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(artifacts.OutputConflict, match=f"{link} is a link to {real}: --force never replaces a run "
                                                       "through a link"):
        artifacts.claim_output(link, "curate", "new", force=True)
    assert (real / artifacts.OWNER_FILE).exists()
    # Resuming through the link still works: only the replacing is refused.
    link2 = tmp_path / "link2"
    link2.symlink_to(real, target_is_directory=True)
    assert artifacts.claim_output(link2, "curate", "old") is True


@pytest.mark.parametrize("text", ["[1, 2]", '"curate"', "null"])
def test_a_marker_that_is_not_a_json_object_is_named(tmp_path, text):
    run = fake_run(tmp_path / "run", text)
    for force in (False, True):
        with pytest.raises(artifacts.OutputConflict, match=f"{run / artifacts.OWNER_FILE}: not a DermaFlux run "
                                                           "marker"):
            artifacts.claim_output(run, "curate", "new", force=force)
    assert (run / artifacts.OWNER_FILE).read_text() == text  # never deleted: DermaFlux cannot tell it wrote it
    artifacts.mark_done(run, "train", {"steps": 3})
    artifacts.marker_path(run, "train").write_text(text)
    with pytest.raises(ValueError, match=f"{artifacts.marker_path(run, 'train')}: expected a JSON object"):
        artifacts.read_json(artifacts.marker_path(run, "train"))


def test_a_token_file_that_is_a_folder_or_not_text_says_which(tmp_path):
    with pytest.raises(ConfigError, match=f"synth.auth.token_file: {tmp_path} is a folder, not a file"):
        read_token(AuthConfig(token_file=str(tmp_path)), True)
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe" + b"\x00secret" * 8)
    with pytest.raises(ConfigError, match=f"synth.auth.token_file: {binary} is not UTF-8 text"):
        read_token(AuthConfig(token_file=str(binary)), True)
    endless = tmp_path / "endless"
    endless.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=f"synth.auth.token_file: {endless} is not a regular file"):
        read_token(AuthConfig(token_file=str(endless)), True)
    with pytest.raises(ConfigError, match=f"synth.auth.token_file: {tmp_path / 'missing'} does not exist"):
        read_token(AuthConfig(token_file=str(tmp_path / "missing")), True)
    good = tmp_path / "good"
    good.write_text("s3cret-" * 6 + "\n")
    assert read_token(AuthConfig(token_file=str(good)), True) == "s3cret-" * 6
