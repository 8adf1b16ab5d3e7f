"""The synthesis core without Ray: request checks, batched sampling, adapter switching, bulk jobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dermaflux.testing.adapters import random_lora_adapter as make_lora_adapter


@pytest.fixture(scope="module")
def adapters(tiny_config, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "lora_a": make_lora_adapter(tiny_config.model, root / "lora_a", seed=1),
        "lora_b": make_lora_adapter(tiny_config.model, root / "lora_b", seed=2),
    }


@pytest.fixture(scope="module")
def synth_cfg(tiny_config, adapters):
    from dermaflux.config import load_config

    return load_config("tiny", extra={"synth": {"adapters": [str(p) for p in adapters.values()]}})


@pytest.fixture(scope="module")
def pipe(synth_cfg):
    """An AdapterPool; adapters load on first use and stay (the offline job's mode)."""
    from dermaflux.synth.adapter_pool import AdapterPool

    return AdapterPool.from_config(synth_cfg)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer_2")


def generate(pipe, requests, **options):
    from dermaflux.synth.sampling import generate_images

    return generate_images(pipe, requests, max_sequence_length=128, **options)  # the tiny preset's T5 budget


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def request(prompt="a dermoscopic image of a melanoma", seed=0, adapter=None, size=64, steps=4):
    from dermaflux.synth.requests import SampleRequest, Settings

    return SampleRequest(prompt, seed, Settings(size, size, steps, 3.5, adapter))


# --- request checks ---------------------------------------------------------------------------------


def test_image_request_expands_with_preset_defaults_and_template_caption(synth_cfg, tokenizer):
    from dermaflux.lesion.captions import caption_from_attributes
    from dermaflux.synth.requests import ImageRequest, expand_image_request

    body = ImageRequest(attributes={"diagnosis": "mel", "colours": ["black", "dark_brown"]}, count=3, seed=7)
    samples = expand_image_request(body, synth_cfg, ["lora_a"], tokenizer)
    assert [s.seed for s in samples] == [7, 8, 9]
    assert samples[0].prompt == caption_from_attributes(body.attributes, 7)  # the training writer, verbatim
    settings = samples[0].settings
    assert (settings.width, settings.height, settings.num_inference_steps) == (64, 64, synth_cfg.model.num_inference_steps)
    assert settings.guidance_scale == synth_cfg.model.guidance_scale and settings.adapter is None


@pytest.mark.parametrize(
    "fields, bad_field, status",
    [
        ({"width": 72}, "width", 422),
        ({"height": 2048}, "height", 422),
        ({"count": 9}, "count", 422),
        ({"adapter": "nope"}, "adapter", 404),
        ({"num_inference_steps": 1000}, "num_inference_steps", 422),
        ({"prompt": "melanoma " * 200}, "prompt", 422),
    ],
)
def test_bad_image_requests_name_the_field(synth_cfg, tokenizer, fields, bad_field, status):
    from dermaflux.synth.requests import ImageRequest, RequestError, expand_image_request

    body = ImageRequest(**{"prompt": "a nevus", **fields})
    with pytest.raises(RequestError) as err:
        expand_image_request(body, synth_cfg, ["lora_a"], tokenizer)
    assert err.value.field == bad_field and err.value.status == status


def test_request_schema_refusals():
    from dermaflux.synth.requests import AugmentationRequest, ImageRequest, RequestError, check_labels

    with pytest.raises(ValidationError, match="exactly one of"):
        ImageRequest(prompt="a nevus", attributes={"diagnosis": "nv"})
    with pytest.raises(ValidationError, match="unknown diagnosis"):
        ImageRequest(attributes={"diagnosis": "wart"})
    with pytest.raises(ValidationError, match="extra"):
        ImageRequest(prompt="a nevus", colour="red")
    with pytest.raises(ValidationError, match="needs `corpus`"):
        AugmentationRequest(job_id="j", bring_to=10)
    with pytest.raises(RequestError, match="unknown class 'wart'"):
        check_labels({"mel": 2, "wart": 1})


# --- sampling -----------------------------------------------------------------------------------


def test_same_request_same_image_alone_or_batched(pipe):
    target = request(seed=11)
    alone = generate(pipe, [target])[0]
    again = generate(pipe, [target])[0]
    batched = generate(pipe, [request("a nevus", 3), target, request(seed=12)], max_batch_size=4)
    assert alone.size == (64, 64)
    assert np.array_equal(pixels(alone), pixels(again))
    # Batched GEMMs sum in another order: at most one grey level of float32 rounding.
    assert np.abs(pixels(alone) - pixels(batched[1])).max() <= 1
    assert np.abs(pixels(batched[1]) - pixels(batched[2])).mean() > 5  # another seed is another image


def test_mixed_settings_are_split_into_equal_setting_batches():
    from dermaflux.synth.sampling import group_by_settings

    requests = [request(seed=i, adapter="a" if i % 2 else None) for i in range(7)] + [request(size=32)]
    batches = group_by_settings(requests, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(len({requests[i].settings for i in b}) == 1 and len(b) <= 3 for b in batches)
    assert len(batches) == 4  # 4 base (3+1), 3 adapter "a", 1 of 32 px


def base_state(pool) -> dict:
    """The base transformer's own weights (LoRA layers excluded; peft renames wrapped ones `base_layer`), copied."""
    return {k.replace(".base_layer", ""): v.detach().clone()
            for k, v in pool.base.transformer.state_dict().items() if "lora_" not in k}


def test_adapters_switch_without_changing_the_base(pipe):
    base_weights = base_state(pipe)
    base_before = pixels(generate(pipe, [request(seed=5)])[0])
    lora_a = pixels(generate(pipe, [request(seed=5, adapter="lora_a")])[0])
    lora_b = pixels(generate(pipe, [request(seed=5, adapter="lora_b")])[0])
    lora_a_again = pixels(generate(pipe, [request(seed=5, adapter="lora_a")])[0])
    base_after = pixels(generate(pipe, [request(seed=5)])[0])
    assert pipe.loaded() == ["lora_a", "lora_b"] and pipe.loads == {"lora_a": 1, "lora_b": 1}
    assert np.abs(lora_a - lora_b).mean() > 5 and np.abs(lora_a - base_before).mean() > 5
    assert np.array_equal(lora_a, lora_a_again)
    assert np.array_equal(base_before, base_after)
    after = base_state(pipe)
    assert after.keys() == base_weights.keys() and all(torch_equal(after[k], base_weights[k]) for k in after)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_unload_then_reload_gives_the_same_images_and_frees_the_lora(synth_cfg):
    """What Serve's multiplexer does on eviction: delete the LoRA, later load it again."""
    from dermaflux.synth.adapter_pool import AdapterPool

    pool = AdapterPool.from_config(synth_cfg, preload=["lora_a"])
    first = pixels(generate(pool, [request(seed=9, adapter="lora_a")])[0])
    pool.unload("lora_a")
    assert pool.loaded() == []
    assert not any("lora_" in k for k in pool.base.transformer.state_dict())  # LoRA weights are gone
    base = pixels(generate(pool, [request(seed=9)])[0])
    again = pixels(generate(pool, [request(seed=9, adapter="lora_a")])[0])
    assert np.array_equal(first, again) and np.abs(first - base).mean() > 5
    assert pool.loads == {"lora_a": 2} and pool.unloads == {"lora_a": 1}
    with pytest.raises(KeyError, match="not served; served: lora_a, lora_b"):
        pool.load("nope")


def test_an_adapter_loaded_for_one_call_is_unloaded_after_it(synth_cfg):
    """The replica's safety net: an adapter evicted between routing and sampling is loaded just for the call."""
    from dermaflux.synth.adapter_pool import AdapterPool

    pool = AdapterPool.from_config(synth_cfg, preload=["lora_b"])
    images = generate(pool, [request(seed=1, adapter="lora_a"), request(seed=1, adapter="lora_b")], keep_loaded=False)
    assert len(images) == 2 and np.abs(pixels(images[0]) - pixels(images[1])).mean() > 5
    assert pool.loaded() == ["lora_b"]  # lora_b was the caller's; lora_a was only borrowed
    assert pool.loads == {"lora_a": 1, "lora_b": 1} and pool.unloads == {"lora_a": 1}


def test_prompts_are_encoded_at_the_adapters_training_length_and_never_cut(synth_cfg, tmp_path, tokenizer):
    """An adapter trained at 64 T5 tokens samples at 64 (as plain diffusers does when told so), not at
    model.max_sequence_length (128); a prompt longer than 64 tokens is encoded whole, at 128."""
    from dermaflux.config import load_config
    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.sampling import text_lengths

    short = make_lora_adapter(synth_cfg.model, tmp_path / "short", seed=1, meta={"text_tokens": 64})
    pool = AdapterPool.from_config(load_config("tiny", extra={"synth": {"adapters": [str(short)]}}))
    long_prompt = "a dermoscopic image of a melanoma with " + ", ".join(f"blue-white veil area {i}" for i in range(9))
    n_long = len(tokenizer(long_prompt).input_ids)
    assert 64 < n_long <= 128
    assert text_lengths(tokenizer, ["a nevus", long_prompt], 64, 128) == [64, 128]
    assert text_lengths(tokenizer, ["a nevus"], None, 128) == [128]  # the base model: its configured length

    def direct(prompt: str, length: int):
        import torch

        pipe = pool.pipeline_for("short")
        with torch.inference_mode():
            out = pipe(prompt=[prompt], width=64, height=64, num_inference_steps=4, guidance_scale=3.5,
                       generator=[torch.Generator("cpu").manual_seed(4)], max_sequence_length=length)
        return pixels(out.images[0])

    sampled = [pixels(im) for im in generate(pool, [request(seed=4, adapter="short"),
                                                    request(long_prompt, seed=4, adapter="short")])]
    assert np.array_equal(sampled[0], direct("a dermoscopic image of a melanoma", 64))
    assert np.abs(sampled[0] - direct("a dermoscopic image of a melanoma", 128)).mean() > 0.5
    assert np.array_equal(sampled[1], direct(long_prompt, 128))


# --- bulk jobs ------------------------------------------------------------------------------------


def spec_for(targets, shard_size=2, job_id="job1", seed=0):
    from dermaflux.synth.bulk import JobSpec
    from dermaflux.synth.requests import Settings

    return JobSpec(job_id, targets, Settings(32, 32, 2, 3.5, None), seed, shard_size, "builtin:tiny")


def test_plan_is_deterministic_and_labelled():
    from dermaflux.lesion.attributes import LesionAttributes
    from dermaflux.synth.bulk import plan_items, plan_shards

    spec = spec_for({"mel": 3, "nv": 2})
    first, second = plan_items(spec), plan_items(spec)
    assert first == second and len(first) == 5
    assert len({item.seed for item in first}) == 5
    for item in first:
        attrs = LesionAttributes.model_validate_json(item.attributes_json)
        assert attrs.diagnosis == item.label
    assert [len(s) for s in plan_shards(spec)] == [2, 2, 1]
    assert plan_items(spec_for({"mel": 3, "nv": 2}, seed=1))[0].seed != first[0].seed


def test_bulk_job_resumes_after_a_crash_without_duplicates(pipe, tmp_path):
    from dermaflux.core.artifacts import OutputConflict
    from dermaflux.synth import bulk
    from dermaflux.synth.sampling import encode_png

    spec = spec_for({"mel": 3, "nv": 2, "df": 0})
    calls = []

    def generate_pngs(samples):
        calls.append(len(samples))
        if len(calls) == 2:
            raise RuntimeError("replica lost")  # the second shard dies mid-way
        return [encode_png(im) for im in generate(pipe, samples)]

    out = tmp_path / "set"
    assert bulk.prepare_job(out, spec) is False
    with pytest.raises(RuntimeError, match="replica lost"):
        bulk.run_job(out, spec, generate_pngs)
    assert bulk.job_status(out)["shards_done"] == 1 and not (out / "manifest.json").exists()
    first_shard = out / "shards" / "part-00000.parquet"
    mtime = first_shard.stat().st_mtime_ns

    assert bulk.prepare_job(out, spec) is True  # same spec: resume
    status = bulk.run_job(out, spec, generate_pngs)
    assert status["state"] == "done" and status["done"] == 5
    assert first_shard.stat().st_mtime_ns == mtime  # finished shards are not redone
    table = pq.read_table(out / "shards")
    assert table.num_rows == 5 and len(set(table["id"].to_pylist())) == 5
    assert sorted(table["label"].to_pylist()) == ["mel"] * 3 + ["nv"] * 2
    assert set(table["split"].to_pylist()) == {"synthetic"} and all(table["malignant"].to_pylist()[:3])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"mel": 3, "nv": 2} and len(manifest["images"]) == 5
    assert {"prompt", "attributes", "seed", "adapter", "label"} <= set(manifest["images"][0])

    with pytest.raises(OutputConflict):
        bulk.prepare_job(out, spec_for({"mel": 4}))


def test_a_fused_lora_samples_like_the_unfused_one_and_nothing_else(synth_cfg):
    from dermaflux.synth.adapter_pool import AdapterPool

    pool = AdapterPool.from_config(synth_cfg, preload=["lora_a", "lora_b"])
    asks = [request(seed=s, adapter="lora_a") for s in (2, 3)]
    unfused = [pixels(im) for im in generate(pool, asks)]
    base = pixels(generate(pool, [request(seed=2)])[0])
    pool.fuse("lora_a")
    assert pool.loaded() == ["lora_a"] and not any("lora_" in k for k in pool.base.transformer.state_dict())
    fused = [pixels(im) for im in generate(pool, asks)]
    # W + BA once instead of Wx + B(Ax) every call: float32 rounding apart, the same images.
    assert all(np.abs(f - u).max() <= 2 for f, u in zip(fused, unfused))
    assert np.abs(fused[0] - base).mean() > 5
    for other in (None, "lora_b"):
        with pytest.raises(ValueError, match="fused to adapter 'lora_a'"):
            generate(pool, [request(seed=2, adapter=other)])
    with pytest.raises(ValueError, match="cannot be unloaded"):
        pool.unload("lora_a")


@pytest.fixture
def default_stance():
    import torch

    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def test_synth_compile_only_where_adapters_never_switch_and_samples_the_same(synth_cfg, default_stance, caplog):
    """synth.compile: skipped (one warning) on a pool that switches adapters; on a fused pool the compiled
    blocks (Dynamo's capture of the real Flux blocks, run by the `eager` backend: Inductor is left to the GPU
    tests) sample what the eager ones did; a compiler that fails leaves sampling eager, with one warning."""
    import logging

    import torch

    from dermaflux.synth.adapter_pool import AdapterPool
    from dermaflux.synth.sampling import compile_for

    pool = AdapterPool.from_config(synth_cfg)
    ask = request(seed=6, adapter="lora_a")
    options = {"batch_size": 2, "max_sequence_length": 128}
    with caplog.at_level(logging.WARNING, logger="dermaflux.synth.sampling"):
        assert compile_for(pool, ask.settings, **options) is False
    assert "switches between adapters" in caplog.text and not pool.loaded()  # nothing was probed

    pool.fuse("lora_a")
    eager = pixels(generate(pool, [ask])[0])
    assert compile_for(pool, ask.settings, backend="eager", **options) is True
    blocks = pool.base.transformer.transformer_blocks
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in blocks)
    assert np.abs(pixels(generate(pool, [ask])[0]) - eager).max() <= 1

    def failing_backend(graph, example_inputs):
        raise RuntimeError("forced: no compiler here")

    torch._dynamo.reset()
    broken = AdapterPool.from_config(synth_cfg)
    broken.fuse("lora_a")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dermaflux.model.compile"):
        assert compile_for(broken, ask.settings, backend=failing_backend, **options) is False
    assert "synth.compile" in caplog.text and "sampling runs eager" in caplog.text
    assert np.abs(pixels(generate(broken, [ask])[0]) - eager).max() <= 1


