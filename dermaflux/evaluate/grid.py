"""The protocol grid: cells (task x model x real size x synthetic ratio x seed) and running one cell.

A cell is the unit of parallelism and of resume: `run_cell` is pure (no Ray, no files) and
returns a JSON-able result; the caller writes it to `cells/<cell id>.json` atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from dermaflux.evaluate.classifier import TrainSettings, predict_proba, train_classifier
from dermaflux.evaluate.data import ImageTable, assemble_cell
from dermaflux.evaluate.metrics import classification_metrics

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

    @property
    def id(self) -> str:
        kind = "synonly" if self.synthetic_only else f"r{self.ratio:g}"
        return f"{self.task}__{self.model}__n{self.real_size}__{kind}__s{self.seed}"


def build_cells(cfg, n_train: int, has_synthetic: bool) -> list[Cell]:
    """Every cell of the grid in `cfg` (an EvaluateConfig) for a corpus with `n_train` train images."""
    if cfg.sizes:
        too_big = [s for s in cfg.sizes if s > n_train]
        if too_big:
            raise ValueError(
                f"evaluate.sizes {too_big} exceed the corpus train split ({n_train} images); "
                "use smaller sizes or evaluate.fractions"
            )
        sizes = [(int(s), round(s / n_train, 4)) for s in sorted(set(cfg.sizes))]
    else:
        sizes = [(max(1, int(round(f * n_train))), f) for f in cfg.fractions]
    ratios = cfg.ratios if has_synthetic else [r for r in cfg.ratios if r == 0] or [0.0]
    cells = []
    for task in cfg.tasks:
        for model in cfg.models:
            for size, fraction in sizes:
                for seed in range(cfg.seeds):
                    for ratio in ratios:
                        cells.append(Cell(task, model, size, float(ratio), seed, False, fraction))
                    if cfg.synthetic_only and has_synthetic:
                        cells.append(Cell(task, model, size, 0.0, seed, True, fraction))
    return cells


def run_cell(cell: Cell, real: ImageTable, synthetic: ImageTable | None, cfg) -> dict:
    """Train one classifier for `cell` and score it on the real test split."""
    start = time.perf_counter()
    data = assemble_cell(
        real, synthetic, cell.task, cell.real_size, cell.ratio, cell.seed,
        synthetic_only=cell.synthetic_only, max_test_images=cfg.max_test_images,
    )
    settings = TrainSettings.from_config(cfg, cell.model)
    model, training = train_classifier(
        data.train_x, data.train_y, data.val_x, data.val_y, data.classes, settings, seed=cell.seed
    )
    probs = predict_proba(model, data.test_x, settings.image_size)
    metrics = classification_metrics(data.test_y, probs, data.classes)
    n_syn = int(data.train_is_synthetic.sum())
    log.info("cell %s: test balanced accuracy %.3f (%d real + %d synthetic train images)",
             cell.id, metrics["balanced_accuracy"], len(data.train_y) - n_syn, n_syn)
    return {
        **asdict(cell),
        "id": cell.id,
        "classes": list(data.classes),
        "train_real": int(len(data.train_y) - n_syn),
        "train_synthetic": n_syn,
        "synthetic_shortfall": data.synthetic_shortfall,
        "val_images": int(len(data.val_y)),
        "test_images": int(len(data.test_y)),
        "test_label_counts": np.bincount(data.test_y, minlength=len(data.classes)).tolist(),
        "metrics": metrics,
        "training": training,
        "seconds": time.perf_counter() - start,
    }
