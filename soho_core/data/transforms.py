"""Image decoding, the release's resize-to-fit, normalisation and padding.

What :func:`open_image` refuses (the loader skips and counts such a sample, the shard writer
skips it and counts it in the shard's sidecar): data PIL cannot identify or that is cut short;
an image declaring more than :data:`MAX_IMAGE_PIXELS` pixels (refused from its header, before
any pixel is decoded: a decompression bomb); one whose shorter side is below
:data:`MIN_IMAGE_SIDE` pixels (a placeholder or tracking pixel, not a scene: a 1x1 image
upsampled to the model's size is one flat colour that no caption describes).

Every mode becomes RGB: greyscale and CMYK are converted; an image with transparency (RGBA,
LA, a palette or colour key with transparent entries) is composited over white, as it looks
on the white page its annotators saw, rather than dropping alpha (which shows whatever colour
the transparent pixels happen to store, often black, and erases dark content drawn on them).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 8192 x 8192: above every image of the official datasets (COCO <= 640 px, VG <= 1280 px, NLVR2
# web photos a few thousand px) and below PIL's own default (89.5 M), as 192 MB once decoded.
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIDE = 8
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily (only the header is read) and check its declared size.

    Raises ``PIL.Image.DecompressionBombError`` above :data:`MAX_IMAGE_PIXELS` (PIL's bomb
    warning is an error here), ``ValueError`` below :data:`MIN_IMAGE_SIDE`, and PIL's own
    errors (``UnidentifiedImageError``, an ``OSError``) on data it cannot read.
    """
    if not data:
        raise ValueError("image data is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombWarning as err:
            raise Image.DecompressionBombError(str(err)) from None
    if im.width * im.height > MAX_IMAGE_PIXELS:
        im.close()
        raise Image.DecompressionBombError(
            f"image declares {im.width}x{im.height} = {im.width * im.height} pixels, over the limit of "
            f"{MAX_IMAGE_PIXELS} (soho_core.data.transforms.MAX_IMAGE_PIXELS): refused as a decompression bomb")
    if min(im.width, im.height) < MIN_IMAGE_SIDE:
        im.close()
        raise ValueError(f"image is {im.width}x{im.height}: a side below {MIN_IMAGE_SIDE} px holds no scene")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency composited over :data:`BACKGROUND` (see the module docstring)."""
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def fit_size(height: int, width: int, short_max: int, long_max: int) -> tuple[int, int]:
    """Scale (height, width), aspect kept, so the short side <= short_max and the long <= long_max,
    touching one of the two bounds (the release's "fit to 600x1000")."""
    scale = min(short_max / min(height, width), long_max / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def decode_image(data: bytes, short_max: int, long_max: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 tensor (3, h, w), RGB, resized to fit. Raises on data that
    :func:`open_image` refuses or that does not decode."""
    with open_image(data) as im:
        h, w = fit_size(im.height, im.width, short_max, long_max)
        if im.format == "JPEG" and h < im.height:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, still at least (w, h): a photo shrunk
            # to the model's size decodes several times faster, and the resize below finishes it.
            im.draft(None, (w, h))
        rgb = to_rgb(im)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        array = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_image(data: bytes) -> None:
    """Raise unless ``data`` is an image :func:`open_image` accepts and PIL can fully decode.
    JPEGs decode at 1/8 scale (``draft``): still every byte is read."""
    with open_image(data) as im:
        if im.format == "JPEG":
            im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_INV_STD_255 = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


def pad_batch(images: list[torch.Tensor], divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad uint8 images (bottom/right) to a common size that is a multiple of ``divisor``.

    Returns images (B, 3, H, W) uint8 and image_sizes (B, 2) long, the valid (height, width).
    The images stay uint8: the model normalises them where it runs (:func:`normalize_padded`,
    called by ``SohoModel.encode_images``), so a loader worker passes a quarter of the bytes
    that float would take, and the GPU receives them, with no float pass over every pixel.
    """
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long)
    H = int(-(-sizes[:, 0].max() // divisor) * divisor)
    W = int(-(-sizes[:, 1].max() // divisor) * divisor)
    # NumPy: a loader worker pads every batch, and per-image slice copies cost half as much as
    # through torch's indexing (0.19 against 0.43 ms for 8 images of 128 px).
    out = np.zeros((len(images), 3, H, W), dtype=np.uint8)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im.numpy()
    return torch.from_numpy(out), sizes


def normalize_padded(images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) padded batch (:func:`pad_batch`) -> float, ImageNet mean/std, and the
    padding 0 (the normalised mean colour), computed on the batch's own device."""
    mean = _MEAN_255.to(images.device)
    inv_std = _INV_STD_255.to(images.device)
    out = (images.float() - mean) * inv_std
    return out.mul_(valid_pixels(images, image_sizes).to(out.dtype))


def valid_pixels(images: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool, True inside each image's valid (height, width) of a padded (B, C, H, W) batch."""
    rows = torch.arange(images.shape[2], device=images.device)[None, :] < image_sizes[:, :1].to(images.device)
    cols = torch.arange(images.shape[3], device=images.device)[None, :] < image_sizes[:, 1:].to(images.device)
    return rows[:, None, :, None] & cols[:, None, None, :]
