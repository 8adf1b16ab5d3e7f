"""Which adapters a synthesis process serves, under which names, and the pipeline holding them.

`synth.adapters` entries are `DIR` (served under the folder's name) or `NAME=DIR`. All LoRAs are
loaded once into one pipeline and switched per batch (see sampling.activate_adapter); at most
one "full" adapter replaces the base transformer.
"""

from __future__ import annotations

from pathlib import Path

from dermaflux.model.adapters import read_adapter


def adapter_folders(entries: list[str]) -> dict[str, str]:
    """{name: folder}; names must be unique, folders must be adapter folders (errors name the entry)."""
    table: dict[str, str] = {}
    for number, entry in enumerate(entries):
        name, sep, folder = entry.partition("=")
        if not sep:
            folder, name = entry, Path(entry.rstrip("/")).name
        if not name:
            raise ValueError(f"synth.adapters[{number}] {entry!r}: empty adapter name")
        if name in table:
            raise ValueError(f"synth.adapters[{number}] {entry!r}: name {name!r} is already used by {table[name]}")
        try:
            read_adapter(folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"synth.adapters[{number}]: {err}") from None
        table[name] = str(Path(folder).resolve())
    return table


def load_synthesis_pipeline(cfg, device: str = "cpu"):
    """The base pipeline with every configured adapter, on `device`, progress bars off."""
    from dermaflux.model.adapters import load_pipeline_with_adapters

    folders = adapter_folders(cfg.synth.adapters)
    pipe = load_pipeline_with_adapters(cfg.model, folders)
    # A "full" adapter (the tiny preset's fine-tune) replaces the transformer itself: requests
    # naming it run with every LoRA off (see sampling.activate_adapter).
    pipe.dermaflux_full_adapters = frozenset(n for n, f in folders.items() if read_adapter(f).kind == "full")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