def test_a_full_fine_tune_is_served_under_its_name_beside_the_base(synth_cfg, tmp_path):
    import torch
    from diffusers import FluxTransformer2DModel

    from dermaflux.config import load_config
    from dermaflux.model.adapters import save_adapter
    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.synth.adapter_pool import AdapterPool

    transformer = FluxTransformer2DModel.from_pretrained(resolve_pretrained(synth_cfg.model), subfolder="transformer")
    with torch.no_grad():
        transformer.proj_out.weight.mul_(-1.0)  # a different transformer than the base
    full = save_adapter(tmp_path / "final", transformer, kind="full", base="builtin:tiny")
    cfg = load_config("tiny", extra={"synth": {"adapters": [*synth_cfg.synth.adapters, str(full)]}})
    pool = AdapterPool.from_config(cfg)
    assert pool.names == ["final", "lora_a", "lora_b"] and pool.loaded() == []
    base = pixels(generate(pool, [request(seed=5)])[0])
    lora_a = pixels(generate(pool, [request(seed=5, adapter="lora_a")])[0])
    tuned = pixels(generate(pool, [request(seed=5, adapter="final")])[0])
    # The full fine-tune samples with its own transformer, the base keeps its own, and the LoRA
    # active on the base transformer does not leak into the fine-tune.
    assert np.abs(tuned - base).mean() > 5 and np.abs(tuned - lora_a).mean() > 5
    assert np.array_equal(base, pixels(generate(pool, [request(seed=5)])[0]))
    pool.unload("final")
    assert pool.loaded() == ["lora_a"]
    assert np.array_equal(tuned, pixels(generate(pool, [request(seed=5, adapter="final")])[0]))


