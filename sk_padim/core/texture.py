"""Texture mode: one set of per-position Gaussians for a tile of the feature grid.

On webs and surfaces a defect can be anywhere and the position within the part means
nothing, so the feature grid ``(h, w)`` is cut into tiles of ``(th, tw)`` cells and every
tile of every training image is a sample of one tile's Gaussians: the statistics and
the Gaussians weigh one tile's ``th * tw`` positions whatever the image size.
:class:`FeatureTiles` cuts features into tile samples and stitches per-tile distance
grids back; :class:`TiledGaussians` scores whole feature grids with a tile's Gaussians.

The tiling is regular from the top-left corner; where ``th`` does not divide ``h`` (or
``tw``, ``w``) one more row (column) of tiles is aligned to the far edge, so that every
cell is covered, and when stitching those edge tiles overwrite the overlap. Both steps
are slices, permutations and writes into slices, which export to ONNX for any batch size.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from sk_padim.core.mahalanobis import PatchGaussians

__all__ = ["FeatureTiles", "TiledGaussians"]


def _axis_tiles(length: int, size: int) -> list[tuple[slice, slice]]:
    """``(tiles, cells)`` pairs along one axis: the regular tiles, then the edge tile if any.

    ``tiles`` indexes the tiles along the axis, ``cells`` the grid cells they cover,
    ``len(cells) == len(tiles) * size``.
    """
    regular = length // size
    parts = [(slice(0, regular), slice(0, regular * size))]
    if length % size:
        parts.append((slice(regular, regular + 1), slice(length - size, length)))
    return parts


class FeatureTiles:
    """The tiles of a feature grid: features -> tile samples, tile values -> grids.

    Tiles are ordered image by image, then row by row of tiles (top to bottom, the
    edge-aligned row last), each row left to right (the edge-aligned tile last).

    Parameters
    ----------
    grid : (int, int)
        ``(h, w)`` of the feature grid.
    tile : (int, int)
        ``(th, tw)`` of a tile, in grid cells, at most ``(h, w)``.

    Attributes
    ----------
    n_tiles : int
        Tiles per image.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.texture import FeatureTiles
    >>> tiles = FeatureTiles((5, 4), (2, 2))
    >>> features = torch.randn(3, 8, 5, 4)
    >>> samples = tiles.samples(features)
    >>> tiles.n_tiles, samples.shape
    (6, torch.Size([18, 8, 2, 2]))
    >>> bool(torch.equal(tiles.stitch(samples[:, 0]), features[:, 0]))
    True
    """

    def __init__(self, grid: tuple[int, int], tile: tuple[int, int]):
        (height, width), (tile_height, tile_width) = map(int, grid), map(int, tile)
        if not (1 <= tile_height <= height and 1 <= tile_width <= width):
            raise ValueError(
                f"A tile of {tile_height} x {tile_width} cells does not fit in the feature "
                f"grid of {height} x {width} cells; choose a tile from 1 x 1 to "
                f"{height} x {width} cells."
            )
        self.grid = (height, width)
        self.tile = (tile_height, tile_width)
        self._parts = (_axis_tiles(height, tile_height), _axis_tiles(width, tile_width))

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles per image along each axis, ``(rows, columns)``."""
        return tuple(parts[-1][0].stop for parts in self._parts)

    @property
    def n_tiles(self) -> int:
        """Tiles per image."""
        return self.shape[0] * self.shape[1]

    def samples(self, features: torch.Tensor) -> torch.Tensor:
        """Cut feature grids into tiles, each one a sample of the tile's Gaussians.

        Parameters
        ----------
        features : Tensor of shape (B, d, h, w)
            Feature grids of this tiling's grid.

        Returns
        -------
        samples : Tensor of shape (B * n_tiles, d, th, tw)
            The tiles, contiguous, in the order of the class docstring: the one copy
            of the features made (several strided copies, no other temporary).
        """
        n_images, n_features, *grid = features.shape
        tracing = torch.jit.is_tracing()  # the ONNX export: no checks in the graph
        if not tracing and tuple(grid) != self.grid:
            raise ValueError(
                f"Features of a {grid[0]} x {grid[1]} grid do not fit tiles of a "
                f"{self.grid[0]} x {self.grid[1]} grid; make the tiles of the features' grid."
            )
        tile_height, tile_width = self.tile
        samples = features.new_empty(n_images, *self.shape, n_features, *self.tile)
        for (tile_rows, rows), (tile_cols, cols) in itertools.product(*self._parts):
            cells = features[:, :, rows, cols].unflatten(2, (-1, tile_height))
            cells = cells.unflatten(4, (-1, tile_width))  # (B, d, rows, th, cols, tw)
            samples[:, tile_rows, tile_cols] = cells.permute(0, 2, 4, 1, 3, 5)
        # reshape (not flatten): the ONNX export then keeps the batch size a variable
        return samples.reshape(-1, n_features, *self.tile)

    def stitch(self, values: torch.Tensor) -> torch.Tensor:
        """Put per-tile grids back into whole grids (the inverse of :meth:`samples`).

        Parameters
        ----------
        values : Tensor of shape (B * n_tiles, th, tw)
            One grid per tile, in the order :meth:`samples` gives the tiles.

        Returns
        -------
        grids : Tensor of shape (B, h, w)
            Each cell from the last tile covering it: the edge-aligned tiles overwrite
            the overlap.
        """
        tracing = torch.jit.is_tracing()  # the ONNX export: no checks in the graph
        if not tracing and (values.shape[1:] != self.tile or len(values) % self.n_tiles):
            raise ValueError(
                f"Values of shape {tuple(values.shape)} are not {self.n_tiles} tiles of "
                f"{self.tile[0]} x {self.tile[1]} per image."
            )
        # reshape and shape[0] (not unflatten, len): the export keeps the batch a variable
        tiles = values.reshape(-1, *self.shape, *self.tile)  # (B, rows, cols, th, tw)
        grids = values.new_empty(tiles.shape[0], *self.grid)
        for (tile_rows, rows), (tile_cols, cols) in itertools.product(*self._parts):
            cells = tiles[:, tile_rows, tile_cols].permute(0, 1, 3, 2, 4)  # (B, rows, th, ...)
            # Into a plain slice: a write into a view of it is lost in the ONNX export.
            grids[:, rows, cols] = cells.flatten(3, 4).flatten(1, 2)
        return grids


