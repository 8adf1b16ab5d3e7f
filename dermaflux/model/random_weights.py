"""Random-weight Flux pipelines in the Hugging Face layout, written without holding a model in memory.

`dermaflux model random --like flux-dev --out DIR` writes a pipeline with FLUX.1-dev's shapes (the
12B transformer, T5-XXL, CLIP-L, the VAE, the scheduler) and seeded random weights, so
`--preset flux-dev --set model.pretrained=DIR` runs every stage on full-size weights without the
hub. `--like tiny` writes the tiny preset's shapes through the same code.

Memory: each model is built on the meta device (shapes, no storage); its tensors are drawn one at a
time, a few ahead on a thread pool, and streamed into safetensors shards, so the process holds a
handful of tensors (the largest, T5's 32128 x 4096 embedding, is 263 MB in bf16), never a shard.

Initial values: biases zeros, norm scales ones, other weights normal(0, fan_in ** -0.5) (LeCun:
each layer keeps its input's scale, about 0.02 at FLUX's widths, so the 57 random blocks give
finite bf16 activations), any other tensor normal(0, 0.02). Each tensor has its own generator,
seeded from (--seed, component, tensor name): the bytes do not depend on sharding or threads.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
import math
import os
import shutil
import struct
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from dermaflux.core.artifacts import (
    OWNER_FILE,
    OutputConflict,
    atomic_dir,
    atomic_write_json,
    claim_output,
    fingerprint,
    read_json,
)

if TYPE_CHECKING:
    from dermaflux.model.config import ModelConfig

STAGE = "model random"  # the owner-file tag of folders this module writes
DEFAULT_SHARD_SIZE = "5GB"
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# safetensors' dtype names (https://github.com/huggingface/safetensors, format section of the README).
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FREE_MARGIN = 100 * 10**6  # configs and tokenizers, plus room to spare

# FLUX.1-dev's component configs: https://huggingface.co/black-forest-labs/FLUX.1-dev (main), files
# <folder>/config.json, scheduler/scheduler_config.json and tokenizer*/tokenizer_config.json. Values are
# the constructor arguments of the classes its model_index.json names (see MODELS).
FLUX_DEV: dict[str, dict[str, Any]] = {
    # transformer/config.json; axes_dims_rope is diffusers' default there, written out.
    "transformer": dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=[16, 56, 56],
    ),
    # vae/config.json (the same autoencoder as BFL's ae.safetensors).
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
        shift_factor=0.1159, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True,
    ),
    # text_encoder/config.json: the text tower of openai/clip-vit-large-patch14. Token ids come from
    # the tokenizer written beside it (see _flux_dev_parts).
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    ),
    # text_encoder_2/config.json: the encoder of google/t5-v1_1-xxl.
    "text_encoder_2": dict(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
        layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        tie_word_embeddings=False, use_cache=True,
    ),
    # scheduler/scheduler_config.json
    "scheduler": dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ),
    # tokenizer/tokenizer_config.json and tokenizer_2/tokenizer_config.json
    "tokenizer": dict(model_max_length=77),
    "tokenizer_2": dict(model_max_length=512),
}

# Pipeline folder -> (library, class) of the models with weights, as FLUX.1-dev's model_index.json names them.
MODELS = {
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One saved tensor: its name in the state dict, its shape and how it is filled."""

    name: str
    shape: tuple[int, ...]
    fill: str  # "normal", "ones" or "zeros"
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ComponentPlan:
    folder: str
    library: str
    model: Any  # on the meta device: its config is saved, its state dict lists the tensors
    tensors: list[TensorSpec]
    shards: list[list[TensorSpec]]

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass
class ModelPlan:
    """Everything written, decided before a byte is: per component the tensors and their shards."""

    like: str
    seed: int
    dtype: str
    max_shard_bytes: int
    configs: dict[str, dict]
    components: list[ComponentPlan]
    tokenizers: dict[str, Any]
    scheduler: Any

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def total_bytes(self) -> int:
        return sum(c.params for c in self.components) * self.itemsize

    def fingerprint(self) -> str:
        """The weights' identity. Not the tokenizers': tiny.py's trainers number tied tokens differently
        from one build to the next (special tokens, and so the configs' token ids, are stable)."""
        return fingerprint(STAGE, self.like, self.seed, self.dtype, self.configs)


# --- what to write ---------------------------------------------------------------------------------


