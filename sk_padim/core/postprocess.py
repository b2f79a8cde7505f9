"""From distance grids to pixel anomaly maps.

The grid is upsampled bilinearly (``align_corners=False``) to the map size, then smoothed
with a Gaussian exactly as ``scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate)``
does: the same normalised kernel of radius ``int(truncate * sigma + 0.5)`` and scipy's
``mode="reflect"`` border (``d c b a | a b c d``), which is not torch's ``reflect`` padding.

Both steps are linear and separable, so along each axis they compose into one matrix
``A`` (blur after resize, built in float64), and the maps are ``A_h @ grid @ A_w^T``.
``A`` is banded: an output pixel depends on the few grid cells under its kernel. So
each axis is cut into blocks of at most ``_BLOCK`` output pixels, and a block is
one small dense matrix applied to the strip of grid cells it reads: a batched matmul
whose cost per pixel does not grow with the map (``_BLOCK / scale + kernel / scale``
multiply-adds instead of the grid's length). An axis of at most ``_BLOCK`` pixels
is one block, a plain matmul. On 2 CPU threads a 224 x 224 map takes 0.07 ms either
way (an interpolation and two padded convolutions took 3.4 ms); a 2048 x 2048 map 11 ms
in blocks, 42 ms as one dense matmul per axis (whose operators weighed 8 MB, not 1.2).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnomalyMapGenerator", "image_scores_and_pixel_quantile"]

# Output pixels per block of an axis (see the module's docstring); measured on the
# CPU, 128 and 512 are within 10 % of it at 1024 and 2048 px.
_BLOCK = 256


def _gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian kernel, float64 (``[1.0]`` for ``sigma=0``)."""
    if sigma == 0:
        return torch.ones(1, dtype=torch.float64)
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_indices(length: int, radius: int) -> torch.Tensor:
    """Indices padding an axis by ``radius`` with scipy's ``reflect`` (symmetric) rule.

    The extended signal repeats with period ``2 * length`` as ``a b c d | d c b a``, which
    also covers a radius larger than the axis.
    """
    index = torch.arange(-radius, length + radius) % (2 * length)
    return torch.where(index < length, index, 2 * length - 1 - index)


