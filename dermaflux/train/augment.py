"""Dihedral augmentation for dermoscopy: a dermoscopic image has no up, so its 8 flips and quarter turns are
all equally real images of the same lesion (pure torch).

Why the pre-compute encodes each orientation instead of turning the cached latent grid: turning a latent
grid is only exact if the VAE encoder commutes with the turn, and it does not. Its learned 3x3 kernels
have no rotational symmetry, its stride-2 downsamplers pad one side only (diffusers' Downsample2D pads
right and bottom), so even a flip moves the sampling grid by half a pixel, and its 16 latent channels
encode oriented features (edges, gradients) that moving whole cells around does not turn. A turned
latent would decode to a near-copy with artefacts the transformer would learn. Encoding the turned
image costs 8 VAE passes per image once, in the pre-compute, and 8 latents per cached row (128 KiB
each at 512 px in bf16, next to T5 embeddings of 1-4 MiB that are stored once): cheap, and exact.
Each training sample then draws one of its row's views, deterministically from its stream position.
"""

from __future__ import annotations

import torch

# Views cached per image for each `train.augment` setting.
VIEWS = {"none": 1, "dihedral": 8}


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View `view` (0-7) of [..., H, W] images: `view % 4` quarter turns, then a left-right flip when view >= 4.

    View 0 is the image itself; the 8 views are the dihedral group of the square, each once.
    """
    if not 0 <= view < 8:
        raise ValueError(f"dihedral view must be 0-7, got {view}")
    turned = torch.rot90(images, view % 4, dims=(-2, -1))
    return turned.flip(-1) if view >= 4 else turned
