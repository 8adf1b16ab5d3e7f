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
import os
import stat
import warnings
from collections.abc import Iterator
from functools import lru_cache

import imagehash
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from dermaflux.corpus.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
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


def read_image_bytes(locator: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> tuple[bytes, str | None]:
    """The encoded bytes of an image file, of one HDF5 dataset (`<file.hdf5>::<key>`, ISIC 2024), or
    of one .npz array slot encoded as PNG (lossless).

    A file is read only when it is a regular file of at most `max_bytes` (curate.max_image_bytes):
    a sparse multi-gigabyte `.jpg` or a link to /dev/zero is refused from fstat, before any read.
    """
    if is_hdf5_locator(locator):
        return read_hdf5_bytes(locator), None
    if NPZ_SEPARATOR in locator:
        path, array, index = locator.split(NPZ_SEPARATOR)
        pixels = _npz_array(path, array)[int(index)]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue(), "PNG"
    fd = os.open(locator, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRefused(f"image file {locator} is not a regular file (a device, FIFO or socket): not read")
        if info.st_size > max_bytes:
            raise ImageRefused(f"image file {locator} holds {info.st_size:,} bytes, above curate.max_image_bytes = "
                               f"{max_bytes:,}: not read")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after fstat
        raise ImageRefused(f"image file {locator} holds more than curate.max_image_bytes = {max_bytes:,}: not read")
    return data, None


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
        _check_jpeg_data(image, len(data))
        yield image


def _check_jpeg_data(image: Image.Image, size: int) -> None:
    """A JPEG's bytes must be able to hold the blocks its header declares.

    Every 8x8 block of every component costs at least one bit of Huffman-coded data (its DC code),
    so a file shorter than blocks / 8 bytes is truncated or forged: libjpeg would only warn ("premature
    end of data segment") and fill the rest grey, after allocating the whole image. (Arithmetic-coded
    JPEGs can go below one bit a block; they are vanishingly rare in dermatology sets.)
    """
    layers = getattr(image, "layer", None) if image.format in ("JPEG", "MPO") else None
    if not layers:
        return
    width, height = image.size
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    blocks = sum(math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
                 for _, h, v, _ in layers)
    if size < math.ceil(blocks / 8):
        raise ImageRefused(f"image data does not match its header: a {width}x{height} px JPEG needs at least "
                           f"{math.ceil(blocks / 8):,} bytes of coded data (one bit per 8x8 block), the file holds "
                           f"{size:,} bytes (truncated or forged)")


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Truncated data fails the decode even where another library set Pillow's process-wide
    LOAD_TRUNCATED_IMAGES (which fills the missing part grey and returns)."""
    allowed = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def inspect_image(data: bytes, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Decode fully (a truncated JPEG fails here, not in training) and hash.

    Returns {format, width, height, phash, sha256} or {error}.
    """
    try:
        with _strict_decoding():
            with open_bounded(data, max_pixels) as probe:
                probe.verify()  # structure check; the image is unusable afterwards, so reopen
            with open_bounded(data, max_pixels) as image:
                image.load()  # full decode: catches truncated data that verify() lets through
                image_format = image.format
                width, height = image.size
                rgb = image.convert("RGB")
    except ImageRefused as err:
        return {"error": str(err)}
    except (OSError, SyntaxError, ValueError, MemoryError) as err:
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


def scan_image(locator: str, hash_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> dict:
    try:
        data, _ = read_image_bytes(locator, max_bytes)
    except FileNotFoundError:
        return {"error": f"image file {locator} is missing"}
    except ImageRefused as err:
        return {"error": str(err)}
    except (OSError, ValueError, IndexError, KeyError, MemoryError) as err:
        return {"error": f"image {locator} cannot be read ({type(err).__name__}: {err})"}
    return inspect_image(data, hash_size, max_pixels)


def clean_scan(result: dict) -> dict:
    """A scan result back from a table: drop absent fields (None/NaN), sizes back to int."""
    out = {k: v for k, v in result.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    for key in ("width", "height"):
        if key in out:
            out[key] = int(out[key])
    return out
