"""`dermaflux train` on a real local Ray: VAE fit, pre-compute (dihedral views, T5 length from the captions; a small
set in the driver, the same rows as the Ray Data job), Ray Train + DeepSpeed ZeRO-2 with two workers on a cosine schedule, TensorBoard metrics, the final
weights loading into FluxPipeline, the VAE fit in the driver as in a worker, a killed worker resuming schedule and stream, kept checkpoints, --resume;
the same under train.strategy fsdp2 (FSDP2 over gloo), its LoRA loading in plain diffusers;
and online encoding (no cache: the caption shards streamed into the workers' encoders), its loss curve against
the cached one and a killed worker resuming within its epoch."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dermaflux.testing.ham10000 import build_captioned_set

pytestmark = pytest.mark.integration


def small_train_config(captions, out, **train):
    from dermaflux.config import load_config

    settings = {
        "captions": str(captions), "out": str(out), "steps": 4, "workers": 2, "zero_stage": 2, "mode": "full",
        "micro_batch": 4, "checkpoint_every": 2, "validate_every": 4, "log_every": 1, "warmup_steps": 0,
        "lr": 1e-3, "lr_scheduler": "cosine", "validation_seeds": [0], "validation_steps": 2,
        "validation_prompts": ["dermoscopic image of a melanoma", "dermoscopic image of a melanocytic nevus"],
        "vae_fit": {"steps": 8, "batch_size": 8, "eval_images": 16}, "encode": "cached",
        **train,
    }
    return load_config("tiny", extra={"train": settings})


@pytest.fixture(scope="module")
def captions(tmp_path_factory, ham10000_dir):
    return build_captioned_set(ham10000_dir, tmp_path_factory.mktemp("captions"), n_train=48, n_test=16)


@pytest.fixture(scope="module")
def first_run(ray_local, captions, tmp_path_factory, tiny_model_dir):
    from dermaflux.train.stage import run

    cfg = small_train_config(captions, tmp_path_factory.mktemp("run") / "out")
    return cfg, run(cfg)


class ExitOnceAfterStep:
    """Trainer hook: rank `rank` exits hard after `step`, once; the marker it leaves stops the restarted worker."""

    def __init__(self, step: int, marker: Path, rank: int = 1):
        self.step, self.marker, self.rank = step, Path(marker), rank

    def __call__(self, trainer, step: int) -> None:
        if trainer.rank == self.rank and step == self.step and not self.marker.exists():
            # the losses this rank saw (all-reduced over the ranks) up to its death, for the resumed run to match
            losses = [record["loss"] for record in trainer.history]
            self.marker.write_text(json.dumps({"step": step, "pid": os.getpid(), "losses": losses}))
            os._exit(1)


def train_with_hooks(cfg, first_out, run_dir, hooks, **kwargs):
    """run_training on `first_out`'s cache and VAE with test hooks; Ray workers cannot import this
    test module, so the hooks' classes travel by value."""
    import ray.cloudpickle

    from dermaflux.train.ray_trainer import run_training

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        return run_training(cfg, f"{first_out}/cache", f"{first_out}/vae", run_dir, hooks=hooks, **kwargs)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def read_loss_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def cosine_lrs(steps, lr=1e-3):
    """diffusers' cosine schedule (no warm-up): the lr optimizer step k (from 1) runs at."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, 0, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_stage_outputs(first_run):
    from dermaflux.train.ray_tracking import read_scalars

    cfg, summary = first_run
    out = cfg.train.out
    assert summary["train"]["steps"] == 4
    assert summary["encode"]["mode"] == "cached" and summary["encode"]["reason"].startswith("train.encode: cached")
    assert summary["vae"]["psnr_test"] > summary["vae"]["psnr_before"]
    assert summary["precompute"]["encoded"] == 48  # the train split only
    assert summary["precompute"]["views"] == 8  # dihedral augmentation by default
    tokens = summary["precompute"]["text_tokens"]
    assert tokens["length"] == 64 and tokens["max"] <= 64 < cfg.model.max_sequence_length  # short captions
    assert summary["train"]["text_tokens"] == 64 and summary["train"]["micro_batch"] == 4
    rows = read_loss_csv(f"{out}/loss.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["lr"]) for r in rows] == pytest.approx(cosine_lrs(4))
    for name in ("loss.png", "validation.png", "config.yaml", "final/dermaflux_adapter.json", "final/vae/config.json"):
        assert Path(out, name).exists(), name
    # the tracker: every reported step's loss in TensorBoard's event files
    scalars = read_scalars(Path(out, "tensorboard"))
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)


def test_final_weights_load_and_change_output(first_run, tiny_config):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from dermaflux.testing.adapters import load_pipeline_with_adapters
    from dermaflux.model.loading import load_pipeline

    cfg, summary = first_run
    final = f"{cfg.train.out}/final"
    # plain diffusers: the saved transformer folder replaces the tiny one
    trained = FluxTransformer2DModel.from_pretrained(f"{final}/transformer")
    assert abs(sum(float(p.double().abs().sum()) for p in trained.state_dict().values())
               - summary["train"]["weights_checksum"]) < 1e-3 * summary["train"]["weights_checksum"]
    base = load_pipeline(tiny_config.model)
    tuned = load_pipeline_with_adapters(tiny_config.model, {"lesions": final})
    assert isinstance(tuned, FluxPipeline)

    def render(pipe):
        return pipe("dermoscopic image of a melanoma", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    assert abs(render(base) - render(tuned)).mean() > 0.01


def test_precompute_resumes_without_re_encoding(first_run):
    from dermaflux.train.ray_precompute import run_precompute

    cfg, _ = first_run
    again = run_precompute(cfg, f"{cfg.train.out}/cache", f"{cfg.train.out}/vae",
                           max_images={"train": None, "val": 0, "test": 0})
    assert {k: again[k] for k in ("rows", "cached_before", "encoded")} == {"rows": 48, "cached_before": 48, "encoded": 0}
    assert again["text_tokens"]["length"] == 64


def test_small_precompute_runs_in_the_driver_and_matches_the_ray_data_job(first_run, tmp_path):
    """48 rows (<= train.precompute_inline_rows) are encoded in the driver; the Ray Data job's actor writes the
    same rows: same ids, prompts and shapes, latents and embeddings equal to float tolerance."""
    import pyarrow as pa

    from dermaflux.train.cache import bytes_to_tensor, cache_shards, open_shard
    from dermaflux.train.ray_precompute import run_precompute

    cfg, summary = first_run
    assert summary["precompute"]["inline"] is True
    ray_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precompute_inline_rows": 0})})
    by_ray = run_precompute(ray_cfg, tmp_path / "cache", f"{cfg.train.out}/vae",
                            max_images={"train": None, "val": 0, "test": 0})
    assert by_ray["inline"] is False and by_ray["encoded"] == 48

    def rows(cache):
        table = pa.concat_tables([open_shard(p) for p in cache_shards(cache)]).sort_by("id")
        return table.to_pydict()

    inline, ray_rows = rows(f"{cfg.train.out}/cache"), rows(tmp_path / "cache")
    for key in ("id", "caption", "latents_shape", "prompt_embeds_shape", "dtype"):
        assert inline[key] == ray_rows[key], key
    for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        for row, (a, b) in enumerate(zip(inline[key], ray_rows[key])):
            shape, dtype = inline[f"{key}_shape"][row], inline["dtype"][row]
            torch.testing.assert_close(bytes_to_tensor(a, shape, dtype), bytes_to_tensor(b, shape, dtype),
                                       rtol=1e-4, atol=1e-5, msg=f"{key} of {inline['id'][row]}")


def test_local_launch_trains_in_this_process_like_a_worker_and_resumes(first_run, tmp_path):
    """train.launch local (Ray Train's local mode): the same losses as a one-worker group on the same cache, its
    checkpoints kept in the run's folder and TensorBoard fed without Ray Train's controller; a longer re-run
    continues from the last checkpoint to the losses of an uninterrupted run."""
    from dermaflux.train.ray_tracking import read_scalars
    from dermaflux.train.ray_trainer import run_training

    cfg, _ = first_run
    out = cfg.train.out

    def run(name, steps, launch, resume=False):
        # a constant lr: a 4-step run is the first 4 steps of a 6-step one (a cosine schedule depends on the length)
        run_cfg = small_train_config(cfg.train.captions, tmp_path / name, workers=1, steps=steps, launch=launch,
                                     checkpoints_kept=2, validate_every=100, lr_scheduler="constant")
        result = run_training(run_cfg, f"{out}/cache", f"{out}/vae", tmp_path / name, resume=resume)
        assert result.error is None, result.error
        with result.checkpoint.as_directory() as ckpt:
            return result, [float(r["loss"]) for r in read_loss_csv(f"{ckpt}/loss.csv")]

    _, by_worker = run("workers", 6, "workers")
    result, local = run("local", 4, "local")
    assert len(local) == 4 and local == pytest.approx(by_worker[:4], rel=1e-5)
    assert Path(result.checkpoint.path) == tmp_path / "local" / "ray" / "train" / "step-000004"
    assert sorted(p.name for p in (tmp_path / "local" / "ray" / "train").iterdir()) == ["step-000002", "step-000004"]
    assert [step for step, _ in read_scalars(tmp_path / "local" / "tensorboard")["train/loss"]] == [1, 2, 3, 4]
    threads = torch.get_num_threads()
    result, resumed = run("local", 6, "local", resume=True)
    assert torch.get_num_threads() == threads and "LOCAL_RANK" not in os.environ
    assert resumed == pytest.approx(by_worker, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "local" / "ray" / "train").iterdir()) == ["step-000004", "step-000006"]


def test_vae_fit_in_this_process_equals_the_worker_groups(first_run, tmp_path):
    """A one-worker VAE fit runs in the driver (Ray Train's local mode) unless train.launch is workers: the same
    fit as a worker group's (weights, latent factors, PSNR), no Ray Train run folder, torch's threads put back."""
    from safetensors.torch import load_file

    from dermaflux.train.ray_vae_fit import fits_locally, run_vae_fit

    cfg, _ = first_run
    by_worker_cfg = small_train_config(cfg.train.captions, tmp_path / "unused", launch="workers")
    assert fits_locally(cfg) and not fits_locally(by_worker_cfg)
    threads = torch.get_num_threads()
    local_dir, local = run_vae_fit(cfg, tmp_path / "local")
    assert torch.get_num_threads() == threads and not (tmp_path / "local" / "ray").exists()
    worker_dir, by_worker = run_vae_fit(by_worker_cfg, tmp_path / "workers")
    assert (tmp_path / "workers" / "ray" / "vae-fit").is_dir()
    assert local == pytest.approx(by_worker, rel=1e-4) and local["psnr_test"] > local["psnr_before"]
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(local_dir / weights), load_file(worker_dir / weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def lora_config(captions, out, **extra):
    """flux-dev's adapter settings, small: LoRA rank 4, alpha 16, 4 steps, a checkpoint every 2."""
    return small_train_config(captions, out, mode="lora", lr=5e-3, validate_every=100, lora={"rank": 4, "alpha": 16},
                              **extra)


@pytest.fixture(scope="module")
def lora_plain(first_run, tmp_path_factory):
    """The reference LoRA run: no checkpointing, no offload, never interrupted."""
    from dermaflux.train.ray_trainer import run_training

    cfg, _ = first_run
    out, run_dir = cfg.train.out, tmp_path_factory.mktemp("lora-plain")
    result = run_training(lora_config(cfg.train.captions, run_dir), f"{out}/cache", f"{out}/vae", run_dir)
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as ckpt:
        return [float(r["loss"]) for r in read_loss_csv(f"{ckpt}/loss.csv")]


def test_lora_with_checkpointing_and_offload_resumes_a_killed_worker_to_the_plain_run(
        first_run, lora_plain, tmp_path, tiny_model_dir):
    """flux-dev's settings (LoRA, gradient checkpointing) plus ZeRO optimizer offload; rank 1 dies after step 3
    and Ray restarts from the step-2 checkpoint. Checkpointing recomputes the same activations, offload moves
    the same AdamW to the host, and the restart restores adapter, optimizer, schedule and sample stream: so the
    losses are the uninterrupted plain run's step by step (float32 CPU: to rounding). The LoRA's alpha is saved
    where diffusers reads it; the checkpoint holds the adapter, not the frozen base; one checkpoint kept."""
    from safetensors import safe_open

    from dermaflux.model.adapters import LORA_FILE

    cfg, _ = first_run
    first_out = cfg.train.out
    cfg = lora_config(cfg.train.captions, tmp_path, gradient_checkpointing=True, offload_optimizer=True,
                      max_failures=2, checkpoints_kept=1)
    marker = tmp_path / "fault.json"
    result = train_with_hooks(cfg, first_out, tmp_path, [ExitOnceAfterStep(3, marker)])
    assert result.error is None, result.error
    assert json.loads(marker.read_text())["step"] == 3  # rank 1 really died after step 3 ...
    assert result.metrics["step"] == 4  # ... and the run finished with exactly the configured steps
    assert lora_plain[0] != lora_plain[3]  # the LoRA did train (its B starts at zero)
    with result.checkpoint.as_directory() as ckpt:
        rows = read_loss_csv(f"{ckpt}/loss.csv")
        with safe_open(f"{ckpt}/adapter/{LORA_FILE}", "pt") as saved:
            lora_meta = json.loads(saved.metadata()["lora_adapter_metadata"])
    assert (lora_meta["transformer.r"], lora_meta["transformer.lora_alpha"]) == (4, 16)
    # restarted from the step-2 checkpoint: step 3 was redone, none skipped or doubled
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # the cosine schedule continued from its saved position (a fresh scheduler would run step 3 at the full lr)
    assert [float(r["lr"]) for r in rows] == pytest.approx(cosine_lrs(4, lr=5e-3))
    assert [float(r["loss"]) for r in rows] == pytest.approx(lora_plain, rel=1e-4), (rows, lora_plain)
    # train.checkpoints_kept=1: only the newest checkpoint is left. Its DeepSpeed state holds the adapter and its
    # optimizer, not the frozen base (24 GB for FLUX.1-dev).
    [kept] = sorted((tmp_path / "ray" / "train").glob("step-*"))
    assert kept.name == "step-000004"
    ds_bytes = sum(f.stat().st_size for f in (kept / "deepspeed").rglob("*") if f.is_file())
    base_bytes = sum(f.stat().st_size for f in (tiny_model_dir / "transformer").glob("*.safetensors"))
    assert 0 < ds_bytes < 0.5 * base_bytes, (ds_bytes, base_bytes)


def test_resume_extends_a_stopped_run(first_run):
    from dermaflux.train.stage import run

    cfg, _ = first_run
    with pytest.raises(ValueError, match="no training checkpoint"):
        run(small_train_config(cfg.train.captions, f"{cfg.train.out}-elsewhere", steps=6, resume=True))
    summary = run(small_train_config(cfg.train.captions, cfg.train.out, steps=6, resume=True))
    assert summary["train"]["steps"] == 6
    assert [int(r["step"]) for r in read_loss_csv(f"{cfg.train.out}/loss.csv")] == [1, 2, 3, 4, 5, 6]


def test_fsdp2_lora_survives_a_lost_worker_and_loads_in_plain_diffusers(first_run, tmp_path, tiny_model_dir):
    """train.strategy fsdp2 (fully_shard over gloo, DCP checkpoints): rank 1 dies after the last step, before its
    report; Ray restarts from the step-2 checkpoint and the redone steps 3 and 4 see the losses the lost run saw,
    so the adapter, its AdamW moments and the schedule were restored. The LoRA loads with diffusers' own
    `load_lora_weights` and changes what the pipeline renders."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.checkpoint import FileSystemReader

    cfg, _ = first_run
    first_out = cfg.train.out
    cfg = small_train_config(cfg.train.captions, tmp_path, strategy="fsdp2", mode="lora", lr=5e-3, max_failures=1,
                             validate_every=100, lora={"rank": 4, "alpha": 8}, tracking=[])
    marker = tmp_path / "fault.json"
    result = train_with_hooks(cfg, first_out, tmp_path, [ExitOnceAfterStep(4, marker)])
    assert result.error is None, result.error
    lost = json.loads(marker.read_text())
    assert lost["step"] == 4 and result.metrics["step"] == 4
    with result.checkpoint.as_directory() as ckpt:
        rows = read_loss_csv(f"{ckpt}/loss.csv")
        ckpt = Path(ckpt)
        assert (ckpt / "fsdp2" / ".metadata").exists() and not (ckpt / "deepspeed").exists()
        # DCP holds the adapter and its optimizer state only, not the frozen base
        saved = FileSystemReader(str(ckpt / "fsdp2")).read_metadata().state_dict_metadata
        model_keys = [k for k in saved if k.startswith("model.")]
        assert model_keys and all(".lora_" in k for k in model_keys), [k for k in model_keys if ".lora_" not in k][:3]
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
        assert [float(r["lr"]) for r in rows] == pytest.approx(cosine_lrs(4, lr=5e-3))
        losses = [float(r["loss"]) for r in rows]
        assert losses[0] != losses[3]  # the LoRA trained (its B starts at zero)
        assert losses == pytest.approx(lost["losses"], rel=1e-5)  # steps 3 and 4 redone from the restored state

        base = FluxPipeline.from_pretrained(tiny_model_dir)
        tuned = FluxPipeline.from_pretrained(tiny_model_dir)
        tuned.load_lora_weights(ckpt / "adapter", adapter_name="lesions")
    loaded = get_peft_model_state_dict(tuned.transformer, adapter_name="lesions")
    checksum = sum(float(t.double().abs().sum()) for t in loaded.values())
    assert checksum == pytest.approx(result.metrics["weights_checksum"], rel=1e-5)

    def render(pipe):
        return pipe(prompt_embeds=torch.ones(1, 8, pipe.transformer.config.joint_attention_dim),
                    pooled_prompt_embeds=torch.ones(1, pipe.transformer.config.pooled_projection_dim),
                    height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    assert abs(render(base) - render(tuned)).mean() > 1e-4


class RecordRows:
    """Trainer hook: each rank appends the ids its step trained on (online encoding) to `path`, one JSON line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, trainer, step: int) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"rank": trainer.rank, "step": step, "ids": trainer.data.last_ids}) + "\n")


