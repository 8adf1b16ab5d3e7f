"""The protocol grid: cells (task x model x real size x arm x synthetic ratio x seed) and running one cell.

A cell is the unit of parallelism and of resume: `run_cell` is pure (no Ray, no files) and
returns a JSON-able result plus its per-image predictions; the caller writes them to
`cells/<cell id>.json` and `cells/<cell id>.parquet`.

Arms: "synthetic" (the synthetic set; ratio 0 is the real-only baseline) and, with
`evaluate.controls`, "real-extra", "shuffled" and (with a synthetic set) "matched" (see controls.py). The cells of one seed and
real size share the real subset, so each non-zero ratio pairs with the seed's baseline.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from dermaflux.evaluate.classifier import TrainSettings, predict_proba, train_classifier
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.controls import MATCHED, control_arms
from dermaflux.evaluate.data import CellData, ImageTable, assemble_cell
from dermaflux.evaluate.metrics import choose_threshold, score_test_set

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    task: str
    model: str
    real_size: int
    ratio: float
    seed: int
    synthetic_only: bool = False
    fraction: float | None = None
    arm: str = "synthetic"  # synthetic | real-extra | shuffled | matched

    @property
    def id(self) -> str:
        kind = "synonly" if self.synthetic_only else f"r{self.ratio:g}"
        if self.arm != "synthetic":
            kind = f"{self.arm.replace('-', '')}-{kind}"
        return f"{self.task}__{self.model}__n{self.real_size}__{kind}__s{self.seed}"


def grid_sizes(cfg: EvaluateConfig, n_train: int) -> list[tuple[int, float]]:
    """(real images, fraction of the train split) per grid size."""
    if cfg.sizes:
        too_big = [s for s in cfg.sizes if s > n_train]
        if too_big:
            raise ValueError(
                f"evaluate.sizes {too_big} exceed the corpus train split ({n_train} images); "
                "use smaller sizes or evaluate.fractions"
            )
        return [(int(s), round(s / n_train, 4)) for s in sorted(set(cfg.sizes))]
    return [(max(1, int(round(f * n_train))), f) for f in cfg.fractions]


def control_ratios(cfg: EvaluateConfig) -> list[float]:
    """The controls run at the grid's non-zero ratios (1:1 when it has none)."""
    return [r for r in cfg.ratios if r > 0] or [1.0]


def build_cells(cfg: EvaluateConfig, n_train: int, has_synthetic: bool) -> list[Cell]:
    """Every cell of the grid in `cfg` (an EvaluateConfig) for a corpus with `n_train` train images."""
    ratios = cfg.ratios if has_synthetic else [r for r in cfg.ratios if r == 0] or [0.0]
    if 0.0 not in ratios and cfg.controls:
        ratios = [0.0, *ratios]  # the controls pair with the real-only baseline
    cells = []
    for task in cfg.tasks:
        for model in cfg.models:
            for size, fraction in grid_sizes(cfg, n_train):
                for seed in range(cfg.seeds):
                    for ratio in ratios:
                        cells.append(Cell(task, model, size, float(ratio), seed, False, fraction))
                    if cfg.synthetic_only and has_synthetic:
                        cells.append(Cell(task, model, size, 0.0, seed, True, fraction))
                    for arm in control_arms(has_synthetic) if cfg.controls else ():
                        cells += [Cell(task, model, size, float(r), seed, False, fraction, arm)
                                  for r in control_ratios(cfg)]
    return cells


def run_cell(cell: Cell, real: ImageTable, synthetic: ImageTable | None, cfg: EvaluateConfig,
             mix_of: ImageTable | None = None) -> dict:
    """Train one classifier for `cell` and score it on every real test set. `synthetic` is the
    table of the cell's arm (the synthetic set or a control); `mix_of`, for the matched control,
    the synthetic set whose class mix it copies. The result holds "predictions" (columns of
    per-image scores on val and every test set) for the caller to save apart."""
    start = time.perf_counter()
    if (cell.arm == MATCHED) != (mix_of is not None):
        raise ValueError(f"cell {cell.id}: the matched control, and it alone, needs the synthetic set's class mix")
    data = assemble_cell(
        real, synthetic, cell.task, cell.real_size, cell.ratio, cell.seed,
        synthetic_only=cell.synthetic_only, max_test_images=cfg.max_test_images, mix_of=mix_of,
    )
    settings = TrainSettings.from_config(cfg, cell.model)
    model, training = train_classifier(
        data.train_x, data.train_y, data.val_x, data.val_y, data.classes, settings, seed=cell.seed
    )
    val_probs = predict_proba(model, data.val_x, settings.image_size)
    threshold = choose_threshold(data.val_y == 1, val_probs[:, 1]) if len(data.classes) == 2 else None
    scored, predictions = {}, [_prediction_rows(data.val_ids, "val", None, data.val_y, val_probs)]
    for name, test in data.tests.items():
        probs = predict_proba(model, test.x, settings.image_size)
        scored[name] = {"images": len(test.y), "left_out": test.left_out, "metrics": score_test_set(
            test.y, probs, data.classes, threshold), "label_counts": np.bincount(test.y, minlength=len(
                data.classes)).tolist()}
        predictions.append(_prediction_rows(test.ids, "test", name, test.y, probs))
    n_syn = int(data.train_is_synthetic.sum())
    log.info("cell %s: %s (%d real + %d synthetic train images, %d steps)", cell.id,
             ", ".join(f"{k} AUROC {v['metrics']['auroc']:.3f}" for k, v in scored.items()),
             len(data.train_y) - n_syn, n_syn, training["optimizer_steps"])
    return {
        **asdict(cell), "id": cell.id, "classes": list(data.classes), **_make_up(data), "threshold": threshold,
        "val_images": int(len(data.val_y)), "test_sets": scored, "training": training,
        "predictions": _columns(predictions, data.classes), "seconds": time.perf_counter() - start,
    }


def _make_up(data: CellData) -> dict:
    """What the training set really held: counts, shortfall, and the class mix of each part."""
    syn = data.train_is_synthetic
    return {
        "train_real": int((~syn).sum()), "train_synthetic": int(syn.sum()),
        "synthetic_wanted": data.synthetic_wanted, "synthetic_shortfall": data.synthetic_shortfall,
        "synthetic_duplicated": data.synthetic_duplicated,
        "train_real_label_counts": dict(sorted(Counter(data.train_labels[~syn].tolist()).items())),
        "train_synthetic_label_counts": dict(sorted(Counter(data.train_labels[syn].tolist()).items())),
    }


def _prediction_rows(ids: list[str], split: str, test_set: str | None, y: np.ndarray, probs: np.ndarray) -> dict:
    return {"id": list(ids), "split": [split] * len(ids), "test_set": [test_set] * len(ids),
            "target": y.astype(np.int64), "probs": probs}


def _columns(parts: list[dict], classes: tuple[str, ...]) -> dict:
    """One table of per-image predictions: id, split, test_set, target, score (P(positive) of a
    two-class task), score_<class> for every class."""
    probs = np.concatenate([p["probs"] for p in parts])
    columns = {key: sum((list(p[key]) for p in parts), []) for key in ("id", "split", "test_set")}
    columns["target"] = np.concatenate([p["target"] for p in parts])
    if len(classes) == 2:
        columns["score"] = probs[:, 1]
    for i, name in enumerate(classes):
        columns[f"score_{name}"] = probs[:, i]
    return columns
