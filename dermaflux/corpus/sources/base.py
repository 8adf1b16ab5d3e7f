"""What every source reader returns, the spec syntax, and helpers readers share.

A reader indexes a source on the driver (CSV rows, file paths, labels, grouping keys) without
decoding any image; decoding, verifying and hashing run later as Ray Data tasks. Rows it cannot
use (unknown label, missing image, bad field) become `Reject`s with the file and row named.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dermaflux.corpus.config import SPLIT_WORDS, SourceSpec  # noqa: F401  (the spec parser lives beside its config field)
from dermaflux.lesion import taxonomy

MODALITIES = ("dermoscopic", "clinical", "total-body crop")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MISSING = {"", "na", "nan", "none", "null", "unknown"}
# `positive=` of a binary label column: what its 1 means. "mel": 1 is melanoma, 0 is "not
# melanoma" (no diagnosis); "malignant": 1 is malignant, 0 is benign (no diagnosis either way).
POSITIVES = {"mel": "mel", "melanoma": "mel", "malignant": "malignant"}
TRUE_WORDS = {"1", "1.0", "true", "yes", "y", "t"}
FALSE_WORDS = {"0", "0.0", "false", "no", "n", "f"}


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, CSV missing a required column)."""


@dataclass
class SourceRecord:
    """One input row the reader could index: where its image is and what the source says about it."""

    source: str
    original_id: str
    file: str  # the file the row came from (CSV, .npz)
    row: int  # 1-based line in that CSV (header = 1) or index in the .npz array
    image_path: str  # a file path, or `<npz>::<array>::<index>` for array sources
    source_label: str
    label: str | None  # a taxonomy code (benign/malignant where only that is known); None: not even malignancy
    # is known (a melanoma column's negatives): test rows only
    group_namespace: str  # lesion/patient ids are compared within one namespace
    lesion_id: str | None = None
    patient_id: str | None = None
    official_split: str | None = None  # train | val | test when the source publishes one
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    skin_type: str | None = None
    skin_tone: str | None = None  # a coarser tone with its scale ("fitzpatrick I-II"), where that is all there is
    modality: str | None = None  # one of MODALITIES
    diagnosis_method: str | None = None
    mm_per_pixel: float | None = None
    metadata_json: str = "{}"
    malignant: bool | None = None  # given for rows without a diagnosis; else derived from the label
    melanoma: bool | None = None

    def __post_init__(self):
        if self.label is None:
            return
        self.malignant = taxonomy.is_malignant(self.label)
        if taxonomy.is_diagnosis(self.label):
            self.melanoma = self.label == "mel"
        elif not self.malignant:
            self.melanoma = False  # benign: not a melanoma either; a bare "malignant" may or may not be one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reject:
    """One input row that did not make it, with the reason a person can act on."""

    source: str
    file: str
    row: int
    original_id: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SourceIndex:
    spec: SourceSpec
    records: list[SourceRecord]
    rejects: list[Reject]
    input_rows: int  # every row the source offered: records + rejects
    files: list[str]  # the index files read (for the run fingerprint)
    published_splits: dict[str, int] = field(default_factory=dict)  # input rows per published split


# --- helpers -------------------------------------------------------------------------------


