"""Turn user images (arrays, tensors, files, PIL images) into batches of pixels.

Accepted inputs, checked before any work is done:

- a NumPy array ``(n, H, W)`` (grey), ``(n, H, W, 1)`` (grey) or ``(n, H, W, 3)`` (RGB);
- a torch tensor ``(n, 3, H, W)`` or ``(n, 1, H, W)`` (channels first, as torchvision)
  or ``(n, H, W)``, on any device;
- a list of such single images ``(H, W)`` / ``(H, W, 1)`` / ``(H, W, 3)``, sizes may differ;
- a list of file paths (``str`` or ``os.PathLike``) or of PIL images;
- a folder: its image files, sorted (:func:`list_images`).

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "check_images",
    "image_sizes",
    "iter_batches",
    "list_images",
    "read_image",
    "size_pair",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")
"""File name suffixes read as images (any case) by :func:`list_images`."""


def _is_path(item: object) -> bool:
    return isinstance(item, (str, os.PathLike))


def check_images(X) -> np.ndarray | torch.Tensor | list:
    """Validate an image collection and return it as an array, a tensor or a list.

    Parameters
    ----------
    X : array-like, tensor, list or folder path
        See the module docstring for the accepted forms.

    Returns
    -------
    images : ndarray of shape (n, H, W[, C]), Tensor of shape (n, C, H, W) or list
        The same images: one array or tensor when ``X`` was one, otherwise a list (the
        sorted image files of a folder).
    """
    if isinstance(X, torch.Tensor):
        return _check_image_tensor(X)
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
    if isinstance(X, (str, os.PathLike)) and os.path.isdir(X):
        return list_images(X)
    if isinstance(X, (str, os.PathLike)):
        path = os.fspath(X)
        exists = os.path.exists(path)
        if not exists and not path.lower().endswith(IMAGE_SUFFIXES):
            raise FileNotFoundError(
                f"Folder not found: {path}. Pass a folder of images, a list of image files, "
                "or an array of images."
            )
        raise TypeError(
            f"X is a single path, {path!r}, not a folder"
            + ("" if exists else " (and no such file exists)")
            + ". Pass a folder of images or a list of image files: wrap a single path as "
            "[path]."
        )
    if isinstance(X, (str, os.PathLike)) or not isinstance(X, Sequence):
        raise TypeError(
            "X must be a NumPy array of images, a folder, or a list of images, file paths "
            f"or PIL images; got {type(X).__name__}. Wrap a single path as [path]."
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
                    f"{os.fspath(path)!r} is a directory, not an image file; pass the folder "
                    "itself as X, or its files: sk_padim.core.images.list_images(folder)."
                )
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Image file not found: {os.fspath(path)!r}.")
    return items


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """The image files in a folder, sorted by path.

    Files whose suffix is one of :data:`IMAGE_SUFFIXES` (any case) count as images;
    hidden files and folders (names starting with ``.``) are left out.

    Parameters
    ----------
    folder : str or path-like
        The folder to list.
    recursive : bool, default=False
        Also list the images in its sub-folders, at any depth.

    Returns
    -------
    paths : list of str
        The image files, sorted by their path below ``folder`` (so ``a/1.png`` comes
        before ``b/0.png``).

    Raises
    ------
    FileNotFoundError
        If ``folder`` is not a folder, or holds no image file.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from sk_padim.core.images import list_images
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "b").mkdir()
    >>> for name in ["b/0.png", "1.JPG", "notes.txt"]:
    ...     _ = (folder / name).write_bytes(b"")
    >>> [Path(path).name for path in list_images(folder)]
    ['1.JPG']
    >>> [Path(path).relative_to(folder).as_posix() for path in list_images(folder, True)]
    ['1.JPG', 'b/0.png']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder not found: {folder}.")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    paths = sorted(
        path
        for path in candidates
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )
    if not paths:
        where = f"{folder} or its sub-folders" if recursive else str(folder)
        raise FileNotFoundError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {where}.")
    return [str(path) for path in paths]


