"""`dermaflux train` with the tiny demo's conditioning options on a real local Ray: diagnosis-style prompts
in the cache and the validation renders, caption dropout observed in the Trainer's own batch stream, and an
adapter that records both, which sampling then follows (styled prompts, classifier-free guidance)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dermaflux.lesion.attributes import DIAGNOSIS_NAMES
from dermaflux.testing.ham10000 import build_captioned_set

pytestmark = pytest.mark.integration

DROPOUT = 0.25
OBSERVED_MICRO_STEPS = 60  # 480 samples of the stream


class RecordDropout:
    """Trainer hook: once, rank 0 builds the first OBSERVED_MICRO_STEPS micro-batches of its stream and writes
    which samples carry the empty prompt's embeddings (T5 and pooled CLIP), against the planned ones."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, trainer, step: int) -> None:
        from dermaflux.train.cache import micro_batch_dropped

        if trainer.rank != 0 or self.path.exists():
            return
        empty_t5, empty_pooled = (t.to(trainer.dtype) for t in trainer.empty_prompt)
        observed, planned = [], []
        for micro_step in range(OBSERVED_MICRO_STEPS):
            batch, _ = trainer._micro_batch(micro_step)
            for t5, pooled in zip(batch.prompt_embeds.cpu(), batch.pooled_prompt_embeds.cpu()):
                observed.append(bool(torch.equal(t5, empty_t5) and torch.equal(pooled, empty_pooled)))
            planned += micro_batch_dropped(len(trainer.data), trainer.tc.seed, micro_step, 0, 1,
                                           trainer.tc.micro_batch, trainer.tc.caption_dropout).tolist()
        self.path.write_text(json.dumps({"observed": observed, "planned": planned}))


@pytest.fixture(scope="module")
def conditioned_run(ray_local, tmp_path_factory, ham10000_dir, tiny_model_dir):
    from dermaflux.config import load_config
    from dermaflux.train.ray_trainer import run_training
    from dermaflux.train.stage import _copy_final, _precompute, _vae_fit

    work = tmp_path_factory.mktemp("conditioned")
    captions = build_captioned_set(ham10000_dir, work / "captions", n_train=40, n_test=8)
    cfg = load_config("tiny", extra={"train": {
        "captions": str(captions), "out": str(work / "out"), "steps": 2, "micro_batch": 8, "workers": 1,
        "checkpoint_every": 2, "validate_every": 2, "validation_seeds": [0], "validation_steps": 2,
        "caption_style": "diagnosis", "caption_dropout": DROPOUT, "sampling_guidance": "true_cfg",
        "vae_fit": {"steps": 2, "batch_size": 4, "eval_images": 8}}})
    # The stage's steps one by one, so the Trainer can be given the recording hook.
    out = Path(cfg.train.out)
    _vae_fit(cfg, out)
    _precompute(cfg, out / "cache", str(out / "vae"))
    record = work / "dropout.json"
    # Ray workers cannot import this test module: ship the hook's class by value.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = run_training(cfg, out / "cache", str(out / "vae"), out, hooks=[RecordDropout(record)])
    finally:
        ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as ckpt:
        _copy_final(Path(ckpt), out)
    return cfg, out, json.loads(record.read_text())


def test_cache_holds_diagnosis_prompts_and_the_empty_prompt(conditioned_run):
    from dermaflux.train.cache import cache_shards, open_shard

    cfg, out, _ = conditioned_run
    cached = open_shard(cache_shards(out / "cache")[0]).select(["label", "caption"]).to_pydict()
    assert cached["caption"] == [DIAGNOSIS_NAMES[label][0] for label in cached["label"]]
    validation = torch.load(out / "cache" / "validation.pt")
    assert validation["prompts"] == ["melanoma", "melanocytic nevus", "basal cell carcinoma", "vascular lesion"]
    assert validation["empty_prompt_embeds"].shape == validation["prompt_embeds"].shape[1:]
    assert (out / "final" / "transformer").exists()


def test_caption_dropout_rate_is_observed_in_the_batch_stream(conditioned_run):
    _, _, record = conditioned_run
    observed, planned = np.array(record["observed"]), np.array(record["planned"])
    assert len(observed) == OBSERVED_MICRO_STEPS * 8
    assert np.array_equal(observed, planned)  # exactly the planned samples, no others
    assert abs(observed.mean() - DROPOUT) < 0.06  # 480 samples: sd of the share about 0.02


def test_sampling_follows_what_the_adapter_records(conditioned_run):
    from diffusers import FluxPipeline

    from dermaflux.config import load_config
    from dermaflux.model.adapters import read_adapter
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.requests import SampleRequest, Settings
    from dermaflux.synth.sampling import generate_images

    cfg, out, _ = conditioned_run
    meta = read_adapter(out / "final").meta
    assert {k: meta[k] for k in ("caption_style", "caption_dropout", "sampling_guidance", "train_guidance")} == {
        "caption_style": "diagnosis", "caption_dropout": DROPOUT, "sampling_guidance": "true_cfg",
        "train_guidance": 1.0}
    pool = AdapterPool.from_config(load_config("tiny", overrides=[f"synth.adapters=[{out / 'final'}]"]),
                                   preload=["final"])
    prompt = "Dermoscopy photo of a malignant melanoma, markedly asymmetric. On the back."
    settings = Settings(64, 64, 2, 4.0, "final")
    sampled = np.asarray(generate_images(pool, [SampleRequest(prompt, 3, settings)], max_sequence_length=128)[0])
    pipe = pool.pipeline_for("final")

    assert meta["text_tokens"] == 64  # the captions' bucket (train.text_tokens auto): sampled at it, not at 128

    def render(prompt_text: str, **guidance) -> np.ndarray:
        return pipe(prompt=[prompt_text], height=64, width=64, num_inference_steps=2, max_sequence_length=64,
                    generator=[torch.Generator().manual_seed(3)], output_type="pil", **guidance).images[0]

    expected = render("melanoma", guidance_scale=1.0, true_cfg_scale=4.0, negative_prompt=[""])
    assert np.array_equal(sampled, np.asarray(expected))
    # neither the raw caption nor the guidance embedding alone gives that image
    assert not np.array_equal(sampled, np.asarray(render(prompt, guidance_scale=1.0, true_cfg_scale=4.0,
                                                         negative_prompt=[""])))
    assert not np.array_equal(sampled, np.asarray(render("melanoma", guidance_scale=4.0)))
