"""`dermaflux generate`: the offline Ray Data job, end to end through the CLI, and its resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dermaflux.testing.adapters import random_lora_adapter as make_lora_adapter

pytestmark = pytest.mark.integration


def test_generate_writes_exact_counts_and_resumes(ray_local, tiny_config, dermaflux_cache, tmp_path):
    from dermaflux.core import artifacts
    from dermaflux.cli import main
    from dermaflux.lesion import taxonomy
    from dermaflux.synth import bulk

    lora = make_lora_adapter(tiny_config.model, tmp_path / "lora_a", seed=1)
    out = tmp_path / "synthetic"
    argv = ["generate", "--preset", "tiny", "--lora", str(lora), "--per-class", "2", "--out", str(out),
            "--steps", "2", "--set", "synth.shard_size=5", "--set", "synth.width=32", "--set", "synth.height=32"]
    assert main(argv) == 0

    n_classes = len(taxonomy.DIAGNOSIS_CODES)
    table = pq.read_table(out / "shards")
    assert table.schema.equals(pq.read_schema(next((out / "shards").glob("*.parquet"))))
    labels = table["label"].to_pylist()
    assert {code: labels.count(code) for code in taxonomy.DIAGNOSIS_CODES} == {code: 2 for code in taxonomy.DIAGNOSIS_CODES}
    assert table.num_rows == 2 * n_classes and len(set(table["id"].to_pylist())) == table.num_rows
    assert set(table["adapter"].to_pylist()) == {"lora_a"} and set(table["width"].to_pylist()) == {32}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {code: 2 for code in taxonomy.DIAGNOSIS_CODES} and manifest["adapter_path"] == str(lora)
    assert (out / "config.yaml").exists()

    # Lose the last shard as a crash would (file and marker gone, manifest not yet written): a rerun
    # regenerates only that shard, with the same seeds, so the set is identical to the first run.
    last = bulk.shard_name(len(bulk.plan_shards(bulk.read_spec(out))) - 1)
    before = pq.read_table(out / "shards" / f"{last}.parquet")
    first_mtime = (out / "shards" / "part-00000.parquet").stat().st_mtime_ns
    (out / "shards" / f"{last}.parquet").unlink()
    artifacts.marker_path(out, last).unlink()
    (out / "manifest.json").unlink()
    assert main(argv) == 0
    assert (out / "shards" / "part-00000.parquet").stat().st_mtime_ns == first_mtime
    after = pq.read_table(out / "shards" / f"{last}.parquet")
    assert after["id"].to_pylist() == before["id"].to_pylist()
    assert after["seed"].to_pylist() == before["seed"].to_pylist()
    assert pq.read_table(out / "shards").num_rows == 2 * n_classes

    # Another spec into the same folder is refused (exit 2), not mixed in.
    per_class = argv.index("--per-class") + 1
    assert main([*argv[:per_class], "3", *argv[per_class + 1 :]]) == 2

    # --fuse-lora merges the LoRA into the base once: the same set within rounding.
    fused_out = tmp_path / "synthetic-fused"
    out_at = argv.index("--out") + 1
    assert main([*argv[:out_at], str(fused_out), *argv[out_at + 1 :], "--fuse-lora"]) == 0
    assert json.loads((fused_out / "manifest.json").read_text())["fuse_lora"] is True
    unfused_rows = {r["seed"]: r["image"] for r in pq.read_table(out / "shards").to_pylist()}
    fused_rows = {r["seed"]: r["image"] for r in pq.read_table(fused_out / "shards").to_pylist()}
    assert fused_rows.keys() == unfused_rows.keys()
    gaps = [np.abs(pixels(fused_rows[s]) - pixels(unfused_rows[s])).max() for s in fused_rows]
    assert max(gaps) <= 2, gaps


def pixels(png: bytes):
    from dermaflux.synth.sampling import decode_png

    return np.asarray(decode_png(png)).astype(np.int16)