def _flux_dev_parts(model_cfg: ModelConfig) -> tuple[dict, dict]:
    """FLUX.1-dev's configs; the tokenizers the tiny preset trains offline, at FLUX.1-dev's lengths.

    Their vocabularies (hundreds of tokens) are smaller than the embedding tables: every id is in range.
    """
    from dermaflux.model.tiny import _build_clip_tokenizer, _build_t5_tokenizer

    configs = copy.deepcopy(FLUX_DEV)
    spec = model_cfg.tiny.model_copy(update={"clip_max_tokens": configs["tokenizer"]["model_max_length"],
                                             "t5_max_tokens": configs["tokenizer_2"]["model_max_length"]})
    clip, t5 = _build_clip_tokenizer(spec), _build_t5_tokenizer(spec)
    # CLIP pools at the eos token. FLUX.1-dev's config keeps the legacy eos id 2, for which transformers
    # pools at the highest id (CLIP's eos, 49407): with our tokenizer it must be told our eos id.
    configs["text_encoder"].update(bos_token_id=clip.bos_token_id, eos_token_id=clip.eos_token_id,
                                   pad_token_id=clip.pad_token_id)
    configs["text_encoder_2"].update(pad_token_id=t5.pad_token_id, eos_token_id=t5.eos_token_id,
                                     decoder_start_token_id=t5.pad_token_id)
    return configs, {"tokenizer": clip, "tokenizer_2": t5}


def _tiny_parts(model_cfg: ModelConfig) -> tuple[dict, dict]:
    """The tiny preset's configs, read off the tiny builder itself so the two cannot drift apart."""
    from dermaflux.model.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(model_cfg.tiny)
    configs = {folder: _constructor_args(pipe.components[folder]) for folder in (*MODELS, "scheduler")}
    return configs, {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}


def _constructor_args(component) -> dict:
    config = component.config
    if hasattr(config, "to_dict"):  # transformers
        return config.to_dict()
    return {key: value for key, value in config.items() if not key.startswith("_")}


# --like NAME: a preset name; its `model` section gives the tokenizer spec and the default dtype.
LIKES: dict[str, Callable[[Any], tuple[dict, dict]]] = {"flux-dev": _flux_dev_parts, "tiny": _tiny_parts}


def _meta_model(folder: str, config: dict):
    """The model with these constructor arguments, on the meta device: shapes, no storage."""
    import torch

    library, class_name = MODELS[folder]
    model_class = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return model_class.from_config(config)
        return model_class(model_class.config_class.from_dict(config))


def _fill(name: str, shape: tuple[int, ...], owner: str) -> TensorSpec:
    if name.endswith("bias"):
        return TensorSpec(name, shape, "zeros")
    if "Norm" in owner:  # LayerNorm, GroupNorm, RMSNorm, T5LayerNorm scales
        return TensorSpec(name, shape, "ones")
    if len(shape) >= 2:  # Linear, Conv, Embedding: fan_in is every dim but the first
        return TensorSpec(name, shape, "normal", math.prod(shape[1:]) ** -0.5)
    return TensorSpec(name, shape, "normal", 0.02)


def tensor_specs(model) -> list[TensorSpec]:
    """What `save_pretrained` would write: the state dict (persistent buffers included), a tied tensor once."""
    owners = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for local, _ in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            owners[f"{prefix}.{local}" if prefix else local] = type(module).__name__
    specs, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # T5's encoder.embed_tokens is `shared`: saved once, tied again on load
            continue
        seen.add(id(tensor))
        specs.append(_fill(name, tuple(tensor.shape), owners[name]))
    return specs


def plan_shards(tensors: list[TensorSpec], itemsize: int, max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors, at most `max_bytes` of data per shard (a bigger tensor gets one of its own)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    return shards + [current] if current else shards


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `200MB`, `64KB` or a plain number (decimal units, as huggingface_hub counts)."""
    value = str(text).strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1), ("", 1)):
        number = value.removesuffix(unit).strip() if value.endswith(unit) else None
        if number and number.replace(".", "", 1).isdigit() and float(number) > 0:
            return int(float(number) * factor)
    raise ValueError(f"--max-shard-size: {text!r} is not a positive size such as 5GB, 200MB or 1000000")


def plan_random_model(like: str, *, seed: int = 0, dtype: str | None = None,
                      max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> ModelPlan:
    """Configs, tokenizers, meta-device models and the shard layout of a random `like` pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dermaflux.config import load_config

    if like not in LIKES:
        raise ValueError(f"--like: unknown model {like!r}; known: {', '.join(LIKES)}")
    max_shard_bytes = parse_size(max_shard_size)
    model_cfg = load_config(like).model
    configs, tokenizers = LIKES[like](model_cfg)
    plan = ModelPlan(like, seed, dtype or model_cfg.dtype, max_shard_bytes, configs, [], tokenizers,
                     FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]))
    for folder, (library, _) in MODELS.items():
        model = _meta_model(folder, configs[folder])
        tensors = tensor_specs(model)
        shards = plan_shards(tensors, plan.itemsize, plan.max_shard_bytes)
        plan.components.append(ComponentPlan(folder, library, model, tensors, shards))
    return plan


