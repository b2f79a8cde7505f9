"""A backbone run in overlapping tiles whose stitched outputs equal the whole image's.

A convolutional layer's output at a cell depends only on the input pixels of its
receptive field. So the truncated backbone can run on tiles of a large image, each tile
a *core* plus a *margin* of overlap on every side that touches another tile, and each
layer's output cropped to the core's cells equals the whole image's output there (to
float32 rounding: a convolution over another size may sum in another order):

- tile origins are multiples of the deepest kept layer's total stride ``S``, so every
  layer's grid in a tile is the whole grid shifted by whole cells;
- the margin is at least the receptive-field radius of every kept layer, rounded up to a
  multiple of ``S``, plus one more ``S`` for safety (:func:`receptive_margin` measures it
  on the backbone itself, so hooked modules work as named ones do);
- tiles touching the image border stop at it (no margin beyond the image), so the
  network's zero padding there is the whole image's; and each tile's size is congruent
  to the image's modulo ``S``, so a "same" padding that depends on the input's parity
  (TensorFlow's, as in some EfficientNet ports) pads as it does for the whole image.

Activation memory is then that of one tile: ``PIXEL_BUDGET`` pixels per forward pass
(:func:`images_per_pass`, :meth:`TilePlan.for_budget`). Networks that pool over the
whole image (squeeze-and-excitation blocks, e.g. torchvision's EfficientNets) have no
finite receptive field, and :func:`receptive_margin` refuses them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["TilePlan", "receptive_margin", "tiled_layer_maps"]

PIXEL_BUDGET = 4 * 1024 * 1024
"""Pixels per forward pass of the backbone (images x height x width, tile margins
included): 4 megapixels, e.g. one 2048 x 2048 image, or 83 images of 224 x 224 px.
Measured on a CPU in float32, its activations take 0.5 GB for ResNet-18 up to
``layer3`` and 1.2 GB for EfficientNet-Lite0 up to ``_blocks.10``."""

BATCH_PIXELS = 32 * 224 * 224
"""Pixels of several images batched into one forward pass: those of the default batch at
the default size (32 images of 224 x 224 px, 1.6 megapixels). Larger batches gain
nothing on a CPU, whose convolutions are large already, and hold more activations: one
1024 x 1024 image runs alone (0.3 GB of activations for EfficientNet-Lite0, where 4 at
once held 1.2 GB). One image runs whole up to ``PIXEL_BUDGET`` before it is tiled."""

_FIRST_PROBE = 256  # ResNet-18's layer3 needs 105 px each side, Lite0's _blocks.10 181 px
_LARGEST_PROBE = 1024  # measures needs up to about 500 px

Backbone = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def images_per_pass(image_size: tuple[int, int], batch_size: int) -> int:
    """How many images of ``image_size`` go through the backbone at once.

    ``batch_size``, fewer if they would exceed ``BATCH_PIXELS`` pixels, and at least
    one (an image above ``PIXEL_BUDGET`` is tiled).

    Examples
    --------
    >>> from sk_padim.core.tiling import images_per_pass
    >>> images_per_pass((224, 224), 32), images_per_pass((512, 512), 32)
    (32, 6)
    >>> images_per_pass((1024, 1024), 32)
    1
    """
    height, width = image_size
    return max(1, min(batch_size, BATCH_PIXELS // (height * width)))


def plan_tiles(
    backbone: Backbone, image_size: tuple[int, int], tile_size: str | int | None
) -> TilePlan | None:
    """The tiles to run ``backbone`` on for images of ``image_size``, or None (whole).

    Parameters
    ----------
    backbone : callable
        Pixels -> its layers' outputs, differentiable (see :func:`receptive_margin`).
    image_size : (int, int)
        ``(height, width)`` of the images.
    tile_size : "auto", int or None
        ``"auto"``: tiles only for images above ``PIXEL_BUDGET`` pixels, the
        largest that fit it (:meth:`TilePlan.for_budget`); an int: cores of this side
        (rounded up to a multiple of the deepest stride); ``None``: never.

    Returns
    -------
    plan : TilePlan or None
    """
    height, width = image_size
    if tile_size is None or (tile_size == "auto" and height * width <= PIXEL_BUDGET):
        return None
    strides, margin = receptive_margin(backbone)
    if tile_size == "auto":
        return TilePlan.for_budget(strides, margin, PIXEL_BUDGET)
    stride = max(strides)
    core = -(-tile_size // stride) * stride
    return TilePlan(strides, margin, (core, core))


class _Span(NamedTuple):
    """One tile along an axis: its core ``[core_start, core_stop)`` and its input
    ``[start, stop)`` (the core and the margins inside the image), in pixels."""

    core_start: int
    core_stop: int
    start: int
    stop: int


@dataclass(frozen=True)
class TilePlan:
    """How to cut images into overlapping tiles for a backbone.

    Parameters
    ----------
    strides : tuple of int
        The total stride of each kept layer (pixels per cell), shallowest first; each
        divides the largest, :attr:`stride`.
    margin : int
        Pixels of overlap on each side of a core that touches another tile, a multiple
        of :attr:`stride`.
    core : (int, int)
        ``(height, width)`` of a tile's core, multiples of :attr:`stride`; the cores
        partition the image (the last ones are cut by its border).

    Examples
    --------
    >>> from sk_padim.core.tiling import TilePlan
    >>> plan = TilePlan(strides=(4, 8, 16), margin=32, core=(64, 64))
    >>> for span in plan.spans(150, axis=0):  # 150 = 9 x 16 + 6: 6 px added to (0, 96)
    ...     print(span)
    _Span(core_start=0, core_stop=64, start=0, stop=102)
    _Span(core_start=64, core_stop=128, start=32, stop=150)
    _Span(core_start=128, core_stop=150, start=96, stop=150)
    """

    strides: tuple[int, ...]
    margin: int
    core: tuple[int, int]

    def __post_init__(self):
        numbers = (*self.strides, self.margin, *self.core)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise TypeError(f"A TilePlan holds ints; got {self!r}.")
        stride = max(self.strides, default=0)
        if (
            min(self.strides, default=0) < 1
            or any(stride % s for s in self.strides)
            or self.margin < 0
            or len(self.core) != 2
            or any(n < 1 or n % stride for n in (*self.core, self.margin or stride))
        ):
            raise ValueError(
                f"{self!r}: the strides must divide the largest, and the margin and the "
                "core sides must be multiples of it (cores positive)."
            )

    @property
    def stride(self) -> int:
        """The deepest layer's total stride: tile origins are multiples of it."""
        return max(self.strides)

    @classmethod
    def for_budget(cls, strides: tuple[int, ...], margin: int, budget: int) -> TilePlan:
        """The plan with the largest square core whose tiles, margins included, fit ``budget``.

        Parameters
        ----------
        strides : tuple of int
            As for the class, e.g. from :func:`receptive_margin`.
        margin : int
            As for the class.
        budget : int
            Pixels of one tile (core and margins), e.g. ``PIXEL_BUDGET``.

        Raises
        ------
        ValueError
            If not even a core of one stride fits inside its margins.
        """
        stride = max(strides)
        # A tile is at most its core, two margins and the stride - 1 px of :meth:`spans`.
        side = (math.isqrt(budget) - 2 * margin - stride + 1) // stride * stride
        if side < stride:
            least = (2 * stride + 2 * margin - 1) ** 2
            raise ValueError(
                f"A tile of {budget} pixels leaves no core inside margins of {margin} px "
                f"(the layers' receptive field); allow at least {least}."
            )
        return cls(tuple(strides), margin, (side, side))

    def spans(self, length: int, axis: int) -> list[_Span]:
        """The tiles along an axis (0: height, 1: width) of ``length`` pixels, in order.

        A span's input is its core and the margins inside the image. One that stops
        before the image's end is lengthened by ``length % stride``, so that its size
        is congruent to the image's modulo the stride.

        Parameters
        ----------
        length : int
            Pixels of the image along the axis.
        axis : int
            0 for the height, 1 for the width.

        Returns
        -------
        spans : list of _Span
            The tiles' cores and inputs, in order.
        """
        core, stride = self.core[axis], self.stride
        spans = []
        for core_start in range(0, length, core):
            core_stop = min(core_start + core, length)
            stop = core_stop + self.margin
            stop = length if stop >= length else stop + length % stride
            spans.append(_Span(core_start, core_stop, max(core_start - self.margin, 0), stop))
        return spans