def test_cli_flags_map_onto_the_synth_section(tmp_path):
    from dermaflux.cli import build_parser, flag_settings
    from dermaflux.config import load_config

    parser = build_parser()
    args = parser.parse_args(["serve", "--preset", "flux-dev", "--host", "0.0.0.0", "--port", "9000", "--replicas", "2",
                              "--max-adapters", "2", "--jobs-root", str(tmp_path), "--token-file", "/run/token"])
    cfg = load_config(args.preset, extra=flag_settings(args))
    assert (cfg.synth.jobs_root, cfg.synth.auth.token_file) == (str(tmp_path), "/run/token")
    assert cfg.synth.max_adapters_per_replica == 2
    assert (cfg.synth.host, cfg.synth.port, cfg.model.resolution, cfg.model.num_inference_steps) == ("0.0.0.0", 9000, 512, 20)
    assert cfg.synth.autoscaling.min_replicas == cfg.synth.autoscaling.max_replicas == 2
    args = parser.parse_args(["generate", "--per-class", "3", "--out", str(tmp_path), "--lora", "a=/x", "--lora", "/y"])
    cfg = load_config(args.preset, extra=flag_settings(args))
    assert cfg.synth.fuse_lora is False
    fused = parser.parse_args(["generate", "--per-class", "3", "--out", str(tmp_path), "--fuse-lora"])
    assert load_config(fused.preset, extra=flag_settings(fused)).synth.fuse_lora is True
    assert (cfg.synth.per_class, cfg.synth.out, cfg.synth.adapters) == (3, str(tmp_path), ["a=/x", "/y"])


