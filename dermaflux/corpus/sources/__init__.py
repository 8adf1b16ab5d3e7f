"""Source readers, registered by name: `--source <name>=PATH` picks one.

Adding a source = one module here with a function `read(spec) -> SourceIndex` decorated with
`@register("name")`, plus its rows in ../taxonomy.csv, plus its import in `_READER_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from dermaflux.corpus.sources.base import Reject, SourceError, SourceIndex, SourceRecord, SourceSpec

Reader = Callable[[SourceSpec], SourceIndex]
_READERS: dict[str, Reader] = {}
_READER_MODULES = ("ham10000", "dermamnist", "isic", "pad_ufes_20", "generic_csv", "isic2020", "isic2024", "ddi",
                   "folders", "milk10k", "isic_archive", "derm12345")


def register(name: str) -> Callable[[Reader], Reader]:
    def wrap(fn: Reader) -> Reader:
        _READERS[name] = fn
        return fn

    return wrap


def readers() -> dict[str, Reader]:
    for module in _READER_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return dict(_READERS)


def read_source(spec: SourceSpec | str) -> SourceIndex:
    spec = SourceSpec.parse(spec) if isinstance(spec, str) else spec
    known = readers()
    if spec.reader not in known:
        raise SourceError(f"source {spec.reader!r}: unknown reader; known: {', '.join(sorted(known))}")
    index = known[spec.reader](spec)
    undiagnosed = [r for r in index.records if r.label is None]
    if undiagnosed and spec.fixed_split != "test":
        first = undiagnosed[0]
        raise SourceError(
            f"source {spec.name}: {len(undiagnosed)} rows have no diagnosis (a binary label column, e.g. {first.file} "
            f"row {first.row}: {first.source_label!r}); rows without a diagnosis can only be test rows: add split=test "
            "to the source")
    return index


__all__ = ["Reject", "SourceError", "SourceIndex", "SourceRecord", "SourceSpec", "read_source", "readers", "register"]
