"""Images stored as datasets of one HDF5 file (ISIC 2024's `train-image.hdf5`: key `isic_id`, value a
scalar dataset holding the JPEG bytes). A corpus locator is `<file>::<key>`."""

from __future__ import annotations

from functools import lru_cache

HDF5_SUFFIXES = (".hdf5", ".h5")
SEPARATOR = "::"


def locator(path: str, key: str) -> str:
    return f"{path}{SEPARATOR}{key}"


def is_hdf5_locator(value: str) -> bool:
    return SEPARATOR in value and value.split(SEPARATOR, 1)[0].lower().endswith(HDF5_SUFFIXES)


@lru_cache(maxsize=4)
def _open(path: str):
    # One open file per worker process: opening costs more than reading one small JPEG.
    import h5py

    return h5py.File(path, "r")


def keys(path: str) -> list[str]:
    return list(_open(path).keys())


def read_hdf5_bytes(value: str) -> bytes:
    path, key = value.split(SEPARATOR, 1)
    try:
        handle = _open(path)
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot be opened as HDF5 ({err})") from None
    if key not in handle:
        raise FileNotFoundError(f"{path}: no dataset {key!r}")
    data = handle[key][()]
    return bytes(data) if not isinstance(data, bytes) else data
