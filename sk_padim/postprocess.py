"""From distance grids to pixel anomaly maps and image scores.

The grid is upsampled bilinearly (``align_corners=False``) to the map size, then smoothed
with a Gaussian exactly as ``scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate)``
does: the same normalised kernel of radius ``int(truncate * sigma + 0.5)`` and scipy's
``mode="reflect"`` border (``d c b a | a b c d``), which is not torch's ``reflect`` padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float, truncate: float, device=None) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian kernel, float32."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def reflect_indices(length: int, radius: int, device=None) -> torch.Tensor:
    """Indices padding an axis by ``radius`` with scipy's ``reflect`` (symmetric) rule.

    The extended signal repeats with period ``2 * length`` as ``a b c d | d c b a``, which
    also covers a radius larger than the axis.
    """
    index = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(index < length, index, 2 * length - 1 - index)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps; ``sigma == 0`` returns them."""
    if sigma == 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate, maps.device)
    radius = (len(kernel) - 1) // 2
    for dim in (1, 2):
        padded = maps.index_select(dim, reflect_indices(maps.shape[dim], radius, maps.device))
        lines = padded.movedim(dim, -1)
        flat = lines.reshape(-1, 1, lines.shape[-1])
        smoothed = F.conv1d(flat, kernel.view(1, 1, -1)).reshape(*lines.shape[:-1], -1)
        maps = smoothed.movedim(-1, dim)
    return maps.contiguous()


def anomaly_maps(
    distances: torch.Tensor, size: tuple[int, int], sigma: float, truncate: float
) -> torch.Tensor:
    """Upsample ``(B, h, w)`` distance grids to ``size`` and smooth them."""
    if tuple(distances.shape[1:]) != tuple(size):
        distances = F.interpolate(
            distances[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0]
    return gaussian_blur(distances, sigma, truncate)