def _axis_taps(
    length_in: int, length_out: int, sigma: float, truncate: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero entries of one axis's resize-then-blur matrix, as coordinates.

    Returns ``(rows, cols, weights)``, flat, float64 weights; an entry may repeat (at the
    reflected border), and repeats add up. The resize is torch's linear, half-pixel one:
    interpolating the ramp ``0 .. length_in - 1`` gives each output pixel's source
    position, between its two cells.
    """
    ramp = torch.arange(length_in, dtype=torch.float64)[None, None]
    source = F.interpolate(ramp, size=length_out, mode="linear", align_corners=False)[0, 0]
    low = source.floor().long()
    high, high_weight = torch.clamp(low + 1, max=length_in - 1), source - low
    kernel = _gaussian_kernel(sigma, truncate)
    # taps[i, t]: the resized pixel under kernel tap t of output pixel i.
    taps = _reflect_indices(length_out, (len(kernel) - 1) // 2).unfold(0, len(kernel), 1)
    rows = torch.arange(length_out)[:, None].expand(-1, 2 * len(kernel))
    cols = torch.cat([low[taps], high[taps]], 1)
    weights = torch.cat([kernel * (1 - high_weight[taps]), kernel * high_weight[taps]], 1)
    return rows.flatten(), cols.flatten(), weights.flatten()


@functools.lru_cache(maxsize=16)
def _axis_blocks(
    length_in: int, length_out: int, sigma: float, truncate: float
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One axis's resize-then-blur matrix in blocks of ``_BLOCK`` output pixels.

    Returns None for the identity, else ``(blocks, index)``: ``blocks`` is the
    ``(n_blocks, _BLOCK, span)`` float64 matrix of each block (one ``(length_out,
    length_in)`` matrix if the axis is one block), ``index`` the ``n_blocks * span``
    grid cells the blocks read (None for one block, which reads the whole axis).
    Cached (read-only): built once per map size, not once per batch.
    """
    if length_in == length_out and sigma == 0:
        return None
    rows, cols, weights = _axis_taps(length_in, length_out, sigma, truncate)
    if length_out <= _BLOCK:
        matrix = torch.zeros(length_out, length_in, dtype=torch.float64)
        return matrix.index_put_((rows, cols), weights, accumulate=True)[None], None
    n_blocks = -(-length_out // _BLOCK)
    block = rows // _BLOCK
    first = cols.new_full((n_blocks,), length_in).scatter_reduce(0, block, cols, "amin")
    last = cols.new_zeros(n_blocks).scatter_reduce(0, block, cols, "amax")
    span = int((last - first).max()) + 1
    start = torch.clamp(first, max=length_in - span)
    blocks = torch.zeros(n_blocks, _BLOCK, span, dtype=torch.float64)
    blocks.index_put_((block, rows % _BLOCK, cols - start[block]), weights, accumulate=True)
    return blocks, (start[:, None] + torch.arange(span)).flatten()


def _apply_blocks(
    values: torch.Tensor, blocks: torch.Tensor, index: torch.Tensor | None, length: int
) -> torch.Tensor:
    """Apply one axis's blocks (``_axis_blocks``) along ``values``' dimension -2."""
    if index is None:
        return torch.matmul(blocks[0], values)
    n_blocks, _, span = blocks.shape
    strips = values.index_select(-2, index).unflatten(-2, (n_blocks, span))
    return torch.matmul(blocks, strips).flatten(-3, -2)[..., :length, :]


class AnomalyMapGenerator(nn.Module):
    """Upsample ``(B, h, w)`` distance grids to ``(B, *size)`` maps and smooth them.

    The per-axis blocks and the cells they read are buffers (float32 and int64), so
    the module moves with ``.to(device)`` and exports as gathers and matmuls; the cost
    per map pixel does not grow with the map's size (see the module ``sk_padim.core.postprocess``).

    Parameters
    ----------
    grid : (int, int)
        ``(h, w)`` of the distance grids.
    size : (int, int)
        ``(H, W)`` of the maps.
    sigma, truncate : float
        The Gaussian smoothing, as ``scipy.ndimage.gaussian_filter``; ``sigma=0`` skips it.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.postprocess import AnomalyMapGenerator
    >>> generator = AnomalyMapGenerator((2, 2), (8, 8), sigma=1.0, truncate=4.0)
    >>> generator(torch.ones(3, 2, 2)).shape
    torch.Size([3, 8, 8])
    """

    def __init__(self, grid: tuple[int, int], size: tuple[int, int], sigma: float, truncate: float):
        super().__init__()
        self.size = tuple(size)
        for axis, length_in, length_out in (("rows", grid[0], size[0]), ("cols", grid[1], size[1])):
            operator = _axis_blocks(length_in, length_out, sigma, truncate)
            blocks, index = (None, None) if operator is None else operator
            # An identity axis keeps None buffers: nothing to do along it.
            self.register_buffer(f"{axis}_blocks", None if blocks is None else blocks.float())
            self.register_buffer(f"{axis}_index", None if index is None else index.clone())

    def maps_and_scores(self, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and image scores (the maximum of each map) of distance grids ``(B, h, w)``."""
        maps = self(distances)
        return maps, maps.amax(dim=(1, 2))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        # Columns first, on the small grid, so that the rows' output is contiguous.
        maps = distances
        if self.cols_blocks is not None:
            by_columns = maps.transpose(1, 2)  # not .mT, which ONNX has no operator for
            by_columns = _apply_blocks(by_columns, self.cols_blocks, self.cols_index, self.size[1])
            maps = by_columns.transpose(1, 2)
        if self.rows_blocks is not None:
            maps = _apply_blocks(maps, self.rows_blocks, self.rows_index, self.size[0])
        return maps


def image_scores_and_pixel_quantile(
    grids, maps: AnomalyMapGenerator, n_maps: int, quantile: float
) -> tuple[np.ndarray, float]:
    """Compute the image scores of distance grids' maps and a quantile of their pixels.

    The quantile is exact (NumPy's default, linear interpolation) but made from the
    ``(1 - quantile) * n_pixels`` largest pixel values alone, kept as a running top-k
    that each map updates in turn, with only its pixels above the running cut; memory
    is one batch's maps and that top-k (0.27 MB for 16 maps of 4 megapixels at the
    default 0.999), whatever the number of maps.

    Parameters
    ----------
    grids : iterable of Tensor of shape (B, h, w)
        Batches of distance grids, ``n_maps`` grids in all.
    maps : AnomalyMapGenerator
        Makes the maps of the grids.
    n_maps : int
        Number of grids.
    quantile : float
        In [0, 1].

    Returns
    -------
    scores : ndarray of shape (n_maps,), float32
        The image scores (the maximum of each map), in the order of the grids.
    pixel : float
        ``np.quantile`` of all the maps' pixels at ``quantile``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sk_padim.core.postprocess import AnomalyMapGenerator, image_scores_and_pixel_quantile
    >>> grids = torch.rand(5, 3, 3)
    >>> maps = AnomalyMapGenerator((3, 3), (3, 3), sigma=0.0, truncate=4.0)
    >>> scores, pixel = image_scores_and_pixel_quantile(grids.split(2), maps, 5, 0.9)
    >>> bool(np.isclose(pixel, np.quantile(grids.numpy(), 0.9)))
    True
    >>> bool(np.allclose(scores, grids.numpy().max(axis=(1, 2))))
    True
    """
    height, width = maps.size
    total = n_maps * height * width
    rank = quantile * (total - 1)
    keep = total - math.floor(rank)  # the values from rank's lower neighbour up
    image_scores, top = [], None
    for batch in grids:
        batch_maps, scores = maps.maps_and_scores(batch)
        image_scores.append(scores.float().cpu().numpy())
        # Map by map: topk's workspace (a value and an int64 index per input) is one map's.
        for values in batch_maps.flatten(1):
            if top is not None and len(top) == keep:
                values = values[values > top.min()]  # the others cannot enter the top-k
            values = values if top is None else torch.cat([top, values])
            top = torch.topk(values, min(keep, len(values)), sorted=False).values
    ascending = np.sort(top.double().cpu().numpy())
    lower, upper = ascending[0], ascending[min(1, len(ascending) - 1)]
    scores = np.concatenate(image_scores) if image_scores else np.zeros(0, np.float32)
    return scores, float(lower + (rank - math.floor(rank)) * (upper - lower))
