"""The tiny preset: a complete Flux pipeline with tiny configs, built offline.

Every component is the class FLUX.1-dev uses (CLIP + T5 text encoders and their
tokenizers, AutoencoderKL, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler),
so `FluxPipeline.from_pretrained(<folder>)` takes the same path for both. Weights are
random (seeded); the VAE is fitted to lesion images by the train stage before use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dermaflux.model.config import TinyFluxSpec

# Part of the cache key: a change to what a spec builds (2: stable tokenizer ids) gets a new folder.
BUILD_VERSION = 2

# Words the tokenizers are trained on: the caption vocabulary of DermaFlux (taxonomy names,
# ABCD attributes, body sites, skin tones) plus filler so free text still tokenizes.
_VOCAB_TEXT = """
a an the this of with and or on in at is are has shows showing depicts photo image dermoscopic dermoscopy clinical
close-up lesion mole skin spot pigmented benign malignant suspicious description here's here's description
melanoma nevus melanocytic naevus basal cell carcinoma actinic keratosis intraepithelial bowen's disease benign
keratosis seborrheic lichen planus-like solar lentigo dermatofibroma vascular angioma haemangioma hemangioma
pyogenic granuloma squamous unknown other
asymmetric asymmetry symmetric symmetrical mildly moderately highly strongly slightly markedly one two both axes axis
border regular irregular smooth well-defined ill-defined notched jagged blurred sharp edge edges outline
colour colours color colors variegation uniform single multiple white red light dark brown blue-grey blue grey gray
black pink tan
diameter small medium large mm millimetres millimeters pixels about approximately across wide
site body back trunk chest abdomen face scalp neck ear upper lower extremity extremities arm leg hand foot acral
genital unknown location
skin tone type fitzpatrick i ii iii iv v vi fair light medium olive brown dark
patient age aged years old male female man woman
0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 70 80 90
""".split()


def _training_sentences() -> list[str]:
    words = _VOCAB_TEXT
    # Sliding windows give BPE/Unigram realistic co-occurrence without external text.
    windows = [" ".join(words[i : i + 12]) for i in range(0, len(words))]
    # Punctuation as captions use it, so commas and full stops get tokens rather than <unk>.
    punctuated = [w.replace(" ", ", ", 2) + ". It's (3-6 mm); \"ok\": yes/no!" for w in windows]
    return (windows + punctuated) * 4


def _build_clip_tokenizer(spec: TinyFluxSpec):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    backend = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    # Same normalizer and pre-tokenizer as transformers' CLIPTokenizer, so merges match at load time.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.clip_vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_sentences(), trainer)
    with tempfile.TemporaryDirectory() as tmp:
        backend.model.save(tmp)
        trained = json.loads(Path(tmp, "vocab.json").read_text())
        merges = [
            tuple(line.split(" "))
            for line in Path(tmp, "merges.txt").read_text().splitlines()
            if line and not line.startswith("#version")
        ]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = _stable_ids(trained, specials)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=spec.clip_max_tokens)


def _stable_ids(trained: dict[str, int], specials: list[str]) -> dict[str, int]:
    """Token ids by sorted token text, special tokens first.

    The trainers break ties in hash-map order, so the same corpus gives the same tokens under
    different ids from one build to the next: a model built on another node would read other
    embedding rows. Renumbering by text makes every build of a spec identical.
    """
    rest = sorted(token for token in trained if token not in specials)
    return {token: i for i, token in enumerate(specials + rest)}


def _renumbered_unigram(backend, specials: list[str]):
    """The trained Unigram model with its pieces in a stable order (see _stable_ids); scores kept."""
    from tokenizers import Tokenizer, models

    with tempfile.TemporaryDirectory() as tmp:
        backend.model.save(tmp)
        pieces = {piece: score for piece, score in json.loads(Path(tmp, "unigram.json").read_text())["vocab"]}
    order = _stable_ids(pieces, specials)
    renumbered = Tokenizer(models.Unigram([(piece, pieces[piece]) for piece in order], unk_id=order["<unk>"]))
    renumbered.normalizer, renumbered.pre_tokenizer, renumbered.decoder = (
        backend.normalizer, backend.pre_tokenizer, backend.decoder)
    return renumbered


def _build_t5_tokenizer(spec: TinyFluxSpec):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=spec.t5_vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(_training_sentences(), trainer)
    backend = _renumbered_unigram(backend, ["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=spec.t5_max_tokens,
    )


def _build_clip_encoder(spec: TinyFluxSpec, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.clip_hidden,
            intermediate_size=spec.clip_hidden * 4,
            num_hidden_layers=spec.clip_layers,
            num_attention_heads=spec.clip_heads,
            max_position_embeddings=spec.clip_max_tokens,
            projection_dim=spec.clip_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _build_t5_encoder(spec: TinyFluxSpec, tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=spec.t5_hidden,
            d_kv=spec.t5_hidden // spec.t5_heads,
            d_ff=spec.t5_hidden * 2,
            num_layers=spec.t5_layers,
            num_heads=spec.t5_heads,
            feed_forward_proj="gated-gelu",  # as in T5 v1.1, which Flux uses
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _build_vae(spec: TinyFluxSpec):
    from diffusers import AutoencoderKL

    n_levels = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.resolution,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,  # Flux's VAE has no quant convs
        use_post_quant_conv=False,
    )


def _build_transformer(spec: TinyFluxSpec):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.latent_channels * 4,  # 2x2 latent patches are packed into channels
        num_layers=spec.double_blocks,
        num_single_layers=spec.single_blocks,
        attention_head_dim=sum(spec.axes_dims_rope),
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_hidden,
        pooled_projection_dim=spec.clip_hidden,
        guidance_embeds=True,  # like FLUX.1-dev, so the guidance path is exercised
        axes_dims_rope=tuple(spec.axes_dims_rope),
    )


def _build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=256,
    )


def build_tiny_pipeline(spec: TinyFluxSpec | None = None):
    """Build the tiny FluxPipeline in memory (seeded, so every build is identical)."""
    import torch
    from diffusers import FluxPipeline

    spec = spec or TinyFluxSpec()
    tokenizer = _build_clip_tokenizer(spec)
    tokenizer_2 = _build_t5_tokenizer(spec)
    # One seed, then the models in this order: each draws its initial weights from the same global
    # stream, and the cache folder is keyed by the spec alone, so reordering would change the weights
    # behind an unchanged key.
    torch.manual_seed(spec.seed)
    text_encoder = _build_clip_encoder(spec, tokenizer)
    text_encoder_2 = _build_t5_encoder(spec, tokenizer_2)
    vae = _build_vae(spec)
    transformer = _build_transformer(spec)
    return FluxPipeline(
        scheduler=_build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def ensure_tiny_pipeline(folder: str | os.PathLike, spec: TinyFluxSpec | None = None) -> Path:
    """Write the tiny pipeline to `folder` in the Hugging Face layout unless it is already there.

    Built in a sibling temp folder and renamed into place, so a crash never leaves half a model
    and concurrent builders (Ray workers on one node) do not collide.
    """
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build_tiny_pipeline(spec).save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