class TiledGaussians(nn.Module):
    """Distances of whole feature grids to one tile's per-position Gaussians.

    Every tile of the features is scored against the same Gaussians (one per cell of
    the tile), and the tiles' distance grids are stitched back (:class:`FeatureTiles`).
    It stands wherever ``PatchGaussians`` does (the
    ``gaussians`` of ``sk_padim.core.model.PatchScorer``), moves with ``.to(device)``
    and pickles with its Gaussians.

    Parameters
    ----------
    gaussians : PatchGaussians
        The tile's Gaussians, ``th * tw`` positions in row-major order, e.g.
        ``PatchStatistics.empty(th * tw, d).update(tiles.samples(features)).gaussians(reg)``.
    tiles : FeatureTiles
        The tiling of the feature grids to score.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.statistics import PatchStatistics
    >>> from sk_padim.core.texture import FeatureTiles, TiledGaussians
    >>> tiles = FeatureTiles((6, 9), (3, 3))
    >>> features = torch.randn(4, 5, 6, 9)
    >>> stats = PatchStatistics.empty(9, 5).update(tiles.samples(features))
    >>> stats.count
    24
    >>> TiledGaussians(stats.gaussians(reg=0.01), tiles)(features).shape
    torch.Size([4, 6, 9])
    """

    def __init__(self, gaussians: PatchGaussians, tiles: FeatureTiles):
        super().__init__()
        tile_height, tile_width = tiles.tile
        if len(gaussians) != tile_height * tile_width:
            raise ValueError(
                f"Gaussians of {len(gaussians)} positions do not fit tiles of {tile_height} "
                f"x {tile_width} cells; fit them on the tiles' samples (FeatureTiles.samples)."
            )
        self.gaussians = gaussians
        self.tiles = tiles

    @property
    def storage(self) -> str:
        """The precision of the tile's Gaussians' factors."""
        return self.gaussians.storage

    def in_memory(self) -> TiledGaussians:
        """Give these tiled Gaussians with their factors in memory.

        Returns
        -------
        tiled : TiledGaussians
            Themselves, or a copy whose tile Gaussians were read from their file.
        """
        gaussians = self.gaussians.in_memory()
        return self if gaussians is self.gaussians else TiledGaussians(gaussians, self.tiles)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Compute the distances of whole feature grids to the tile's Gaussians.

        Parameters
        ----------
        features : Tensor of shape (B, d, h, w)
            Features of the tiling's grid.

        Returns
        -------
        distances : Tensor of shape (B, h, w)
            Each cell's Mahalanobis distance, stitched from its tile.
        """
        return self.tiles.stitch(self.gaussians(self.tiles.samples(features)))