def format_plan(plan: ModelPlan, out: str | os.PathLike) -> str:
    """The dry run's table: components, parameters, bytes, shards, and the disk it needs."""
    title = f"random {plan.like} pipeline, seed {plan.seed}, {plan.dtype}, shards <= {_gb(plan.max_shard_bytes)}"
    rows = [f"{title} -> {out}",
            f"{'component':<16}{'class':<24}{'parameters':>16}{'bytes':>12}{'shards':>8}  largest shard"]
    for component in plan.components:
        shard_bytes = [sum(t.numel for t in shard) * plan.itemsize for shard in component.shards]
        rows.append(f"{component.folder:<16}{type(component.model).__name__:<24}{component.params:>16,}"
                    f"{_gb(component.params * plan.itemsize):>12}{len(component.shards):>8}  {_gb(max(shard_bytes))}")
    params = sum(c.params for c in plan.components)
    rows.append(f"{'total':<40}{params:>16,}{_gb(plan.total_bytes):>12}"
                f"{sum(len(c.shards) for c in plan.components):>8}")
    probe = _existing_ancestor(Path(out).expanduser())
    free = shutil.disk_usage(probe).free
    verdict = "enough" if free >= plan.total_bytes + _FREE_MARGIN else "NOT enough"
    rows.append(f"free disk at {probe}: {_gb(free)} ({verdict}; needs {_gb(plan.total_bytes + _FREE_MARGIN)})")
    return "\n".join(rows)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**8 else f"{nbytes / 1e6:.2f} MB"


# --- writing -------------------------------------------------------------------------------------


def write_random_model(plan: ModelPlan, out: str | os.PathLike, *, force: bool = False, workers: int | None = None,
                       echo: Callable[[str], None] = print) -> dict:
    """Write `plan` into `out` atomically (a staging folder renamed at the end); returns a summary.

    `out` must be missing, empty, or hold a folder this command wrote: the same model is left as it
    is, a different one is replaced only with `force`.
    """
    out = Path(out).expanduser()
    run_fingerprint = plan.fingerprint()
    summary = {"out": str(out), "like": plan.like, "seed": plan.seed, "dtype": plan.dtype,
               "fingerprint": run_fingerprint, "bytes": plan.total_bytes,
               "components": {c.folder: {"params": c.params, "shards": len(c.shards)} for c in plan.components}}
    if _already_written(out, run_fingerprint, force):
        echo(f"{out} already holds this model (fingerprint {run_fingerprint}): nothing to write")
        return {**summary, "written": False}
    _check_free_space(out, plan.total_bytes)
    started = time.monotonic()
    progress = _Progress(plan.total_bytes, echo)
    with atomic_dir(out) as staging:
        claim_output(staging, STAGE, run_fingerprint)
        _write_pipeline_files(plan, staging)
        for component in plan.components:
            _write_weights(plan, component, staging / component.folder, progress, workers or _cpus())
    echo(f"wrote {_gb(plan.total_bytes)} to {out} in {time.monotonic() - started:.0f} s")
    return {**summary, "written": True, "seconds": round(time.monotonic() - started, 1)}


def _already_written(out: Path, run_fingerprint: str, force: bool) -> bool:
    """True when `out` holds this very model; raises when it holds anything we may not replace."""
    if out.exists() and not out.is_dir():
        raise OutputConflict(f"{out} is a file, not a folder: choose another --out")
    owner_path = out / OWNER_FILE
    if owner_path.exists():
        owner = read_json(owner_path)
        if owner.get("stage") != STAGE:
            raise OutputConflict(f"{out} holds a dermaflux {owner.get('stage')!r} run, not a model: "
                                 "choose another --out")
        if owner.get("fingerprint") == run_fingerprint and (out / "model_index.json").exists():
            return True
        if not force:
            raise OutputConflict(f"{out} holds a different random model (fingerprint {owner.get('fingerprint')}, "
                                 f"this one {run_fingerprint}): choose another --out, or pass --force to replace it")
        return False
    if out.exists() and any(out.iterdir()):
        raise OutputConflict(f"{out} is not empty and was not written by dermaflux {STAGE}: choose another --out")
    return False


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _check_free_space(out: Path, needed: int) -> None:
    probe = _existing_ancestor(out)
    free = shutil.disk_usage(probe).free
    if free < needed + _FREE_MARGIN:
        raise ValueError(f"{probe}: {_gb(free)} free, the model needs {_gb(needed + _FREE_MARGIN)} (it is written "
                         f"beside --out {out} and renamed, so an old copy counts too): free space or choose "
                         "another --out")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_pipeline_files(plan: ModelPlan, folder: Path) -> None:
    """model_index.json (written by diffusers itself), each component's config, tokenizers, scheduler."""
    from diffusers import FluxPipeline

    models = {component.folder: component.model for component in plan.components}
    FluxPipeline(scheduler=plan.scheduler, **models, **plan.tokenizers).save_config(folder)
    plan.scheduler.save_pretrained(folder / "scheduler")
    for name, tokenizer in plan.tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    for component in plan.components:
        if component.library == "diffusers":
            component.model.save_config(folder / component.folder)
        else:
            config = component.model.config
            config.architectures = [type(component.model).__name__]
            config.dtype = plan.dtype
            config.save_pretrained(folder / component.folder)


