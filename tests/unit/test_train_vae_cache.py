"""VAE fit on real HAM10000 images, the latent cache format, the data stream and the DeepSpeed config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dermaflux.train.cache import bytes_to_tensor, micro_batch_indices, sample_indices, tensor_to_bytes
from dermaflux.train.ds_config import deepspeed_config
from dermaflux.train.encode import decode_images, encode_images
from dermaflux.train.vae_fit import fit_vae, psnr, set_latent_factors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared CPU: oversubscribed threads are far slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lesion_images(ham10000_dir):
    paths = sorted((ham10000_dir / "images").glob("*.jpg"))[:112]
    return decode_images([p.read_bytes() for p in paths], 64)


def test_decode_range(lesion_images):
    assert lesion_images.shape == (112, 3, 64, 64)
    assert -1.0 <= float(lesion_images.min()) and float(lesion_images.max()) <= 1.0
    assert float(lesion_images.std()) > 0.05  # real pictures, not a constant


def test_vae_fit_improves_psnr_and_sets_factors(tiny_model_dir, lesion_images):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    train, test = lesion_images[:96], lesion_images[96:]
    before = psnr(vae, test)
    history = fit_vae(vae, train, steps=30, batch_size=8, lr=2e-3, kl_weight=1e-6)
    after = psnr(vae, test)
    assert after > before + 3.0, (before, after)
    assert np.mean(history[-5:]) < np.mean(history[:5])
    shift, scale = set_latent_factors(vae, train)
    assert vae.config.shift_factor == shift and vae.config.scaling_factor == scale
    latents = encode_images(vae, train)  # normalised with the new factors
    assert abs(float(latents.mean())) < 0.05 and abs(float(latents.std()) - 1.0) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_bytes_round_trip(dtype):
    from dermaflux.model.loading import dtype_name, torch_dtype

    assert torch_dtype(dtype_name(dtype)) is dtype
    t = torch.randn(3, 5, 7).to(dtype)
    back = bytes_to_tensor(tensor_to_bytes(t), list(t.shape), dtype_name(dtype))
    assert back.dtype == dtype and torch.equal(back, t)


def test_dtype_names_outside_the_table_are_refused():
    from dermaflux.model.loading import dtype_name, torch_dtype

    with pytest.raises(ValueError, match="'float64'.*float32, bfloat16, float16"):
        torch_dtype("float64")
    with pytest.raises(ValueError, match="torch.int8"):
        dtype_name(torch.int8)


def test_sample_stream_is_epochwise_and_resumable():
    n = 10
    first_epoch = sample_indices(n, seed=1, start=0, count=n)
    assert sorted(first_epoch) == list(range(n))  # each epoch sees every row once
    whole = sample_indices(n, seed=1, start=0, count=35)
    torch.testing.assert_close(torch.from_numpy(sample_indices(n, 1, 17, 18)), torch.from_numpy(whole[17:]))
    # two ranks split a micro-step's global batch without overlap
    r0, r1 = (micro_batch_indices(n, 1, micro_step=0, rank=r, world=2, micro_batch=3) for r in (0, 1))
    assert list(r0) + list(r1) == list(whole[:6])


def test_deepspeed_config_from_ours(tiny_config):
    tc = tiny_config.train.model_copy(update={"zero_stage": 3, "offload_optimizer": True, "grad_accum": 4})
    ds = deepspeed_config(tc)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4 and ds["bf16"]["enabled"] is False  # CPU: fp32
    assert deepspeed_config(tc.model_copy(update={"use_gpu": True}))["bf16"]["enabled"] is True


def _write_cache_shard(path, rows):
    import pyarrow as pa

    from dermaflux.model.loading import dtype_name
    from dermaflux.train.cache import CACHE_SCHEMA, write_cache_shard

    def cols(t):
        return tensor_to_bytes(t), list(t.shape)

    records = []
    for row_id, split, value in rows:
        latents, embeds, pooled = (torch.full(shape, value, dtype=torch.bfloat16) for shape in ((4, 2, 2), (8, 512), (6,)))
        (lb, ls), (eb, es), (pb, ps) = cols(latents), cols(embeds), cols(pooled)
        records.append({"id": row_id, "split": split, "label": "nv", "caption": "c", "dtype": dtype_name(torch.bfloat16),
                        "latents": lb, "latents_shape": ls, "prompt_embeds": eb, "prompt_embeds_shape": es,
                        "pooled_prompt_embeds": pb, "pooled_prompt_embeds_shape": ps})
    write_cache_shard(pa.Table.from_pylist(records, schema=CACHE_SCHEMA), path)


def test_cached_set_maps_the_shards_in_place_sorted_by_id_and_follows_them(tmp_path):
    import pyarrow as pa

    from dermaflux.train.cache import load_cached_set

    cache = tmp_path / "cache"
    # Shard order is not id order; a val row must not leak into train.
    _write_cache_shard(cache / "shards" / "part-00000.arrow", [("c", "train", 3.0), ("a", "train", 1.0), ("v", "val", 9.0)])
    _write_cache_shard(cache / "shards" / "part-00001.arrow", [("b", "train", 2.0)])
    before = pa.total_allocated_bytes()
    data = load_cached_set(cache, "train")
    assert pa.total_allocated_bytes() - before < 1024  # the rows stay in the map, not in Arrow's heap
    assert data.ids == ["a", "b", "c"]
    # no whole-split copy beside the shards: the workers read the shards themselves
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == \
        ["shards/part-00000.arrow", "shards/part-00001.arrow"]
    latents, embeds, pooled = data.rows(torch.tensor([2, 0]))
    assert latents.shape == (2, 4, 2, 2) and embeds.shape == (2, 8, 512) and pooled.shape == (2, 6)
    assert latents.dtype == torch.bfloat16
    assert [float(t[0, 0, 0]) for t in latents] == [3.0, 1.0] and float(pooled[1, 0]) == 1.0
    assert load_cached_set(cache, "train", max_rows=2).ids == ["a", "b"]

    _write_cache_shard(cache / "shards" / "part-00002.arrow", [("aa", "train", 5.0)])  # the cache grew
    grown = load_cached_set(cache, "train")
    assert grown.ids == ["a", "aa", "b", "c"] and float(grown.rows([1])[2][0, 0]) == 5.0
    with pytest.raises(ValueError, match="no cached rows of split 'test'"):
        load_cached_set(cache, "test")
    legacy = tmp_path / "legacy"
    (legacy / "shards").mkdir(parents=True)
    (legacy / "shards" / "part-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="older DermaFlux"):
        load_cached_set(legacy, "train")
