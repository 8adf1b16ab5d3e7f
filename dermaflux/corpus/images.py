"""Per-image work (runs inside Ray Data tasks): read the bytes, prove they decode, hash them.

Pure PIL/numpy/imagehash, no Ray. A failure is returned as a reason string, never raised, so one
bad file quarantines one row instead of failing a task. No decode starts before the header's size
is checked against curate.max_pixels (`open_bounded`, which caption's workers use too).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from functools import lru_cache

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from dermaflux.corpus.config import DEFAULT_MAX_PIXELS
from dermaflux.corpus.sources.dermamnist import NPZ_SEPARATOR
from dermaflux.corpus.hdf5 import is_hdf5_locator, read_hdf5_bytes

MIN_SIDE = 8


class ImageRefused(ValueError):
    """Bytes that are not opened as an image: empty, no image format, or above the pixel limit."""


@lru_cache(maxsize=4)
def _npz_array(path: str, array: str) -> np.ndarray:
    # Cached per worker process: a task reads many rows of the same (decompressed) array.
    with np.load(path, allow_pickle=False) as archive:
        return np.asarray(archive[array])


def read_image_bytes(locator: str) -> tuple[bytes, str | None]:
    """The encoded bytes of an image file, of one HDF5 dataset (`<file.hdf5>::<key>`, ISIC 2024), or
    of one .npz array slot encoded as PNG (lossless)."""
    if is_hdf5_locator(locator):
        return read_hdf5_bytes(locator), None
    if NPZ_SEPARATOR in locator:
        path, array, index = locator.split(NPZ_SEPARATOR)
        pixels = _npz_array(path, array)[int(index)]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue(), "PNG"
    with open(locator, "rb") as fh:
        return fh.read(), None


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


@contextlib.contextmanager
def open_bounded(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Image.Image]:
    """`Image.open` reads only the header: the size is checked here, before any pixel is decoded.

    The one guard for every decode of corpus bytes (curate's scan, caption's workers).
    """
    if not data:
        raise ImageRefused("image does not decode: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow warns above 89 MP; the limit below is ours to apply
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRefused(f"image does not decode: not an image ({len(data)} bytes starting {data[:12]!r}, "
                           "no image format Pillow knows)") from None
    except Image.DecompressionBombError as err:  # over twice Pillow's own limit: refused before ours
        raise ImageRefused(
            f"image cannot be read within curate.max_pixels = {_megapixels(max_pixels)}: {err}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRefused(f"image cannot be read within curate.max_pixels: {width}x{height} px = "
                               f"{_megapixels(width * height)}, above the limit of {_megapixels(max_pixels)}")
        yield image


def inspect_image(data: bytes, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Decode fully (a truncated JPEG fails here, not in training) and hash.

    Returns {format, width, height, phash, sha256} or {error}.
    """
    try:
        with open_bounded(data, max_pixels) as probe:
            probe.verify()  # structure check; the image is unusable afterwards, so reopen
        with open_bounded(data, max_pixels) as image:
            image.load()  # full decode: catches truncated data that verify() lets through
            image_format = image.format
            width, height = image.size
            rgb = image.convert("RGB")
    except ImageRefused as err:
        return {"error": str(err)}
    except (OSError, SyntaxError, ValueError) as err:
        return {"error": f"image does not decode ({type(err).__name__}: {err})"}
    if min(width, height) < MIN_SIDE:
        return {"error": f"image is {width}x{height}, smaller than {MIN_SIDE} px"}
    return {
        "format": image_format,
        "width": width,
        "height": height,
        "phash": str(imagehash.phash(rgb, hash_size=hash_size)),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def scan_image(locator: str, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    try:
        data, _ = read_image_bytes(locator)
    except FileNotFoundError:
        return {"error": f"image file {locator} is missing"}
    except (OSError, ValueError, IndexError, KeyError) as err:
        return {"error": f"image {locator} cannot be read ({type(err).__name__}: {err})"}
    return inspect_image(data, hash_size, max_pixels)


def clean_scan(result: dict) -> dict:
    """A scan result back from a table: drop absent fields (None/NaN), sizes back to int."""
    out = {k: v for k, v in result.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    for key in ("width", "height"):
        if key in out:
            out[key] = int(out[key])
    return out
