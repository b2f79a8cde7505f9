"""The patch embedding stage as a torch module: pixels -> PaDiM features ``(B, d, h, w)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sk_padim.backbones import TruncatedBackbone


class PatchEmbedding(nn.Module):
    """Normalise pixels, run the truncated backbone, keep ``d`` channels, upsample.

    The kept channels of each layer are selected on that layer's own grid, then
    upsampled (nearest) to the first layer's grid and written side by side, so the full
    concatenation of the layers is never built. Everything is a tensor operation on the
    module's device; there is no per-image Python code.

    Parameters
    ----------
    backbone : TruncatedBackbone
        Returns the requested layers' outputs, shallowest first.
    channel_indices : array-like of int
        Sorted indices of the kept channels in the concatenation of the layers.
    layer_channels : tuple of int
        Channels of each layer.
    mean, std : tuple of float
        Per-channel normalisation of RGB pixels in [0, 1].
    image_size : (int, int)
        ``(H, W)`` of the pixels it takes (kept for exports; not checked).

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
    ):
        super().__init__()
        self.backbone = backbone
        self.image_size = tuple(image_size)
        self.normalization = (tuple(mean), tuple(std))
        indices = np.asarray(channel_indices)
        offsets = np.cumsum((0, *layer_channels))
        self.kept = []  # (layer number, buffer name) of the layers with kept channels
        for number, (low, high) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            local = indices[(indices >= low) & (indices < high)] - low
            if len(local):
                name = f"kept_channels_{number}"
                self.register_buffer(name, torch.as_tensor(local, dtype=torch.long))
                self.kept.append((number, name))
        self.n_features = len(indices)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

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
        x = self.normalise(pixels).contiguous(memory_format=torch.channels_last)
        return self.assemble(self.backbone(x), out)

    def assemble(
        self, layer_maps: list[torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Select the kept channels of each layer, then upsample them to the first grid.

        With ``out`` the result is written into it with no temporaries; without, it is
        built by concatenation (functional, as ``torch.onnx`` needs), with equal values.
        """
        grid = layer_maps[0].shape[2:]
        selected = [
            (layer_maps[number].index_select(1, getattr(self, name))) for number, name in self.kept
        ]
        if out is None:
            parts = [F.interpolate(part, size=grid, mode="nearest") for part in selected]
            return torch.cat(parts, dim=1).float()
        position = 0
        for part in selected:
            upsample_nearest_into(part, out[:, position : position + part.shape[1]])
            position += part.shape[1]
        return out


def upsample_nearest_into(maps: torch.Tensor, out: torch.Tensor) -> None:
    """``F.interpolate(maps, size=out.shape[2:], mode="nearest")`` written into ``out``.

    For a whole-number scale (layers of a CNN halve their grid) each value is repeated
    through a broadcast view, with no temporary as large as the result.
    """
    (n, k, h, w), (height, width) = maps.shape, out.shape[2:]
    if height % h or width % w:
        out.copy_(F.interpolate(maps, size=(height, width), mode="nearest"))
        return
    fy, fx = height // h, width // w
    blocks = out.view(n, k, h, fy, w, fx)
    blocks.copy_(maps[:, :, :, None, :, None].expand(n, k, h, fy, w, fx))