def tiled_layer_maps(
    backbone: Backbone, pixels: torch.Tensor, plan: TilePlan
) -> list[torch.Tensor]:
    """The backbone's layer outputs for ``pixels``, computed tile by tile and stitched.

    Equal to ``backbone(pixels)`` to float32 rounding when ``plan`` comes from
    :func:`receptive_margin` for this backbone; an image within one core runs whole.
    Nothing is stored between calls: any number of threads may run it at once.

    Parameters
    ----------
    backbone : callable
        Pixels ``(B, C, H, W)`` -> its layers' outputs ``[(B, F_k, h_k, w_k), ...]``.
    pixels : Tensor of shape (B, C, H, W)
        The backbone's input (normalised).
    plan : TilePlan
        The tiles.

    Returns
    -------
    layer_maps : list of Tensor of shape (B, F_k, h_k, w_k)
        Channels last, on the outputs' device and dtype.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sk_padim.core.tiling import TilePlan, receptive_margin, tiled_layer_maps
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 1))
    >>> def backbone(x):
    ...     return [net(x)]
    >>> strides, margin = receptive_margin(backbone)
    >>> strides, margin
    ((4,), 8)
    >>> plan = TilePlan(strides, margin, core=(16, 16))
    >>> pixels = torch.randn(1, 3, 50, 70)
    >>> with torch.no_grad():
    ...     tiled, whole = tiled_layer_maps(backbone, pixels, plan)[0], backbone(pixels)[0]
    >>> bool(torch.allclose(tiled, whole, atol=1e-6))
    True
    """
    height, width = pixels.shape[-2:]
    rows, columns = plan.spans(height, axis=0), plan.spans(width, axis=1)
    if len(rows) == len(columns) == 1:
        return list(backbone(pixels))
    whole = None
    # The bottom-right tile first: the whole maps end where its outputs end.
    for row, column in reversed(list(itertools.product(rows, columns))):
        tile = pixels[:, :, row.start : row.stop, column.start : column.stop]
        outputs = backbone(tile.contiguous(memory_format=torch.channels_last))
        if whole is None:
            whole = [
                _whole_map(output, row, column, s)
                for output, s in zip(outputs, plan.strides, strict=True)
            ]
        for output, target, s in zip(outputs, whole, plan.strides, strict=True):
            into_rows, from_rows = _core_cells(row, height, s, target.shape[2])
            into_columns, from_columns = _core_cells(column, width, s, target.shape[3])
            target[:, :, into_rows, into_columns] = output[:, :, from_rows, from_columns]
    return whole


