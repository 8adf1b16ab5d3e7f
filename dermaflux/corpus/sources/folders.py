"""One sub-folder per class: MED-NODE (`complete_mednode_dataset/{melanoma,naevus}/`), the Kaggle melanoma
sets (`{train,test}/{benign,malignant}/`, any case), or any folder tree whose image folders are named
for their class.

    folders=PATH[,vocab=NAME][,modality=dermoscopic|clinical|total-body crop][,name=NAME]

A folder's name maps to a label through the taxonomy table (`vocab`'s rows, else the generic `*`
rows: melanoma, naevus/nevus, benign, malignant, ...); a folder the table does not know stops the
source with its path and the names it knows. A `train`/`val`/`test` folder above a class folder is
the published split, kept as such. Ids are the image's path under PATH without its suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

from dermaflux.corpus.sources import register
from dermaflux.corpus.sources.base import (
    IMAGE_SUFFIXES, MODALITIES, SPLIT_WORDS, SourceError, SourceIndex, SourceRecord, SourceSpec,
)
from dermaflux.lesion import taxonomy


def class_folders(root: Path) -> list[tuple[Path, list[str]]]:
    """(folder, image file names) of every folder under `root` that holds images, in path order."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        images = sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES))
        if images:
            found.append((Path(folder), images))
    return found


def _published_split(folder: Path, root: Path) -> str | None:
    return next((SPLIT_WORDS[p.lower()] for p in reversed(folder.relative_to(root).parts[:-1])
                 if p.lower() in SPLIT_WORDS), None)


@register("folders")
def read(spec: SourceSpec) -> SourceIndex:
    root = Path(spec.path)
    if not root.is_dir():
        raise SourceError(f"folders: {root} is not a folder")
    modality = spec.options.get("modality")
    if modality is not None and modality not in MODALITIES:
        raise SourceError(f"folders source {spec.name}: modality={modality!r}: expected one of {', '.join(MODALITIES)}")
    vocab = spec.options.get("vocab", spec.name)
    folders = class_folders(root)
    if not folders:
        raise SourceError(f"folders source {spec.name}: no images under {root}")
    records, published = [], {}
    for folder, names in folders:
        label = taxonomy.map_label(vocab, folder.name)
        if label is None:
            known = sorted({k for k, _ in taxonomy.source_labels(vocab).items()} or taxonomy.source_labels("*"))
            raise SourceError(f"folders source {spec.name}: class folder {folder} ({folder.name!r}) is not in the "
                              f"label mapping (dermaflux/lesion/taxonomy.csv, vocabulary {vocab!r} or '*'); known "
                              f"folder names: {', '.join(known)}")
        split = _published_split(folder, root)
        for row, name in enumerate(names):
            relative = (folder / name).relative_to(root).with_suffix("").as_posix()
            records.append(SourceRecord(
                source=spec.name, original_id=relative, file=str(folder), row=row, image_path=str(folder / name),
                source_label=folder.name, label=label, group_namespace=spec.name, official_split=split,
                modality=modality,
            ))
            if split:
                published[split] = published.get(split, 0) + 1
    return SourceIndex(spec, records, [], len(records), [], published)