@pytest.fixture(scope="module")
def online_run(first_run, tmp_path_factory):
    """The same small run through the stage, encode auto: 8 steps x 8 samples over 48 rows is 1.33 epochs, so
    online. Rank 1 dies once after step 5 (each rank's epoch-0 share is 24 rows, 4 per step), and every rank
    records the ids each step trained on."""
    import ray.cloudpickle

    from dermaflux.train.stage import run

    cfg, _ = first_run
    root = tmp_path_factory.mktemp("online")
    online = small_train_config(cfg.train.captions, root / "out", steps=8, encode="auto", validate_every=100,
                                max_failures=2)
    marker, record = root / "fault.json", root / "rows.jsonl"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks travel to the workers by value
    try:
        summary = run(online, hooks=[RecordRows(record), ExitOnceAfterStep(5, marker)])
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return online, summary, json.loads(marker.read_text()), [json.loads(x) for x in record.read_text().splitlines()]


def test_online_trains_without_a_cache_along_the_cached_curve(first_run, online_run):
    cfg, _ = first_run
    online, summary, _, _ = online_run
    plan = summary["encode"]
    assert plan["mode"] == "online" and "1.33 planned epochs < 2" in plan["reason"], plan
    assert plan["cache_bytes"] == 48 * plan["cache_bytes_per_row"] > 0  # sized, never written:
    assert [p.name for p in Path(online.train.out, "cache").iterdir()] == ["validation.pt"]
    assert "precompute" not in summary and summary["train"]["encode"] == "online"
    assert summary["train"]["text_tokens"] == 64 == plan["text_tokens"]  # still picked from the corpus
    cached = [float(r["loss"]) for r in read_loss_csv(f"{cfg.train.out}/loss.csv")][:4]
    streamed = [float(r["loss"]) for r in read_loss_csv(f"{online.train.out}/loss.csv")]
    assert len(streamed) == 8
    # Same noise and timesteps per step (seeded by the step), other images and views: within noise of each other.
    assert streamed[:4] == pytest.approx(cached, rel=0.25), (streamed, cached)
    assert abs(np.mean(streamed[:4]) - np.mean(cached)) < 0.1 * np.mean(cached)


