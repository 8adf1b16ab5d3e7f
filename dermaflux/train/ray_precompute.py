"""Ray Data job: encode every captioned image once (VAE) and every caption once (CLIP + T5), cache as shards.

Resumable at row level: ids already in the cache are skipped, and each output part is written
atomically, so an interrupted run loses at most the batch in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dermaflux.core.artifacts import atomic_write_json
from dermaflux.train.augment import VIEWS
from dermaflux.train.cache import check_no_legacy_shards, cache_shards, open_shard, write_cache_shard
from dermaflux.train.config import TrainConfig
from dermaflux.train.precompute import CAPTION_COLUMNS, caption_shards, encode_rows, load_text_and_vae, styled_captions
from dermaflux.train.prompts import sampling_prompt

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

log = logging.getLogger(__name__)


class CaptionEncoder:
    """A Ray Data actor: loads the encoders once, then encodes batches."""

    def __init__(self, model_cfg_json: dict, vae_dir: str | None, resolution: int, max_sequence_length: int,
                 augment: str = "none", use_gpu: bool = False, caption_style: str = "caption"):
        from dermaflux.model.config import ModelConfig

        torch.set_num_threads(1)
        self.pipe = load_text_and_vae(ModelConfig.model_validate(model_cfg_json), vae_dir)
        if use_gpu:  # Ray gave this actor a GPU (num_gpus=1): T5-XXL and 8 VAE views per image are GPU work
            self.pipe.to("cuda")
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.augment = augment
        self.caption_style = caption_style

    def __call__(self, batch: dict) -> dict:
        return encode_rows(self.pipe, batch, self.resolution, self.max_sequence_length, self.augment,
                           self.caption_style)


def _existing_ids(cache_dir: Path) -> set[str]:
    ids: set[str] = set()
    for path in cache_shards(cache_dir):
        ids.update(open_shard(path)["id"].to_pylist())
    return ids


def text_token_plan(cfg: DermaFluxConfig, table: pa.Table) -> dict:
    """The T5 length this run encodes at (train.text_tokens), from the token counts of every caption in `table`
    and of the validation prompts, in train.caption_style; an error naming the ids of captions that do not fit."""
    from transformers import AutoTokenizer

    from dermaflux.model.loading import resolve_pretrained
    from dermaflux.train.text_length import pick_text_tokens, token_counts

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(cfg.model), subfolder="tokenizer_2",
                                              revision=cfg.model.revision)
    prompts = validation_prompts(cfg.train)
    ids = [f"caption row {i}" for i in table["id"].to_pylist()]
    ids += [f"train.validation_prompts[{n}]" for n in range(len(prompts))]
    rows = {"id": table["id"].to_pylist(), "caption": table["caption"].to_pylist(),
            "label": table["label"].to_pylist() if "label" in table.column_names else [None] * table.num_rows}
    captions = styled_captions(rows, cfg.train.caption_style)
    counts = token_counts(tokenizer, captions + prompts)
    return pick_text_tokens(zip(ids, counts), cfg.model.max_sequence_length, cfg.train.text_tokens)


def _check_cached_length(cache_dir: Path, text_tokens: int) -> None:
    """Rows cached by an earlier attempt must have been encoded at the length this one picks."""
    shards = cache_shards(cache_dir)
    if not shards:
        return
    first = open_shard(shards[0])["prompt_embeds_shape"]
    cached = first[0].as_py()[0] if len(first) else text_tokens
    if cached != text_tokens:
        raise ValueError(f"{cache_dir}: rows cached at {cached} T5 tokens, but these captions need {text_tokens} "
                         "(the captions changed?): remove the cache folder to re-encode")


def run_precompute(cfg: DermaFluxConfig, cache_dir: str | Path, vae_dir: str | None,
                   max_images: dict | None = None) -> dict:
    """Encode the rows of cfg.train.captions not yet in `cache_dir`. `max_images`: split -> limit (quick runs)."""
    cache_dir = Path(cache_dir)
    shards = caption_shards(cfg.train.captions)
    table = pa.concat_tables([pq.read_table(p, columns=CAPTION_COLUMNS) for p in shards], promote_options="default")
    table = table.sort_by("id")
    if max_images:
        parts = []
        for split in ("train", "val", "test"):
            sub = table.filter(pa.compute.equal(table["split"], split))
            limit = max_images.get(split)
            parts.append(sub.slice(0, limit) if limit is not None else sub)
        table = pa.concat_tables(parts)
    text_tokens = text_token_plan(cfg, table)
    check_no_legacy_shards(cache_dir)
    _check_cached_length(cache_dir, text_tokens["length"])
    done = _existing_ids(cache_dir)
    todo = table.filter(pa.compute.invert(pa.compute.is_in(table["id"], value_set=pa.array(sorted(done), pa.string()))))
    summary = {"rows": table.num_rows, "cached_before": len(done & set(table["id"].to_pylist())), "encoded": 0,
               "text_tokens": text_tokens, "views": VIEWS[cfg.train.augment]}
    if todo.num_rows == 0:
        return summary
    inline = _encode_inline(cfg, todo.num_rows)
    log.info("pre-compute: encoding %d of %d rows (%d already cached)%s", todo.num_rows, table.num_rows, len(done),
             " in this process" if inline else "")
    batches = _inline_batches if inline else _ray_data_batches
    part = len(cache_shards(cache_dir))
    (cache_dir / "shards").mkdir(parents=True, exist_ok=True)
    for batch in batches(cfg, todo, vae_dir, text_tokens["length"]):
        rows = {k: [v.tolist() if hasattr(v, "tolist") and k.endswith("_shape") else v for v in batch[k]] for k in batch}
        summary["encoded"] += write_cache_shard(rows, cache_dir / "shards" / f"part-{part:05d}.arrow")
        part += 1
        log.info("pre-compute: %d / %d rows encoded", summary["encoded"], todo.num_rows)
    summary["inline"] = inline
    atomic_write_json(cache_dir / "manifest.json", {**summary, "shards": part})
    return summary


def _encode_inline(cfg: DermaFluxConfig, rows: int) -> bool:
    """Encode in the driver process when the rows are few (train.precompute_inline_rows): a Ray Data job's actor
    start (a fresh process importing torch, diffusers and transformers: ~10 s on 2 cores) would cost more than the
    encoding. Not when the run wants a GPU the driver lacks (a CPU-only head node would encode FLUX.1-dev's views)."""
    return rows <= cfg.train.precompute_inline_rows and (not cfg.train.use_gpu or torch.cuda.is_available())


def _write_rows(cfg: DermaFluxConfig) -> int:
    return max(cfg.train.precompute_batch, 256)


def _inline_batches(cfg: DermaFluxConfig, todo: pa.Table, vae_dir: str | None, text_tokens: int):
    """Cache rows encoded here, in the same batches of train.precompute_batch the Ray Data actor encodes."""
    pipe = load_text_and_vae(cfg.model, vae_dir)
    if cfg.train.use_gpu:
        pipe.to("cuda")
    step = cfg.train.precompute_batch
    for start in range(0, todo.num_rows, _write_rows(cfg)):
        chunk = todo.slice(start, _write_rows(cfg))
        parts = [encode_rows(pipe, chunk.slice(i, step).to_pydict(), cfg.model.resolution, text_tokens,
                             cfg.train.augment, cfg.train.caption_style) for i in range(0, chunk.num_rows, step)]
        yield {k: [v for part in parts for v in part[k]] for k in parts[0]}


def _ray_data_batches(cfg: DermaFluxConfig, todo: pa.Table, vae_dir: str | None, text_tokens: int):
    """Cache rows encoded by a pool of `CaptionEncoder` actors (train.precompute_workers)."""
    import ray

    from dermaflux.core.runtime import init_ray

    init_ray(cfg.ray)

    encoded = ray.data.from_arrow(todo).map_batches(
        CaptionEncoder,
        fn_constructor_args=(cfg.model.model_dump(mode="json"), vae_dir, cfg.model.resolution, text_tokens,
                             cfg.train.augment, cfg.train.use_gpu, cfg.train.caption_style),
        batch_size=cfg.train.precompute_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.train.precompute_workers),
        num_cpus=1,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    yield from encoded.iter_batches(batch_size=_write_rows(cfg), batch_format="numpy")


def validation_prompts(train_cfg: TrainConfig) -> list[str]:
    """train.validation_prompts in train.caption_style, as sampling would style them."""
    return [sampling_prompt(p, train_cfg.caption_style) for p in train_cfg.validation_prompts]


def encode_validation_prompts(cfg: DermaFluxConfig, cache_dir: str | Path, vae_dir: str | None,
                              text_tokens: int | None = None) -> Path:
    """The validation prompts' embeddings (at `text_tokens`, default model.max_sequence_length), so training
    workers render without text encoders; and the empty prompt's, which caption dropout trains on."""
    from dermaflux.core.artifacts import atomic_path
    from dermaflux.train.encode import encode_captions

    path = Path(cache_dir) / "validation.pt"
    if path.exists():
        return path
    pipe = load_text_and_vae(cfg.model, vae_dir)
    if cfg.train.use_gpu and torch.cuda.is_available():  # a driver on a CPU-only head node encodes on its CPU
        pipe.to("cuda")
    prompts = validation_prompts(cfg.train)
    prompt_embeds, pooled = encode_captions(pipe, prompts + [""], text_tokens or cfg.model.max_sequence_length)
    prompt_embeds, pooled = prompt_embeds.cpu(), pooled.cpu()
    if pipe.device.type == "cuda":  # the driver keeps running beside the workers: give T5-XXL's 10 GB back
        del pipe
        torch.cuda.empty_cache()
    with atomic_path(path) as tmp:
        torch.save({"prompts": prompts, "prompt_embeds": prompt_embeds[:-1], "pooled_prompt_embeds": pooled[:-1],
                    "empty_prompt_embeds": prompt_embeds[-1], "empty_pooled_prompt_embeds": pooled[-1]}, tmp)
    return path