def _weight_files(library: str, count: int) -> tuple[list[str], str | None]:
    """Shard file names and index name, as `save_pretrained` of that library names them."""
    if library == "diffusers":
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME as SINGLE_NAME
    else:
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME
        from transformers.utils import SAFE_WEIGHTS_NAME as SINGLE_NAME
    if count == 1:
        return [SINGLE_NAME], None
    stem = SINGLE_NAME.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)], SAFE_WEIGHTS_INDEX_NAME


def _write_weights(plan: ModelPlan, component: ComponentPlan, folder: Path, progress: _Progress,
                   workers: int) -> None:
    files, index_name = _weight_files(component.library, len(component.shards))
    progress.start(component.folder, component.params * plan.itemsize)
    tensors = drawn_tensors(component.tensors, plan.seed, component.folder, plan.dtype, workers)
    weight_map = {}
    for file_name, shard in zip(files, component.shards):
        write_safetensors(folder / file_name, shard, plan.dtype, tensors, on_tensor=progress.advance)
        weight_map.update({tensor.name: file_name for tensor in shard})
    progress.finish()
    if index_name:
        atomic_write_json(folder / index_name, {"metadata": {"total_size": component.params * plan.itemsize},
                                                "weight_map": weight_map})


def _tensor_seed(seed: int, component: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**63


def draw_tensor(spec: TensorSpec, seed: int, component: str, dtype: str):
    import torch

    torch_dtype = getattr(torch, dtype)
    if spec.fill == "zeros":
        return torch.zeros(spec.shape, dtype=torch_dtype)
    if spec.fill == "ones":
        return torch.ones(spec.shape, dtype=torch_dtype)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, component, spec.name))
    return torch.empty(spec.shape, dtype=torch_dtype).normal_(0.0, spec.std, generator=generator)


def drawn_tensors(specs: list[TensorSpec], seed: int, component: str, dtype: str, workers: int) -> Iterator:
    """The tensors of `specs` in order, `workers` drawn ahead on threads (torch's CPU normal_ is serial)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for spec in specs:
            pending.append(pool.submit(draw_tensor, spec, seed, component, dtype))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()




def write_safetensors(path: Path, specs: list[TensorSpec], dtype: str, tensors: Iterator,
                      on_tensor: Callable[[int], None] = lambda nbytes: None) -> None:
    """One safetensors file, tensor by tensor: the header is known from the shapes, so no tensor
    waits in memory for the others (safetensors' `save_file` needs them all at once).

    Format: 8-byte little-endian header length, JSON header (padded with spaces to 8 bytes), then
    the tensors' little-endian bytes back to back in header order.
    """
    import torch

    itemsize = _ITEMSIZE[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for spec, tensor in zip(specs, tensors):
            if tuple(tensor.shape) != spec.shape:
                raise RuntimeError(f"{path}: tensor {spec.name} drawn as {tuple(tensor.shape)}, planned {spec.shape}")
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy())  # a view of the tensor's bytes: no copy
            on_tensor(spec.numel * itemsize)
        fh.flush()
        os.fsync(fh.fileno())


class _Progress:
    """A line every few seconds and at each component's end: bytes written of the component and of all."""

    def __init__(self, total_bytes: int, echo: Callable[[str], None], every_s: float = 5.0):
        self.total, self.echo, self.every_s = total_bytes, echo, every_s
        self.done_all = 0
        self.started = self.last = time.monotonic()

    def start(self, component: str, component_bytes: int) -> None:
        self.component, self.component_total, self.done_component = component, component_bytes, 0

    def advance(self, nbytes: int) -> None:
        self.done_component += nbytes
        self.done_all += nbytes
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def finish(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        self.echo(f"{self.component}: {_gb(self.done_component)} / {_gb(self.component_total)}, "
                  f"all {_gb(self.done_all)} / {_gb(self.total)}, {self.last - self.started:.0f} s")
