"""Dihedral augmentation: the 8 views, one VAE encoding per view in the cache, each view kept with its own
row's caption and label, and a sample stream of views that a resumed run sees again."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dermaflux.train.augment import VIEWS, dihedral
from dermaflux.train.cache import load_cached_set, micro_batch_views, sample_views, write_cache_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eight_distinct_views_of_the_square():
    image = torch.arange(9.0).reshape(1, 3, 3)  # no symmetry: every dihedral view differs
    views = [dihedral(image, v) for v in range(8)]
    assert torch.equal(views[0], image)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[1], torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(views[4], image.flip(-1))
    for v in views:  # a view moves pixels, it never changes them
        assert sorted(v.flatten().tolist()) == sorted(image.flatten().tolist())
    with pytest.raises(ValueError, match="0-7"):
        dihedral(image, 8)


def test_view_stream_is_a_function_of_the_position():
    whole = sample_views(10, seed=3, start=0, count=57, views=8)
    assert set(whole.tolist()) == set(range(8))
    pieces = np.concatenate([sample_views(10, 3, s, min(7, 57 - s), 8) for s in range(0, 57, 7)])
    assert np.array_equal(whole, pieces)  # resuming at any position continues the same views
    assert not np.array_equal(whole[:10], whole[10:20])  # each epoch draws the views anew
    assert not np.array_equal(whole, sample_views(10, 4, 0, 57, 8))
    assert set(sample_views(10, 3, 0, 57, 1).tolist()) == {0}
    # micro-batches of two ranks are consecutive windows of the same stream
    steps = [micro_batch_views(10, 3, step, rank, 2, 3, 8) for step in range(3) for rank in range(2)]
    assert np.array_equal(np.concatenate(steps), whole[:18])


@pytest.fixture(scope="module")
def dihedral_cache(tmp_path_factory, ham10000_dir, tiny_config, tiny_model_dir):
    """Six real HAM10000 images encoded with augment=dihedral, as the pre-compute writes them."""
    from dermaflux.train.precompute import CAPTION_COLUMNS, caption_shards, encode_rows, load_text_and_vae
    from dermaflux.testing.ham10000 import build_captioned_set as build_captions

    work = tmp_path_factory.mktemp("dihedral")
    captions = build_captions(ham10000_dir, work / "captions", n_train=6, n_test=0)
    source = pa.concat_tables([pq.read_table(p, columns=CAPTION_COLUMNS) for p in caption_shards(captions)])
    pipe = load_text_and_vae(tiny_config.model, None)
    rows = encode_rows(pipe, source.to_pydict(), 64, 32, augment="dihedral")
    write_cache_shard(rows, work / "cache" / "shards" / "part-00000.arrow")
    return pipe, source.to_pylist(), load_cached_set(work / "cache", "train")


def test_each_view_is_its_own_image_encoded(dihedral_cache):
    from dermaflux.train.encode import decode_image, encode_captions, encode_images

    pipe, source, data = dihedral_cache
    assert data.views == VIEWS["dihedral"] == 8
    by_id = {row["id"]: row for row in source}
    assert data.ids == sorted(by_id)
    labels = dict(zip(data.ids, data.column("label")))
    cached_captions = dict(zip(data.ids, data.column("caption")))
    for logical, row_id in enumerate(data.ids):
        row = by_id[row_id]
        assert labels[row_id] == row["label"] and cached_captions[row_id] == row["caption"]
        image = decode_image(row["image"], 64).unsqueeze(0)
        embeds, pooled = encode_captions(pipe, [row["caption"]], 32)
        for view in (0, 1, 5, 7):
            latents, prompt_embeds, pooled_embeds = data.rows([logical], [view])
            # encoded alone, this image in this view: the row holds exactly that
            torch.testing.assert_close(latents, encode_images(pipe.vae, dihedral(image, view)), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(prompt_embeds, embeds, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(pooled_embeds, pooled, atol=1e-5, rtol=1e-4)


def test_a_batch_keeps_rows_and_views_together(dihedral_cache):
    _, _, data = dihedral_cache
    indices, views = [3, 0, 3, 5], [2, 7, 6, 0]
    latents, prompt_embeds, _ = data.rows(indices, views)
    for j, (i, v) in enumerate(zip(indices, views)):
        alone, embeds, _ = data.rows([i], [v])
        assert torch.equal(latents[j], alone[0]) and torch.equal(prompt_embeds[j], embeds[0])
    # the views really differ (the model sees 8 images per lesion), the captions do not
    assert not torch.allclose(latents[0], latents[2])
    assert torch.equal(prompt_embeds[0], prompt_embeds[2])
    # view 0 is the image as it is: what a cache without augmentation holds
    assert torch.equal(data.rows([1])[0], data.rows([1], [0])[0])
