"""The patch embedding stage as a torch module: pixels -> PaDiM features ``(B, d, h, w)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sk_padim.core.backbones import TruncatedBackbone
from sk_padim.core.tiling import TilePlan, tiled_layer_maps

__all__ = ["PatchEmbedding", "semi_orthogonal_matrix"]


class PatchEmbedding(nn.Module):
    """Normalise pixels, run the truncated backbone, reduce to ``d`` channels, upsample.

    The reduction is either PaDiM's, keeping ``d`` of the concatenated layers' channels
    (``channel_indices``), or Kim et al.'s semi-orthogonal embedding, ``W^T x`` per
    position for an ``(F, d)`` matrix ``W`` (``projection``). Either way it is applied to
    each layer on its own grid before that layer is upsampled (nearest) to the first
    layer's grid: nearest upsampling repeats positions, so it commutes with a per-position
    linear map, ``W^T x = W_1^T l_1 + up(W_2^T l_2) + ...`` with ``W_k`` the rows of
    ``W`` for layer ``k``. The full concatenation of the layers is never built.
    Everything is a tensor operation on the module's device; there is no per-image
    Python code.

    Parameters
    ----------
    backbone : TruncatedBackbone
        Returns the requested layers' outputs, shallowest first.
    channel_indices : array-like of int or None
        Sorted indices of the kept channels in the concatenation of the layers.
    layer_channels : tuple of int
        Channels of each layer.
    mean, std : tuple of float
        Per-channel normalisation of RGB pixels in [0, 1].
    image_size : (int, int)
        ``(H, W)`` of the pixels it takes (kept for exports; not checked).
    projection : array-like of shape (F, d) or None, default=None
        With ``channel_indices=None``: the projection ``W``, ``F = sum(layer_channels)``.
    tile_plan : sk_padim.core.tiling.TilePlan or None, default=None
        Run the backbone on these overlapping tiles (its stitched outputs equal the
        whole image's, see ``sk_padim.core.tiling``); ``None``: on whole images.

    Examples
    --------
    >>> import torch
    >>> from sk_padim import PatchFeatureTransformer
    >>> feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=8).fit()
    >>> embedding = feat.to_module()
    >>> pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    >>> embedding(pixels).shape
    torch.Size([2, 8, 8, 8])
    """

    def __init__(
        self,
        backbone: TruncatedBackbone,
        channel_indices,
        layer_channels: tuple[int, ...],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        image_size: tuple[int, int],
        projection=None,
        tile_plan: TilePlan | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.tile_plan = tile_plan
        self.image_size = tuple(image_size)
        self.normalization = (tuple(mean), tuple(std))
        self.n_layers = len(layer_channels)
        offsets = np.cumsum((0, *layer_channels))
        layer_ranges = list(zip(offsets[:-1], offsets[1:], strict=True))
        self.kept = []  # (layer number, buffer name) of the layers with kept channels
        self.projected = []  # (layer number, buffer name) of the per-layer projections
        if channel_indices is not None:
            indices = np.asarray(channel_indices)
            for number, (low, high) in enumerate(layer_ranges):
                local = indices[(indices >= low) & (indices < high)] - low
                if len(local):
                    name = f"kept_channels_{number}"
                    self.register_buffer(name, torch.as_tensor(local, dtype=torch.long))
                    self.kept.append((number, name))
            self.n_features = len(indices)
        else:
            matrix = torch.as_tensor(np.asarray(projection), dtype=torch.float32)
            for number, (low, high) in enumerate(layer_ranges):
                name = f"projection_{number}"  # W_k^T, (d, F_k)
                self.register_buffer(name, matrix[low:high].T.contiguous())
                self.projected.append((number, name))
            self.n_features = matrix.shape[1]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _project(self, layer_map: torch.Tensor, name: str) -> torch.Tensor:
        """``W_k^T l_k`` per position, ``(B, d, h, w)`` laid out channels first.

        ``(d, F) @ (F, h w)`` per image, the layer map read through a transposed view: a
        channels-last map is a row-major ``(h w, F)`` matrix, which BLAS reads transposed
        without a copy, and the product comes out channels first, ready to upsample.
        """
        n_images, n_channels, height, width = layer_map.shape
        columns = layer_map.permute(0, 2, 3, 1).reshape(n_images, height * width, n_channels)
        projected = torch.matmul(getattr(self, name), columns.transpose(1, 2))
        return projected.view(n_images, -1, height, width)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``uint8`` (0-255) or float (0-1) pixels ``(B, 3, H, W)`` -> normalised float32."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.to(torch.float32) / 255
        return (pixels.to(torch.float32) - self.mean) / self.std

    def forward(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Features ``(B, d, h, w)`` float32 of pixels ``(B, 3, H, W)``.

        ``out``, when given, is a float32 ``(B, d, h, w)`` tensor the features are
        written into (e.g. a slice of the array :meth:`transform` returns).
        """
        return self.assemble(self.layer_maps(pixels), out)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels, channels last: the backbone's input."""
        return self.normalise(pixels).contiguous(memory_format=torch.channels_last)

    def layer_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's outputs ``[(B, F_k, h_k, w_k), ...]`` for pixels, all channels."""
        return self.run_backbone(self.prepare(pixels))

    def run_backbone(self, prepared: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's outputs for :meth:`prepare`'s pixels, in tiles if planned."""
        if self.tile_plan is None:
            return self.backbone(prepared)
        return tiled_layer_maps(self.backbone, prepared, self.tile_plan)

    def kept_channels(self) -> list[np.ndarray | None]:
        """Per layer, the indices of its channels the features keep (None: all are used).

        With a projection every channel is used; with channel selection, a layer with no
        kept channel gets an empty array.
        """
        if self.projected:
            return [None] * len(self.projected)
        kept = [np.empty(0, np.int64) for _ in range(self.n_layers)]
        for number, name in self.kept:
            kept[number] = getattr(self, name).cpu().numpy()
        return kept

    def assemble(
        self,
        layer_maps: list[torch.Tensor],
        out: torch.Tensor | None = None,
        selected: bool = False,
    ) -> torch.Tensor:
        """Reduce each layer to its share of the ``d`` channels, then upsample to the first grid.

        With ``out`` the result is written into it with no temporaries; without, it is
        built by concatenation or summation (functional, as ``torch.onnx`` needs), with
        equal values. ``selected=True`` says that each layer map holds only its
        :meth:`kept_channels` already.
        """
        grid = layer_maps[0].shape[2:]
        if self.projected:
            parts = [self._project(layer_maps[number], name) for number, name in self.projected]
            if out is None:  # summed in the same order as into ``out``
                total = parts[0]
                for part in parts[1:]:
                    total = total + F.interpolate(part, size=grid, mode="nearest")
                return total.float()
            for position, part in enumerate(parts):
                _upsample_nearest_into(part, out, accumulate=position > 0)
            return out
        parts = [
            layer_maps[number]
            if selected
            else layer_maps[number].index_select(1, getattr(self, name))
            for number, name in self.kept
        ]
        if out is None:
            parts = [F.interpolate(part, size=grid, mode="nearest") for part in parts]
            return torch.cat(parts, dim=1).float()
        position = 0
        for part in parts:
            _upsample_nearest_into(part, out[:, position : position + part.shape[1]])
            position += part.shape[1]
        return out


def semi_orthogonal_matrix(n_rows: int, n_columns: int, rng: np.random.RandomState) -> np.ndarray:
    """A random ``(n_rows, n_columns)`` float32 matrix with orthonormal columns.

    Kim et al.'s recipe: the Q of the QR decomposition of a standard Gaussian matrix, each
    column's sign set by the sign of R's diagonal (so that the distribution is uniform
    over such matrices, not tied to LAPACK's sign convention).

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.core.embedding import semi_orthogonal_matrix
    >>> W = semi_orthogonal_matrix(6, 3, np.random.RandomState(0))
    >>> bool(np.allclose(W.T @ W, np.eye(3), atol=1e-6))
    True
    """
    q, r = np.linalg.qr(rng.standard_normal((n_rows, n_columns)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _upsample_nearest_into(maps: torch.Tensor, out: torch.Tensor, accumulate: bool = False):
    """``F.interpolate(maps, size=out.shape[2:], mode="nearest")`` written into ``out``.

    Added to ``out`` instead with ``accumulate=True``. For a whole-number scale (layers of
    a CNN halve their grid) each value is repeated through a broadcast view, with no
    temporary as large as the result.
    """
    (n, k, h, w), (height, width) = maps.shape, out.shape[2:]
    if height % h or width % w:
        target, source = out, F.interpolate(maps, size=(height, width), mode="nearest")
    else:
        fy, fx = height // h, width // w
        target = out.view(n, k, h, fy, w, fx)
        source = maps[:, :, :, None, :, None].expand(n, k, h, fy, w, fx)
    if accumulate:
        target.add_(source)
    else:
        target.copy_(source)