def _check_image_tensor(X: torch.Tensor) -> torch.Tensor:
    """Images as a tensor: ``(n, C, H, W)`` channels first (C = 1 or 3) or ``(n, H, W)``."""
    channels_first = X.ndim == 4 and X.shape[1] in (1, 3)
    if not (channels_first or X.ndim == 3):
        raise ValueError(
            f"An image tensor must have shape (n, 3, H, W), (n, 1, H, W) or (n, H, W) "
            f"(channels first, as torchvision); got {tuple(X.shape)}. For channels-last "
            "images use X.permute(0, 3, 1, 2), or pass a NumPy array."
        )
    if len(X) == 0 or min(X.shape[-2:]) < 1:
        raise ValueError(f"Got an image tensor of shape {tuple(X.shape)}; it holds no image.")
    if X.dtype != torch.uint8 and not X.dtype.is_floating_point:
        raise TypeError(f"An image tensor has dtype {X.dtype}; use uint8 (0-255) or float (0-1).")
    if X.dtype.is_floating_point:
        finite = bool(torch.isfinite(X).all())
        if not finite or X.min() < 0 or X.max() > 1:
            raise ValueError(
                "A float image tensor must hold finite pixel values in [0, 1]; divide 0-255 "
                "images by 255, and pass raw pixels, not normalised ones."
            )
    return X


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
        if what.startswith("image file"):  # a file: what to do with the files
            fix = (
                "sk-padim reads 8-bit images: convert the files to 8 bits per channel "
                "first, e.g. with ImageMagick: mogrify -depth 8 *.png (it rewrites the "
                "files: run it on a copy of the folder)"
            )
    if bad:
        raise ValueError(
            f"{what} has pixel values in [{low}, {high}], outside the expected {expected} "
            f"for {values.dtype} images; {fix}."
        )


def _array_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Pixels ``(n, H, W[, C])`` (checked) -> a tensor ``(n, C, H, W)`` of the same values.

    ``uint8`` and ``float32`` arrays are viewed channels-first without a copy; other
    integer dtypes (values 0-255, checked) become ``uint8``, other floats ``float32``.
    Read-only arrays (e.g. ``np.asarray(pil_image)``) and reversed views are copied, as
    torch cannot wrap them.
    """
    dtype = np.uint8 if np.issubdtype(images.dtype, np.integer) else np.float32
    negative_strides = any(stride < 0 for stride in images.strides)  # e.g. X[::-1]
    if images.dtype != dtype or not images.flags.writeable or negative_strides:
        images = images.astype(dtype)
    tensor = torch.from_numpy(images)
    return tensor.movedim(-1, -3) if images.ndim == 4 else tensor.unsqueeze(-3)


# PIL modes with more than 8 bits per pixel; ``convert("RGB")`` clips or truncates them.
_WIDE_MODES = ("I", "F")


def read_image(item) -> np.ndarray:
    """An RGB array ``(H, W, 3)`` (uint8 0-255, or float in [0, 1]) from a file or PIL image.

    Files and PIL images wider than 8 bits are checked, not clipped (module docstring);
    unreadable files raise a ValueError naming the file.

    Examples
    --------
    >>> from PIL import Image
    >>> from sk_padim.core.images import read_image
    >>> read_image(Image.new("L", (4, 3), 7)).shape
    (3, 4, 3)
    """
    if isinstance(item, Image.Image):
        return _pil_to_rgb(item, "the PIL image")
    path = os.fspath(item)
    with _opened(path) as image:
        return _pil_to_rgb(image, f"image file {path!r}")


def image_sizes(images: np.ndarray | torch.Tensor | list) -> list[tuple[int, int]]:
    """The ``(height, width)`` of each image of a checked collection, without decoding.

    Arrays and tensors give their shape; files give the size in their header (PIL opens
    them lazily: no pixel is decoded); lists of arrays or PIL images give each one's.

    Parameters
    ----------
    images : ndarray, Tensor or list
        Images as :func:`check_images` returns them.

    Returns
    -------
    sizes : list of (int, int)
        One ``(height, width)`` per image, in order.

    Raises
    ------
    ValueError
        If a file is not an image PIL can read (the file is named).

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from sk_padim.core.images import image_sizes
    >>> image_sizes(np.zeros((2, 30, 40, 3), np.uint8))
    [(30, 40), (30, 40)]
    >>> image_sizes([Image.new("RGB", (40, 30)), np.zeros((5, 6))])
    [(30, 40), (5, 6)]
    """
    if isinstance(images, np.ndarray):
        return [tuple(images.shape[1:3])] * len(images)
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[-2:])] * len(images)
    return [_image_size(item) for item in images]


def _image_size(item) -> tuple[int, int]:
    if _is_path(item):
        with _opened(os.fspath(item)) as image:
            width, height = image.size
    elif isinstance(item, Image.Image):
        width, height = item.size
    else:
        height, width = np.shape(item)[:2]
    return (int(height), int(width))


@contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """The image file opened lazily by PIL, its errors turned into ValueErrors naming it."""
    try:
        with Image.open(path) as image:
            yield image
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


def _to_tensor(item) -> torch.Tensor:
    """One image (file, PIL image or array) as a ``(1, C, H, W)`` tensor of its pixels."""
    image = read_image(item) if isinstance(item, Image.Image) or _is_path(item) else item
    return _array_to_tensor(np.asarray(image)[None])


def _as_unit_float(batch: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]."""
    if batch.dtype.is_floating_point:
        return batch.to(torch.float32)
    return batch.to(torch.float32) / 255


