"""Batched image augmentation without per-image Python loops.

All functions take the random parameters explicitly, so callers control where random numbers
come from (the loader draws them on the CPU from a seeded generator, which makes batches
identical on every device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["batch_crop", "batch_flip"]


def batch_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop a batch after zero padding, with two vectorized gathers (rows, columns).

    Equivalent to: zero-pad every image by ``pad`` pixels on each side, then cut the
    ``H x W`` window whose top-left corner is ``(dy[i], dx[i])`` out of image ``i``.

    Args:
        x: Images ``[B, C, H, W]`` (any dtype).
        dy: Row offsets ``[B]`` in ``0..2*pad`` (int64, same device as ``x``).
        dx: Column offsets ``[B]`` in ``0..2*pad``.
        pad: Padding in pixels; ``0`` returns ``x`` unchanged.

    Returns:
        Cropped images ``[B, C, H, W]``.
    """
    if pad == 0:
        return x
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(B, 1) + torch.arange(H, device=x.device)).view(B, 1, H, 1)
    padded = padded.gather(2, rows.expand(B, C, H, W + 2 * pad))
    cols = (dx.view(B, 1) + torch.arange(W, device=x.device)).view(B, 1, 1, W)
    return padded.gather(3, cols.expand(B, C, H, W))


def batch_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images (left-right) where ``mask`` is true.

    Args:
        x: Images ``[B, C, H, W]``.
        mask: Bool ``[B]``; ``True`` flips that image.

    Returns:
        Images ``[B, C, H, W]``.
    """
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
