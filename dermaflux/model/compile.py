"""torch.compile of the transformer's repeated blocks, falling back to eager with one warning (pure torch);
used by training (`train.compile`) and sampling (`synth.compile`).

Regional compilation (diffusers' `compile_repeated_blocks`: FluxTransformerBlock and
FluxSingleTransformerBlock) compiles one block of each kind and reuses it 19 + 38 times: a rank-16
LoRA step at batch 4 / 512 tokens ran 0.406 s compiled against 0.533 s eager on an H200 (issue 11).
Compilation is lazy, so failures (an Inductor assertion recompiling for batch 8 was seen on torch 2.11)
surface at the first forward or backward: `compile_blocks` runs the caller's probe, one real
forward + backward at the training shape, and on any error switches this process to eager
(`torch.compiler.set_stance("force_eager")`) with one warning. Training then keeps that shape, so it
does not recompile; other shapes (validation renders) run under `eager()`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def _compile_in_place(transformer, **options) -> str:
    """Compile the repeated blocks in place; returns how."""
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**options)
        return "compile_repeated_blocks"
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, name, [])]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks to compile")
    for block in blocks:
        block.compile(**options)
    return "per-block torch.compile"


def compile_blocks(transformer, probe: Callable[[], None], setting: str = "train.compile", work: str = "training",
                   **options) -> bool:
    """Compile `transformer`'s repeated blocks and run `probe` (which must leave no state behind, e.g. a
    forward + backward whose gradients it clears). True when compiled; False, after one warning, when
    compiling or the probe failed and this process runs eager from now on. `setting` and `work` name the
    config field and what runs eager in that warning; `options` go to torch.compile."""
    try:
        how = _compile_in_place(transformer, **options)
        probe()
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
        torch.compiler.set_stance("force_eager")
        root = err
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner  # Dynamo wraps the backend's own error (BackendCompilerFailed.inner_exception)
        first_line = (str(root).strip().splitlines() or [""])[0][:300]
        log.warning("%s: compiling the transformer failed (%s: %s); %s runs eager",
                    setting, type(root).__name__, first_line, work)
        return False
    log.info("%s: %s", setting, how)
    return True


@contextlib.contextmanager
def eager():
    """Run compiled modules eagerly inside (no recompilation for a one-off shape such as a validation render)."""
    with torch.compiler.set_stance("force_eager"):
        yield
