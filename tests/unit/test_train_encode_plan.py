"""`train.encode: auto` (cached or online from the planned epochs and the cache's size, computed from the shapes
before anything is written) and online encoding's pure core: a sample encoded online is the cached one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dermaflux.train.encode_plan import RowShapes, choose_encode, encode_plan, planned_epochs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# FLUX.1-dev at 512 px: 16 latent channels, 8x down; T5-XXL 4096 wide, CLIP pooled 768; bf16.
FLUX_DEV_128 = RowShapes(latent_channels=16, latent_side=64, views=8, text_tokens=128, text_dim=4096, pooled_dim=768,
                         dtype_bytes=2)


def test_row_bytes_are_the_issue_table():
    assert FLUX_DEV_128.bytes_per_row() == 2 * 2**20 + 768 * 2  # 8 views: 1 MiB, T5 at 128 tokens: 1 MiB
    at_512 = RowShapes(16, 64, 8, 512, 4096, 768, 2)
    assert at_512.bytes_per_row() == 5 * 2**20 + 768 * 2
    assert 2.3 < 500_000 * at_512.bytes_per_row() / 2**40 < 2.5  # ~2.4 TiB for 500,000 images


def test_auto_is_online_for_one_epoch_over_a_large_corpus_and_cached_for_repeats_that_fit():
    epochs = planned_epochs(steps=7_800, micro_batch=8, grad_accum=1, workers=8, rows=500_000)
    assert 0.9 < epochs < 1.1
    plan = encode_plan("auto", FLUX_DEV_128, 500_000, epochs, 256 * 2**30)
    assert plan["mode"] == "online" and "planned epochs < 2" in plan["reason"]
    assert plan["cache_bytes"] == 500_000 * FLUX_DEV_128.bytes_per_row()
    # three epochs, but a terabyte: over the limit, still online
    mode, reason = choose_encode("auto", 3.0, 500_000 * FLUX_DEV_128.bytes_per_row(), 256 * 2**30)
    assert mode == "online" and "cache_max_bytes" in reason
    # HAM10000's ~8,000 train images for 3 epochs: 16 GiB, cached
    assert choose_encode("auto", 3.0, 8_000 * FLUX_DEV_128.bytes_per_row(), 256 * 2**30)[0] == "cached"
    # an explicit setting is kept, with the figures in its reason
    assert choose_encode("cached", 0.5, 10**15, 0)[0] == "cached"
    assert choose_encode("online", 50.0, 1, 10**15)[0] == "online"
    # micro_batch auto counts as 1 sample: a lower bound on the epochs
    assert planned_epochs(100, "auto", 2, 4, 400) == 2.0


def test_the_demo_stays_cached(tiny_config, tiny_model_dir):
    """The tiny preset's demo settings (pipeline.stage_settings.train): many epochs over 1,024 images, a small cache."""
    from dermaflux.config import DermaFluxConfig
    from dermaflux.core.config import deep_merge
    from dermaflux.train.augment import VIEWS
    from dermaflux.train.encode_plan import row_shapes

    data = tiny_config.model_dump(mode="json")
    demo = DermaFluxConfig.model_validate(deep_merge(data, {"train": data["pipeline"]["stage_settings"]["train"]}))
    tc = demo.train
    assert tc.encode == "auto"
    shapes = row_shapes(demo.model, None, VIEWS[tc.augment], 64)
    # the tiny pipeline's own configs: 8 views of its latents, its T5 width, float32
    assert shapes.views == 8 and shapes.dtype_bytes == 4 and shapes.latent_side == demo.model.resolution // 2 ** (
        len(__import__("json").loads((tiny_model_dir / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    epochs = planned_epochs(tc.steps, tc.micro_batch, tc.grad_accum, tc.workers, tc.max_images)
    plan = encode_plan(tc.encode, shapes, tc.max_images, epochs, tc.cache_max_bytes)
    assert plan["mode"] == "cached" and epochs > 10, plan


def test_flux_dev_preset_defaults_to_auto():
    from dermaflux.config import load_config

    assert load_config("flux-dev").train.encode == "auto"


def test_sample_draws_are_a_function_of_seed_epoch_and_row():
    from dermaflux.train.online import sample_draw

    draws = [sample_draw(0, 0, row, 8, 0.25) for row in range(400)]
    assert draws == [sample_draw(0, 0, row, 8, 0.25) for row in range(400)]
    assert {v for v, _ in draws} == set(range(8))
    assert 0.15 < np.mean([d for _, d in draws]) < 0.35
    assert draws != [sample_draw(0, 1, row, 8, 0.25) for row in range(400)]  # each epoch draws anew
    assert {sample_draw(0, 0, row, 1, 0.0) for row in range(50)} == {(0, False)}


def test_a_sample_encoded_online_is_the_cached_view(ham10000_dir, tiny_config, tmp_path):
    """Online: decode, turn the pixels to the drawn view, one VAE pass over the batch, CLIP + T5 of the prompt
    (the empty one when dropped): what the pre-compute caches for that row and view."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dermaflux.testing.ham10000 import build_captioned_set
    from dermaflux.train.augment import dihedral
    from dermaflux.train.encode import decode_image, encode_captions, encode_images
    from dermaflux.train.online import encode_samples, sample_draw
    from dermaflux.train.precompute import CAPTION_COLUMNS, caption_shards, load_text_and_vae

    captions = build_captioned_set(ham10000_dir, tmp_path / "captions", n_train=4, n_test=0)
    rows = pa.concat_tables([pq.read_table(p, columns=CAPTION_COLUMNS) for p in caption_shards(captions)]).to_pydict()
    rows["row"] = [10, 11, 12, 13]
    pipe = load_text_and_vae(tiny_config.model, None)
    latents, embeds, pooled = encode_samples(pipe, rows, [0, 0, 1, 1], 64, 32, "caption", 8, seed=5, dropout=0.5)
    assert latents.shape[0] == embeds.shape[0] == pooled.shape[0] == 4 and embeds.shape[1] == 32
    draws = [sample_draw(5, epoch, row, 8, 0.5) for row, epoch in zip(rows["row"], [0, 0, 1, 1])]
    assert len({v for v, _ in draws}) > 1 and any(d for _, d in draws)  # turned and dropped samples both checked
    for i, (row, epoch) in enumerate(zip(rows["row"], [0, 0, 1, 1])):
        view, dropped = sample_draw(5, epoch, row, 8, 0.5)
        image = decode_image(rows["image"][i], 64).unsqueeze(0)
        torch.testing.assert_close(latents[i:i + 1], encode_images(pipe.vae, dihedral(image, view)), atol=1e-4, rtol=1e-4)
        alone = encode_captions(pipe, ["" if dropped else rows["caption"][i]], 32)
        torch.testing.assert_close(embeds[i:i + 1], alone[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pooled[i:i + 1], alone[1], atol=1e-5, rtol=1e-4)
    rows["caption"][2] = "  "
    with pytest.raises(ValueError, match=f"caption row {rows['id'][2]}: empty caption"):
        encode_samples(pipe, rows, [0] * 4, 64, 32, "caption", 8, seed=5, dropout=0.0)