def test_generate_targets_from_the_config(tmp_path):
    from dermaflux.config import load_config
    from dermaflux.lesion import taxonomy
    from dermaflux.synth.stage import class_targets

    cfg = load_config("tiny", extra={"synth": {"per_class": 2, "class_targets": {"mel": 5}}})
    assert class_targets(cfg) == {code: 5 if code == "mel" else 2 for code in sorted(taxonomy.DIAGNOSIS_CODES)}
    with pytest.raises(ValueError, match="nothing to generate"):
        class_targets(load_config("tiny"))
    with pytest.raises(ValueError, match="unknown class 'wart'"):
        class_targets(load_config("tiny", extra={"synth": {"class_targets": {"wart": 1}}}))


def test_bring_every_class_to_n_counts_the_train_split(ham10000_dir, tmp_path):
    from dermaflux.synth.bulk import bring_to_targets, corpus_class_counts
    from dermaflux.testing.ham10000 import build_class_corpus

    corpus = build_class_corpus(ham10000_dir, tmp_path / "corpus", {"nv": 6, "mel": 3, "df": 1})
    assert corpus_class_counts(corpus) == {"nv": 6, "mel": 3, "df": 1}  # test rows are not counted
    assert bring_to_targets(corpus, 5) == {"df": 4, "mel": 2, "nv": 0}
    with pytest.raises(FileNotFoundError, match="not a corpus folder"):
        bring_to_targets(tmp_path / "nowhere", 5)
