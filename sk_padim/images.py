"""Turn user images (arrays, file paths, PIL images) into normalised float batches.

Accepted inputs, checked before any work is done:

- a NumPy array ``(n, H, W)`` (grey), ``(n, H, W, 1)`` (grey) or ``(n, H, W, 3)`` (RGB);
- a list of such single images ``(H, W)`` / ``(H, W, 1)`` / ``(H, W, 3)``, sizes may differ;
- a list of file paths (``str`` or ``os.PathLike``) or of PIL images.

Pixel values are ``uint8``-range integers 0-255 or floats in [0, 1]; anything else is an
error rather than a silent rescale. Grey images are repeated to three channels. RGBA
arrays are refused (drop or composite the alpha channel first); files and PIL images are
converted with PIL's ``convert("RGB")``, which drops an alpha channel.

Files and PIL images with more than 8 bits per pixel (PIL modes ``I;16``, ``I`` and
``F``: 16-bit PNGs and TIFFs, float TIFFs) go through the same value check as arrays
(integers 0-255, floats in [0, 1]) instead of PIL's conversion, which would clip or
truncate them silently. An array of shape ``(n, H, 3)`` or ``(n, H, 4)`` is refused as
ambiguous: it is almost always one colour image missing its batch axis (pass
``X[None]``); grey images that narrow can be passed as ``(n, H, W, 1)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _is_path(item: object) -> bool:
    return isinstance(item, (str, os.PathLike))


def check_images(X) -> np.ndarray | list:
    """Validate an image collection and return it as an array or a list.

    Parameters
    ----------
    X : array-like or list
        See the module docstring for the accepted forms.

    Returns
    -------
    images : ndarray of shape (n, H, W[, C]) or list
        The same images, as one array when ``X`` was an array, otherwise a list.
    """
    if isinstance(X, np.ndarray):
        if X.ndim not in (3, 4):
            fix = (
                "Wrap a single image as X[None]."
                if X.ndim == 2
                else "Remove extra axes of size 1 with X.squeeze(), or pass a list of images."
            )
            raise ValueError(
                f"An image array must have shape (n, H, W) or (n, H, W, C); got {X.ndim} "
                f"dimensions with shape {X.shape}. {fix}"
            )
        if len(X) == 0:
            raise ValueError("Got an empty image array; pass at least one image.")
        if X.ndim == 3 and X.shape[2] in (3, 4):
            raise ValueError(
                f"An image array of shape {X.shape} reads as {X.shape[0]} grey images "
                f"{X.shape[2]} pixels wide; if it is one {'RGBA' if X.shape[2] == 4 else 'RGB'} "
                "image (H, W, C), pass X[None]. Grey images that narrow must be passed "
                "as (n, H, W, 1)."
            )
        _check_size(X.shape[1:3], "the image array")
        _check_channels(X.shape[3] if X.ndim == 4 else 1, "the image array", X.shape[1])
        _check_pixels(X, "the image array")
        return X
    if isinstance(X, (str, os.PathLike)) or not isinstance(X, Sequence):
        raise TypeError(
            "X must be a NumPy array of images or a list of images, file paths or PIL "
            f"images; got {type(X).__name__}. Wrap a single path as [path]."
        )
    items = list(X)
    if not items:
        raise ValueError("Got an empty list of images; pass at least one image.")
    kinds = {
        "path" if _is_path(i) else "pil" if isinstance(i, Image.Image) else "array" for i in items
    }
    if len(kinds) > 1:
        raise TypeError(
            f"X mixes {' and '.join(sorted(kinds))} items; pass a list of one kind only."
        )
    if kinds == {"array"}:
        for index, item in enumerate(items):
            _check_single_array(np.asarray(item), index)
    if kinds == {"path"}:
        for path in items:
            if os.path.isdir(path):
                raise FileNotFoundError(
                    f"{os.fspath(path)!r} is a directory, not an image file; pass the files "
                    "in it, e.g. sorted(pathlib.Path(folder).glob('*.png'))."
                )
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Image file not found: {os.fspath(path)!r}.")
    return items


def _check_single_array(image: np.ndarray, index: int) -> None:
    if image.ndim not in (2, 3):
        raise ValueError(
            f"Image {index} has shape {image.shape}; each image must be (H, W) or (H, W, C)."
        )
    _check_size(image.shape[:2], f"image {index}")
    _check_channels(image.shape[2] if image.ndim == 3 else 1, f"image {index}", image.shape[0])
    _check_pixels(image, f"image {index}")


def _check_size(height_width: tuple[int, ...], what: str) -> None:
    if min(height_width) < 1:
        raise ValueError(
            f"{what} has height x width {tuple(height_width)}; every image needs at least "
            "one pixel. Drop empty images (e.g. a crop outside the picture)."
        )


def _check_channels(n_channels: int, what: str, first_axis: int | None = None) -> None:
    """``first_axis``: the size of the axis before H, to recognise channels-first layouts."""
    if n_channels not in (1, 3):
        if n_channels == 4:
            hint = " (RGBA: drop the alpha channel with X[..., :3])"
        elif first_axis in (1, 3, 4):
            hint = (
                f" (channels-first? images must be channels-last: move the axis of size "
                f"{first_axis} to the end, e.g. np.moveaxis(X, -3, -1))"
            )
        else:
            hint = ""
        raise ValueError(f"{what} has {n_channels} channels; expected 1 or 3{hint}.")


def _check_pixels(values: np.ndarray, what: str) -> None:
    if values.dtype == np.bool_ or not (
        np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    ):
        raise TypeError(
            f"{what} has dtype {values.dtype}; use uint8 (0-255) or float (0-1) pixels."
        )
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all():
            raise ValueError(
                f"{what} contains NaN or infinite pixel values; fix or drop those images "
                "(nothing is clipped or filled in silently)."
            )
        low, high, expected = values.min(), values.max(), "[0, 1]"
        bad = low < 0 or high > 1
        fix = "divide 0-255 images by 255"
        if low < 0:
            fix = "pass raw pixels, not normalised ones (sk-padim normalises itself), or " + fix
    else:
        low, high, expected = values.min(), values.max(), "0-255"
        bad = low < 0 or high > 255
        fix = (
            "rescale to 8 bits, e.g. (X >> 8).astype(np.uint8) for 16-bit data, or pass "
            "floats in [0, 1], e.g. X / 65535"
        )
    if bad:
        raise ValueError(
            f"{what} has pixel values in [{low}, {high}], outside the expected {expected} "
            f"for {values.dtype} images; {fix}."
        )


def _array_to_tensor(image: np.ndarray, has_channel_axis: bool) -> torch.Tensor:
    """(..., H, W[, C]) pixels -> float tensor (..., 3, H, W) in [0, 1]."""
    scale = 1.0 if np.issubdtype(image.dtype, np.floating) else 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32) / scale
    if not has_channel_axis:
        tensor = tensor.unsqueeze(-1)
    tensor = tensor.movedim(-1, -3)
    return tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:])


# PIL modes with more than 8 bits per pixel; ``convert("RGB")`` clips or truncates them.
_WIDE_MODES = ("I", "F")


def _read_image(item) -> np.ndarray:
    """An RGB array ``(H, W, 3)`` (uint8 0-255, or float in [0, 1]) from a file or PIL image."""
    if isinstance(item, Image.Image):
        return _pil_to_rgb(item, "the PIL image")
    path = os.fspath(item)
    try:
        with Image.open(path) as image:
            return _pil_to_rgb(image, f"image file {path!r}")
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Image file {path!r} is refused as a possible decompression bomb ({error}). "
            "If you trust it, raise PIL.Image.MAX_IMAGE_PIXELS, or shrink the image."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"Cannot read image file {path!r}: {error}. The file is not an image PIL can "
            "decode, or it is truncated or corrupted; replace it or leave it out."
        ) from error


def _pil_to_rgb(image: Image.Image, what: str) -> np.ndarray:
    if not image.mode.startswith(_WIDE_MODES):
        return np.array(image.convert("RGB"))
    pixels = np.array(image)
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
    _check_pixels(pixels, f"{what} (PIL mode {image.mode})")
    if np.issubdtype(pixels.dtype, np.integer):
        pixels = pixels.astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1)


def _to_unit_tensor(item) -> torch.Tensor:
    if isinstance(item, Image.Image) or _is_path(item):
        image = _read_image(item)
    else:
        image = np.asarray(item)
    return _array_to_tensor(image, has_channel_axis=image.ndim == 3)


def _resize(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(batch.shape[-2:]) == size:
        return batch
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)


def iter_batches(
    images: np.ndarray | list,
    size: tuple[int, int],
    batch_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Iterator[torch.Tensor]:
    """Yield normalised float32 batches ``(b, 3, *size)`` from validated images.

    Images are decoded and resized one batch at a time, so memory holds two batches: a
    background thread prepares the next batch while the caller computes on this one
    (PIL's decoders and torch's kernels release the GIL), so that reading image files
    overlaps with the backbone. Resizing is bilinear with antialiasing (torchvision's
    ``Resize`` on tensors).
    """
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def load(start: int) -> torch.Tensor:
        chunk = images[start : start + batch_size]
        if isinstance(chunk, np.ndarray):
            batch = _resize(_array_to_tensor(chunk, has_channel_axis=chunk.ndim == 4), size)
        else:
            batch = torch.cat([_resize(_to_unit_tensor(item)[None], size) for item in chunk])
        return (batch - mean_t) / std_t

    starts = range(0, len(images), batch_size)
    if not starts:
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, starts[0])
        for start in starts[1:]:
            ready, pending = pending, pool.submit(load, start)
            yield ready.result()
        yield pending.result()