def _whole_map(output: torch.Tensor, row: _Span, column: _Span, stride: int) -> torch.Tensor:
    """An empty whole layer map, sized from the bottom-right tile's ``output``."""
    n_images, n_channels, height, width = output.shape
    shape = (n_images, n_channels, row.start // stride + height, column.start // stride + width)
    return torch.empty(
        shape, dtype=output.dtype, device=output.device, memory_format=torch.channels_last
    )


def _core_cells(span: _Span, length: int, stride: int, n_cells: int) -> tuple[slice, slice]:
    """The cells of a span's core: in the whole map, and in the tile's output."""
    first = span.core_start // stride
    last = span.core_stop // stride if span.core_stop < length else n_cells
    offset = span.start // stride
    return slice(first, last), slice(first - offset, last - offset)


def receptive_margin(backbone: Backbone, n_channels: int = 3) -> tuple[tuple[int, ...], int]:
    """Each layer's total stride and the tile margin the backbone's layers need.

    Measured on the backbone itself, by autograd on a random probe image: the input
    pixels on which one cell near the probe's centre depends are those where the
    gradient of that cell's outputs (all channels) is non-zero. The margin is the
    largest distance, over the layers, from a cell's own pixels to the pixels it
    depends on, rounded up to a multiple of the deepest stride, plus one stride for
    safety. The probe grows (256, 512, 1024 px) until that dependency lies inside it.
    The backbone's parameters are left untouched (no ``.grad`` is accumulated).

    Parameters
    ----------
    backbone : callable
        Pixels ``(B, C, H, W)`` -> its layers' outputs, differentiable.
    n_channels : int, default=3
        Channels of its input.

    Returns
    -------
    strides : tuple of int
        Pixels per cell of each layer.
    margin : int
        Pixels of overlap a tile needs on each side.

    Raises
    ------
    ValueError
        If a layer depends on pixels beyond the largest probe (whole-image pooling, as
        in squeeze-and-excitation blocks), if no gradient reaches the input, or if a
        layer's stride does not divide the deepest one's.
    """
    size = _FIRST_PROBE
    while True:
        measured = _measure(backbone, n_channels, size)
        if measured is not None:
            strides, need = measured
            stride = max(strides)
            return strides, -(-need // stride) * stride + stride
        if size >= _LARGEST_PROBE:
            raise ValueError(
                f"A cell of the backbone's layers depends on pixels more than {size // 2} px "
                "away (pooling over the whole image, e.g. squeeze-and-excitation blocks?), "
                "so tiles cannot reproduce the whole image's features. Pass tile_size=None "
                "to run whole images (activation memory then grows with their size), or "
                "use a backbone without global pooling (ResNets, efficientnet_lite0)."
            )
        size *= 2


def _measure(backbone: Backbone, n_channels: int, size: int) -> tuple[tuple[int, ...], int] | None:
    """``(strides, largest need in px)`` on a ``size`` px probe, None if it is too small.

    One backward pass: the cells of every layer that hold the probe's centre pixel,
    together; their own pixels span from the latest cell start to the earliest cell
    end, which makes the need measured from them an upper bound of each layer's.
    """
    parameter = next(iter(getattr(backbone, "parameters", lambda: iter(()))()), None)
    device = torch.device("cpu") if parameter is None else parameter.device
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, n_channels, size, size, generator=generator).to(device)
    probe.requires_grad_()
    centre = size // 2
    with torch.enable_grad():
        outputs = list(backbone(probe))
        strides = tuple(_stride(output, size) for output in outputs)
        cells = [
            output[:, :, centre // s, centre // s].sum()
            for output, s in zip(outputs, strides, strict=True)
        ]
        try:
            (gradient,) = torch.autograd.grad(sum(cells), probe)
        except RuntimeError as error:
            raise _no_gradient(error) from error
    if any(max(strides) % stride for stride in strides):
        raise ValueError(
            f"The layers' strides {strides} do not all divide the deepest one, so no tile "
            "origin aligns every layer's grid; pass tile_size=None."
        )
    magnitude = gradient.abs().sum(dim=(0, 1))
    rows = torch.nonzero(magnitude.sum(dim=1)).flatten().tolist()
    columns = torch.nonzero(magnitude.sum(dim=0)).flatten().tolist()
    if not rows:
        raise _no_gradient("the gradient is zero")
    if 0 in (rows[0], columns[0]) or size - 1 in (rows[-1], columns[-1]):
        return None
    own_start = max(centre // s * s for s in strides)
    own_stop = min((centre // s + 1) * s - 1 for s in strides)
    needs = (
        own_start - rows[0],
        rows[-1] - own_stop,
        own_start - columns[0],
        columns[-1] - own_stop,
    )
    return strides, max(0, *needs)


def _stride(output: torch.Tensor, size: int) -> int:
    if output.ndim != 4 or output.shape[2] != output.shape[3] or size % output.shape[2]:
        raise ValueError(
            f"A layer maps a {size} x {size} px image to shape {tuple(output.shape)}, not a "
            "grid of whole cells (stride dividing the size); pass tile_size=None."
        )
    return size // output.shape[2]


def _no_gradient(cause) -> ValueError:
    return ValueError(
        f"Cannot measure the backbone's receptive field by autograd ({cause}); pass "
        "tile_size=None to run whole images."
    )
