"""What curate and caption say about bad image files, and the pixel bound checked before decoding."""

import struct
import subprocess
import sys
import zlib

import pytest

from dermaflux.caption.batch import extract_row
from dermaflux.caption.extract import decode_image
from dermaflux.corpus.images import inspect_image, scan_image


def flat_png(side: int) -> bytes:
    """A one-colour 1-bit grey PNG, `side` px square: 13,000 px compress to ~20 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = (b"\x00" + bytes((side + 7) // 8)) * side  # filter byte + one bit per pixel, all black
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def real_image(ham10000_dir) -> bytes:
    return next(iter(sorted((ham10000_dir / "images").glob("*.jpg")))).read_bytes()


def test_empty_and_non_image_files_say_so(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert scan_image(str(empty))["error"] == "image does not decode: empty file (0 bytes)"
    error = inspect_image(b"not an image at all")["error"]
    assert error.startswith("image does not decode: not an image (19 bytes starting b'not an image'")
    assert "BytesIO" not in error


def test_pixels_above_the_limit_are_refused_from_the_header(ham10000_dir, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(flat_png(13_000))
    assert big.stat().st_size < 1_000_000
    # In a fresh process, so its peak memory is this call's: decoding would take 169 MB (+507 MB as RGB).
    # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) peak across fork + exec into ru_maxrss.
    code = ("import re, sys; from dermaflux.corpus.images import scan_image; "
            "print(scan_image(sys.argv[1]).get('error')); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    error, peak_kb = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()
    assert error == ("image cannot be read within curate.max_pixels: 13000x13000 px = 169.0 MP, "
                     "above the limit of 50.0 MP")
    assert int(peak_kb) < 400_000, f"peak {int(peak_kb) // 1024} MB: the image was decoded"
    # The limit is the config's: a 224 px image passes the default and not a lower one.
    assert "error" not in inspect_image(real_image(ham10000_dir))
    assert "224x224 px = 0.1 MP" in inspect_image(real_image(ham10000_dir), max_pixels=50_000)["error"]


def test_caption_workers_decode_nothing_above_the_limit(ham10000_dir):
    with pytest.raises(ValueError, match="13000x13000 px"):
        decode_image(flat_png(13_000))
    assert decode_image(real_image(ham10000_dir)).shape == (224, 224, 3)
    attributes, flags, reason = extract_row({"id": "x", "image": real_image(ham10000_dir), "label": "nv"},
                                            max_pixels=50_000)
    assert (attributes, flags) == ("", []) and reason.startswith("unreadable image: image cannot be read within "
                                                                 "curate.max_pixels: 224x224 px")
