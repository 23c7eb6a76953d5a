"""From a CNN feature map to visual tokens: pool, project, mask padding, add 2-D position.

The work is split in two calls so the visual dictionary (and the MVM masking) can act on
the projected features before positions are added:

    v, mask, grid = embed.project(feats, image_sizes)   # (B, N, d), (B, N), (h, w)
    ... quantise / mask v ...
    tokens = embed.add_position(v, mask, grid)           # (B, N, d)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from soho_core.config import POOL_MODES


def valid_grid(image_sizes: torch.Tensor, total_stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """Valid (rows, cols) of each image on the token grid.

    image_sizes (B, 2) long: valid (height, width) in pixels of each padded image. Height and
    width are separate on purpose: the release derived both from the padded height, so width
    padding was never masked and portrait images lost valid tokens.
    Returns (B, 2) long, clamped to [1, grid] so an image always keeps at least one token.
    """
    cells = torch.div(image_sizes + total_stride - 1, total_stride, rounding_mode="floor")
    limit = torch.tensor(grid, device=image_sizes.device)
    return torch.minimum(cells.clamp(min=1), limit)


def sine_position_2d(rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int], dim: int,
                     temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine position encoding over each image's valid grid.

    rows, cols (B,) long: valid rows/cols per image. Coordinates are cell centres divided by
    that image's own valid rows/cols (then times 2 pi), so the encoding of a valid cell does
    not depend on how much padding surrounds it. Half of the channels encode y, half x.
    Returns (B, h*w, dim), zero at padded cells.
    """
    if dim % 4:
        raise ValueError(f"the visual width must be divisible by 4 for the 2-D sine encoding, got {dim}")
    h, w = grid
    device = rows.device
    r = torch.arange(h, device=device, dtype=torch.float32)
    c = torch.arange(w, device=device, dtype=torch.float32)
    y = (r[None, :] + 0.5) / rows[:, None].float() * (2 * math.pi)  # (B, h)
    x = (c[None, :] + 0.5) / cols[:, None].float() * (2 * math.pi)  # (B, w)
    quarter = dim // 4
    freq = temperature ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ey = torch.cat([(y[..., None] * freq).sin(), (y[..., None] * freq).cos()], -1)  # (B, h, d/2)
    ex = torch.cat([(x[..., None] * freq).sin(), (x[..., None] * freq).cos()], -1)  # (B, w, d/2)
    pos = torch.cat([ey[:, :, None].expand(-1, -1, w, -1), ex[:, None].expand(-1, h, -1, -1)], -1)
    inside = (r[None, :, None] < rows[:, None, None]) & (c[None, None, :] < cols[:, None, None])
    return (pos * inside[..., None]).flatten(1, 2)


class WindowConcat(nn.Module):
    """(B, C, H, W) -> (B, C * k * k, ceil(H / k), ceil(W / k)): each k x k window's features side by
    side (space to depth), the map first padded with zeros to a multiple of k."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.unshuffle = nn.PixelUnshuffle(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = -x.shape[-2] % self.k, -x.shape[-1] % self.k
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.unshuffle(x)


class VisualEmbedding(nn.Module):
    """Pool (``pool`` x ``pool``), 1x1 conv to width ``dim``, BatchNorm; then positions + LayerNorm.

    ``backbone_stride`` is the stride of the incoming feature map; the token grid has stride
    ``total_stride = backbone_stride * pool`` in pixels.
    """

    def __init__(self, in_channels: int, dim: int, pool: int, backbone_stride: int, pool_mode: str = "max"):
        super().__init__()
        if dim % 4:
            raise ValueError(f"the visual width must be divisible by 4 for the 2-D sine encoding, got {dim}")
        if pool_mode not in POOL_MODES:
            raise ValueError(f"model.visual.pool_mode must be one of {', '.join(POOL_MODES)}, got {pool_mode!r}")
        # ceil_mode keeps a partial border window instead of dropping the last row/column of
        # features, so every valid pixel stays covered by some token (concat pads with zeros to match).
        if pool == 1:
            self.pool: nn.Module = nn.Identity()
        elif pool_mode == "max":
            self.pool = nn.MaxPool2d(pool, pool, ceil_mode=True)
        else:
            self.pool = WindowConcat(pool)
            in_channels *= pool * pool
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.bn = nn.BatchNorm2d(dim)
        self.norm = nn.LayerNorm(dim)
        self.dim = dim
        self.total_stride = backbone_stride * pool

    def project(self, feats: torch.Tensor, image_sizes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """feats (B, C, H', W') backbone output; image_sizes (B, 2) long valid (height, width) pixels.

        Returns v (B, N, d) with N = h*w flattened row-major, mask (B, N) bool (True = valid
        token) and the grid (h, w).
        """
        v = self.bn(self.proj(self.pool(feats)))
        grid = (v.shape[-2], v.shape[-1])
        rc = valid_grid(image_sizes.to(v.device), self.total_stride, grid)
        rows = torch.arange(grid[0], device=v.device)
        cols = torch.arange(grid[1], device=v.device)
        mask = (rows[None, :, None] < rc[:, 0, None, None]) & (cols[None, None, :] < rc[:, 1, None, None])
        return v.flatten(2).transpose(1, 2), mask.flatten(1), grid

    def add_position(self, x: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, N, d), mask (B, N) bool, grid (h, w) -> tokens (B, N, d) with position added, then LN."""
        h, w = grid
        m = mask.view(-1, h, w)
        # Valid cells form a top-left rectangle, so its size is the count along row 0 / column 0.
        rows = m[:, :, 0].sum(1).clamp(min=1)
        cols = m[:, 0, :].sum(1).clamp(min=1)
        pos = sine_position_2d(rows, cols, grid, self.dim).to(x.dtype)
        return self.norm(x + pos)
