"""Image decoding, the release's resize-to-fit, normalisation and padding."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def fit_size(height: int, width: int, short_max: int, long_max: int) -> tuple[int, int]:
    """Scale (height, width), aspect kept, so the short side <= short_max and the long <= long_max,
    touching one of the two bounds (the release's "fit to 600x1000")."""
    scale = min(short_max / min(height, width), long_max / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(data: bytes, short_max: int, long_max: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (3, h, w) resized to fit. Raises on undecodable data."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        h, w = fit_size(im.height, im.width, short_max, long_max)
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), Image.BILINEAR)
        array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (images.float() - mean) / std


def pad_batch(images: list[torch.Tensor], divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and zero-pad (bottom/right) to a common size that is a multiple of ``divisor``.

    Returns images (B, 3, H, W) float and image_sizes (B, 2) long, the valid (height, width).
    """
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
    H = int(-(-sizes[:, 0].max() // divisor) * divisor)
    W = int(-(-sizes[:, 1].max() // divisor) * divisor)
    out = torch.zeros(len(images), 3, H, W)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = normalize(im)
    return out, sizes
