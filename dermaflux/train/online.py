"""Online encoding (`train.encode: online`): caption rows -> the transformer's inputs in the training worker,
with the frozen VAE, CLIP and T5 it holds (pure torch; the Ray Data stream that feeds it is ray_online.py).

What the pre-compute would have cached, made per sample instead: the image decoded, turned to a dihedral view
of the pixels (each view is its own image encoded, as in the cache: augment.py says why) and encoded by the
VAE in one pass over the micro-batch; the prompt styled and encoded by CLIP + T5 at the run's T5 length. A
sample's view and caption dropout are drawn from (seed, epoch, row), so the same row in the same epoch is
the same sample whichever worker or position it lands on.
"""

from __future__ import annotations

import numpy as np
import torch

from dermaflux.train.augment import dihedral
from dermaflux.train.encode import decode_images, encode_captions, encode_images
from dermaflux.train.precompute import styled_captions


def sample_draw(seed: int, epoch: int, row: int, views: int, dropout: float) -> tuple[int, bool]:
    """(view, trains with the empty prompt) of global row `row` in `epoch`."""
    rng = np.random.default_rng([seed, epoch, row, 0x0E])  # its own seed word: apart from the cached streams
    view = int(rng.integers(0, views)) if views > 1 else 0
    return view, bool(rng.random() < dropout) if dropout > 0 else False


def encode_samples(pipe, rows: dict, epochs: list[int], resolution: int, text_tokens: int, caption_style: str,
                   views: int, seed: int, dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [B, C, h, w], prompt_embeds [B, L, D], pooled [B, Dp]) of a columnar batch of caption rows
    (id, caption, label, image, row), sample i drawn in epoch `epochs[i]`; on the encoders' device, no gradients."""
    prompts = styled_captions(rows, caption_style)  # an empty caption is still an error naming its row
    images = decode_images(list(rows["image"]), resolution)
    turned = []
    for i, (row, epoch) in enumerate(zip(rows["row"], epochs)):
        view, dropped = sample_draw(seed, epoch, int(row), views, dropout)
        turned.append(dihedral(images[i], view))
        if dropped:
            prompts[i] = ""  # the empty prompt's embeddings: what the cached path takes from validation.pt
    with torch.no_grad():
        latents = encode_images(pipe.vae, torch.stack(turned))
        prompt_embeds, pooled = encode_captions(pipe, prompts, text_tokens)
    return latents.to(prompt_embeds.dtype), prompt_embeds, pooled
