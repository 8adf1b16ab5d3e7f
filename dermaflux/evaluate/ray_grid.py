"""Grid cells as Ray tasks: the decoded images (real, synthetic, control sets) go into the object
store once, each cell is one task reserving `cpus_per_cell` CPUs, at most `parallel_cells` in
flight; results come back to the driver, which writes each one as it arrives (so a stopped run
resumes at the next cell)."""

from __future__ import annotations

import logging
from typing import Callable

from dermaflux.core.progress import bar as progress_bar
from dermaflux.evaluate.config import EvaluateConfig
from dermaflux.evaluate.controls import MATCHED
from dermaflux.evaluate.data import ImageTable
from dermaflux.evaluate.grid import Cell

log = logging.getLogger(__name__)


def _run_cell_task(cell: Cell, real: ImageTable, synthetic: ImageTable | None, cfg: EvaluateConfig,
                   mix_of: ImageTable | None = None) -> dict:
    from dermaflux.evaluate.grid import run_cell

    return run_cell(cell, real, synthetic, cfg, mix_of)


def _assess_task(real: ImageTable, synthetic: ImageTable, cfg: EvaluateConfig, synthetic_images: dict[str, bytes] | None) -> dict:
    from dermaflux.evaluate.assess import assess_synthetic

    return assess_synthetic(real, synthetic, cfg, synthetic_images)


def run_grid(
    cells: list[Cell],
    real: ImageTable,
    synthetic: ImageTable | None,
    cfg: EvaluateConfig,
    on_cell: Callable[[Cell, dict], None],
    assess: bool = False,
    on_assessment: Callable[[dict], None] | None = None,
    controls: dict[str, ImageTable] | None = None,
    synthetic_images: dict[str, bytes] | None = None,
) -> list[str]:
    """Run `cells` (and the synthetic-set assessment when `assess`) on the connected Ray cluster.
    A cell of a control arm trains on `controls[arm]` (the matched control: on the real-extra pool, to
    the synthetic set's class mix); the assessment gets the synthetic images'
    encoded bytes (`synthetic_images`, by id) for the attribute extractor.
    Returns the ids of failed cells; finished ones have been handed to `on_cell`."""
    import ray

    options = {"num_cpus": cfg.cpus_per_cell, "num_gpus": cfg.gpus_per_cell, "max_retries": 1}
    cell_remote = ray.remote(_run_cell_task).options(**options)
    real_ref = ray.put(real)
    arm_refs = {"synthetic": ray.put(synthetic)}
    arm_refs.update({arm: ray.put(table) for arm, table in (controls or {}).items()})
    syn_ref = arm_refs["synthetic"]
    if "real-extra" in arm_refs:
        arm_refs[MATCHED] = arm_refs["real-extra"]
    queue: list[Cell | str] = (["assessment"] if assess else []) + list(cells)
    pending: dict = {}
    failed: list[str] = []
    # One bar for the grid's cells and the synthetic-set assessment (a task like a cell).
    with progress_bar("evaluate", "evaluate", len(queue), "tasks") as bar:
        while queue or pending:
            while queue and len(pending) < cfg.parallel_cells:
                job = queue.pop(0)
                if job == "assessment":
                    ref = ray.remote(_assess_task).options(**options).remote(real_ref, syn_ref, cfg, synthetic_images)
                else:
                    mix_ref = syn_ref if job.arm == MATCHED else None
                    ref = cell_remote.remote(job, real_ref, arm_refs[job.arm], cfg, mix_ref)
                pending[ref] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                name = job if isinstance(job, str) else job.id
                try:
                    result = ray.get(ref)
                except Exception as err:  # a failed cell must not lose the others' results
                    log.error("evaluate: %s failed: %s", name, err)
                    failed.append(name)
                else:
                    if isinstance(job, str):
                        on_assessment(result)
                    else:
                        on_cell(job, result)
                bar.update(1, note=f"{name} done")
    return failed