def test_online_worker_killed_mid_epoch_resumes_its_stream(online_run):
    """Both ranks restart from the step-4 checkpoint at stream position 16: each rank trains on its share once
    in epoch 0 (none twice, none skipped), the redone step 5 repeats the lost run's loss, and epoch 1 starts
    over the share without repeats."""
    from dermaflux.train.precompute import train_rows

    online, summary, lost, lines = online_run
    assert lost["step"] == 5 and summary["train"]["steps"] == 8
    assert [r["rank"] for r in lines if r["step"] == 5].count(1) == 2  # step 5 ran before the kill and after it
    final = {(r["rank"], r["step"]): r["ids"] for r in lines}  # the last record of each step: what the run kept
    ids = train_rows(online)["id"].to_pylist()
    assert len(ids) == 48
    for rank in (0, 1):
        share = sorted(ids[rank::2])
        epoch0 = [i for step in range(1, 7) for i in final[(rank, step)]]
        assert sorted(epoch0) == share  # its whole share, each row once
        epoch1 = [i for step in (7, 8) for i in final[(rank, step)]]
        assert len(set(epoch1)) == 8 and set(epoch1) <= set(share)
    resumed = [float(r["loss"]) for r in read_loss_csv(Path(online.train.out, "loss.csv"))]
    assert len(resumed) == 8
    assert resumed[:5] == pytest.approx(lost["losses"], rel=1e-5)  # steps 1-4 kept, step 5 redone the same