def _sized(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The batch at ``size``: unchanged if it is, else resized as float in [0, 1]."""
    if tuple(batch.shape[-2:]) == size:
        return batch
    unit = _as_unit_float(batch)
    return F.interpolate(unit, size=size, mode="bilinear", align_corners=False, antialias=True)


def _concatenate(parts: list[torch.Tensor]) -> torch.Tensor:
    """One batch of images whose dtype or channel count may differ."""
    if len({(part.dtype, part.shape[1]) for part in parts}) > 1:
        parts = [_as_unit_float(part).expand(-1, 3, -1, -1) for part in parts]
    return torch.cat(parts)


def iter_batches(
    images: np.ndarray | torch.Tensor | list,
    size: tuple[int, int],
    batch_size: int,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield batches of pixels ``(b, C, *size)``, C = 1 (grey) or 3 (RGB), channels first.

    A batch is ``uint8`` (0-255) where the images were ``uint8`` at ``size`` (for an
    array, a view of it: no copy), and float32 in [0, 1] otherwise; normalising and
    repeating grey channels is left to the device (see
    :meth:`sk_padim.core.embedding.PatchEmbedding.normalise`). Images are decoded and resized
    one batch at a time, so memory holds two batches: a background thread prepares the
    next batch while the caller computes on this one (PIL's decoders and torch's kernels
    release the GIL), so that reading image files overlaps with the backbone. Resizing
    is bilinear with antialiasing (torchvision's ``Resize`` on tensors). ``prepare``, when
    given, is applied to each batch in the background thread too (e.g. normalising for a
    CPU backbone, so that it overlaps with the backbone's work).
    """

    def load(start: int) -> torch.Tensor:
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            batch = _sized(chunk if chunk.ndim == 4 else chunk[:, None], size)
        elif isinstance(chunk, np.ndarray):
            batch = _sized(_array_to_tensor(chunk), size)
        else:
            batch = _concatenate([_sized(_to_tensor(item), size) for item in chunk])
        return batch if prepare is None else prepare(batch)

    starts = range(0, len(images), batch_size)
    if not starts:
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, starts[0])
        for start in starts[1:]:
            ready, pending = pending, pool.submit(load, start)
            yield ready.result()
        yield pending.result()


def size_pair(size, name: str) -> tuple[int, int]:
    """An ``int`` or ``(height, width)`` size parameter as ``(height, width)``, checked.

    Examples
    --------
    >>> from sk_padim.core.images import size_pair
    >>> size_pair(224, "image_size"), size_pair((64, 128), "map_size")
    ((224, 224), (64, 128))
    """
    if isinstance(size, Integral) and not isinstance(size, bool) and size > 0:
        return (int(size), int(size))
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, Integral) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{name} must be a positive int or (height, width); got {size!r}.")
