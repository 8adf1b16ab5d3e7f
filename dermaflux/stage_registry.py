"""The five stages in pipeline order: where each one's code, config section and paths are.

One table read by the pipeline, the Ray job entrypoints and config validation, so a stage's
path fields are named once (see the path-field contract in each stage's config module).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # CLI subcommand and job file name (jobs/<name>.py)
    section: str  # config section holding the stage's settings
    module: str  # module defining run(cfg) -> dict
    inputs: tuple[str, ...]  # path fields of the section that the stage reads (str or list of str)
    output: str = "out"

    def available(self) -> bool:
        """The stage's code is installed (stages land one by one; a missing one is never faked)."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def load(self):
        return importlib.import_module(self.module)

    def run(self, cfg) -> dict:
        """The stage's run(cfg); re-running the same config resumes (each stage's own contract)."""
        return self.load().run(cfg)

    def section_of(self, cfg):
        return getattr(cfg, self.section, None)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("curate", "curate", "dermaflux.corpus.stage", inputs=()),
    StageSpec("caption", "caption", "dermaflux.caption.stage", inputs=("corpus",)),
    StageSpec("train", "train", "dermaflux.train.stage", inputs=("captions",)),
    StageSpec("generate", "synth", "dermaflux.synth.stage", inputs=("adapters",)),
    StageSpec("evaluate", "evaluate", "dermaflux.evaluate.stage", inputs=("corpus", "synthetic")),
)

BY_NAME = {spec.name: spec for spec in STAGES}


def get_stage(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None