def decode_utf8(path: Path, what: str) -> str:
    """The file's text; bytes that are not UTF-8 fail naming the file, the line and the byte in it."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # (not utf-8-sig: its error offsets skip the BOM)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        raise SourceError(
            f"{what}: {path} line {line}: byte {err.start - line_start + 1} of the line (0x{raw[err.start]:02x}) is "
            "not UTF-8; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def read_csv(path: Path, required: list[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; a missing required column fails the whole source up front."""
    if not path.is_file():
        raise SourceError(f"{what}: {path} does not exist")
    with io.StringIO(decode_utf8(path, what), newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise SourceError(
                f"{what}: {path} is missing required column(s) {', '.join(map(repr, missing))} "
                f"(columns found: {', '.join(columns) or 'none'})"
            )
        rows = []
        for row in reader:
            clean = {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            rows.append((reader.line_num, clean))
    return rows


def index_images(*roots: Path) -> dict[str, list[Path]]:
    """File name and stem (lower case) -> image paths found anywhere under the roots."""
    found: dict[str, list[Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for folder, _, names in os.walk(root):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    path = Path(folder) / name
                    found.setdefault(name.lower(), []).append(path)
                    stem = name.rsplit(".", 1)[0].lower()
                    if stem != name.lower():
                        found.setdefault(stem, []).append(path)
    return found


def lookup_image(images: dict[str, list[Path]], name: str) -> tuple[Path | None, str | None]:
    """The one image for `name` (with or without extension), or None and why not."""
    hits = images.get(name.strip().lower(), [])
    unique = sorted(set(hits))
    if not unique:
        return None, f"image {name!r} not found"
    if len(unique) > 1:
        return None, f"image {name!r} is ambiguous: {', '.join(str(p) for p in unique[:3])}"
    return unique[0], None


def text(value: object) -> str | None:
    """A metadata string, or None for the spellings sources use for 'not recorded'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    return None if value.lower() in MISSING else value


def number(value: object) -> float | None:
    raw = text(value)
    if raw is None:
        return None
    try:
        out = float(raw)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def binary_value(value: object, true_words: tuple[str, ...] = (), false_words: tuple[str, ...] = ()) -> bool | None:
    """A 0/1 cell (also 0.0/1.0, true/false, yes/no, and the given words) as a bool; None when it is
    none of them."""
    raw = (text(value) or "").lower()
    if raw in TRUE_WORDS or raw in true_words:
        return True
    if raw in FALSE_WORDS or raw in false_words:
        return False
    return None


def binary_record_fields(positive: str, flag: bool) -> dict:
    """SourceRecord fields for one binary cell: `positive` "mel" or "malignant", `flag` its value.

    mel 1 -> label mel; mel 0 -> no label, melanoma False (malignancy unknown: it may be a bcc; test
    rows only); malignant 1 -> label `malignant` (melanoma unknown); malignant 0 -> label `benign`
    (so not a melanoma either). The two malignancy labels are training rows like any other.
    """
    if positive == "mel":
        return {"label": "mel"} if flag else {"label": None, "melanoma": False}
    return {"label": taxonomy.malignancy_code(flag)}


def diagnosis_fields(vocabulary: str, diagnosis: object, malignant: bool | None) -> tuple[dict | None, str | None]:
    """(SourceRecord fields, None) for a row with a finer diagnosis and/or a benign/malignant flag, or
    (None, why) when it cannot be labelled. The diagnosis goes through the taxonomy table of
    `vocabulary`; one the table does not know keeps the flag's `benign`/`malignant` label; one
    whose malignancy contradicts the flag is refused (which of the two is wrong is for a person)."""
    code = taxonomy.map_label(vocabulary, diagnosis) if text(diagnosis) is not None else None
    if code is not None and malignant is not None and taxonomy.is_malignant(code) != malignant:
        return None, (f"diagnosis {diagnosis!r} ({'malignant' if taxonomy.is_malignant(code) else 'benign'} in the "
                      f"taxonomy) contradicts the source's {'malignant' if malignant else 'benign'} flag")
    if code is not None:
        return {"label": code}, None
    if malignant is None:
        return None, f"no known diagnosis ({diagnosis!r}) and no benign/malignant flag"
    return {"label": taxonomy.malignancy_code(malignant)}, None


# Grouping ids that are placeholders, not ids: a run of zeros after a prefix (ISIC metadata's
# `IL_0000000`, `0`, `HAM_0000000`), punctuation alone (`-`, `?`) or `n/a`. Used as keys they would
# join unrelated images into one group (one split); blanks are already None (`text`).
PLACEHOLDER_ID = re.compile(r"^[a-z]*[_\-]?0+$|^[\W_]+$|^n/?a$", re.IGNORECASE)


def is_placeholder_id(value: str | None) -> bool:
    return value is not None and bool(PLACEHOLDER_ID.match(value.strip()))


def site_words(value: object) -> str | None:
    """Body site as lower-case words: 'lower_extremity' / 'LOWER EXTREMITY' -> 'lower extremity'."""
    raw = text(value)
    return None if raw is None else " ".join(raw.replace("_", " ").replace("-", " ").lower().split())


def sex_word(value: object) -> str | None:
    raw = text(value)
    if raw is None:
        return None
    raw = raw.lower()
    return {"m": "male", "f": "female"}.get(raw, raw)


FITZPATRICK = {"1": "I", "2": "II", "3": "III", "4": "IV", "5": "V", "6": "VI"}


def fitzpatrick(value: object) -> str | None:
    raw = text(value)
    if raw is None:
        return None
    raw = raw.upper().removeprefix("FST").removeprefix("TYPE").strip()
    if raw.endswith(".0"):
        raw = raw[:-2]
    return FITZPATRICK.get(raw, raw if raw in FITZPATRICK.values() else None)


class RowChecks:
    """One index file's rejects, and the checks CSV readers share; a failed check records a `Reject`
    naming the file, line and field, and returns None so the reader skips the row."""

    def __init__(self, source: str, file: str | Path):
        self.source, self.file = source, str(file)
        self.rejects: list[Reject] = []

    def reject(self, line: int, original_id: str | None, reason: str) -> None:
        self.rejects.append(Reject(self.source, self.file, line, original_id, reason))

    def row_id(self, line: int, row: dict, column: str, what: str | None = None) -> str | None:
        value = text(row.get(column))
        if value is None:
            self.reject(line, None, f"{what or column} is empty")
        return value

    def flag(self, line: int, original_id: str, row: dict, column: str, expected: str) -> bool | None:
        """The binary cell `column` of a row (`binary_value`); anything else is a Reject naming it."""
        value = binary_value(row.get(column))
        if value is None:
            self.reject(line, original_id, f"{column}={row.get(column)!r}: expected {expected}")
        return value

    def label(self, line: int, original_id: str, vocab: str, column: str, raw: object, known: str) -> str | None:
        """The taxonomy code of `raw` in `vocab`; `known` says which spellings exist."""
        label = taxonomy.map_label(vocab, raw)
        if label is None:
            self.reject(line, original_id, f"unknown label {column}={raw!r} ({known})")
        return label

    def image(self, line: int, original_id: str, images: dict[str, list[Path]], name: str, where: str = "") -> Path | None:
        path, problem = lookup_image(images, name)
        if path is None:
            self.reject(line, original_id, problem + where)
        return path


def find_file(reader: str, root: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The first file under `root` (searched recursively) matching the patterns in order of preference;
    `root` itself when it is a file. Fails naming the folder and the names looked for."""
    if not root.exists():
        raise SourceError(f"{reader}: {root} does not exist")
    if root.is_file():
        return root
    for pattern in patterns:
        hits = sorted(root.rglob(pattern))
        if hits:
            return hits[0]
    raise SourceError(f"{reader}: no {what} under {root} (looked for {', '.join(patterns)})")


def metadata_file(spec: SourceSpec, reader: str, patterns: tuple[str, ...], what: str) -> Path:
    """The metadata CSV of a source: its `metadata=` option, else the first match under PATH (find_file)."""
    if "metadata" in spec.options:
        return Path(spec.options["metadata"])
    return find_file(reader, Path(spec.path), patterns, what)


def metadata_rows(spec: SourceSpec, reader: str, patterns: tuple[str, ...], what: str, required: list[str]):
    """(metadata CSV, image folder, its image index, the CSV's rows, their RowChecks) of a source whose
    metadata table names image files found under `images=` (default: the CSV's folder)."""
    metadata = metadata_file(spec, reader, patterns, what)
    image_root = Path(spec.options.get("images", metadata.parent))
    return metadata, image_root, index_images(image_root), read_csv(metadata, required, reader), \
        RowChecks(spec.name, metadata)


def labelled_fields(checks: RowChecks, line: int, original_id: str, vocabulary: str, diagnosis: object,
                    malignant: bool | None) -> dict | None:
    """`diagnosis_fields` for one row; a row it cannot label becomes a Reject naming the row."""
    fields, why = diagnosis_fields(vocabulary, diagnosis, malignant)
    if fields is None:
        checks.reject(line, original_id, why)
    return fields
