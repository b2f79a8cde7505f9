"""Synthetic defect datasets: textures with painted defects, in memory.

:func:`make_defect_textures` crops small images of three textures (brick, grass,
gravel) with four kinds of painted defects and their masks;
:func:`make_high_resolution_textures` makes large mosaics with small defects.
:func:`sk_padim.datasets.write_mvtec_layout` writes either in the MVTec AD layout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from functools import partial

import numpy as np
from scipy import ndimage
from skimage import data as skimage_data
from sklearn.utils import Bunch, check_random_state

from sk_padim._checks import check_int
from sk_padim.core.images import size_pair

__all__ = ["make_defect_textures", "make_high_resolution_textures"]

_GOOD = "good"
_TEXTURES = ("brick", "grass", "gravel")
_DEFECT_KINDS = ("hole", "patch", "scratch", "stain")
# Test crops come from the right-hand strip of each 512 x 512 photograph, training
# crops from the rest, so no training pixel is ever seen at test time.
_TEST_STRIP_FRACTION = 3 / 8
_MIN_IMAGE_SIZE = 32
_MAX_IMAGE_SIZE = 256  # largest size whose train and test strips stay disjoint
# High-resolution images are mosaics of square crops of this side; it fits in the
# test strip (192 columns of a 512-px photograph) and in every feature stride.
_BLOCK = 128
# Median extent (longer side of the mask's bounding box) of each painter's defect, as a
# fraction of the side of the crop it paints in: a defect of extent s is painted in a
# crop of side s / fraction.
_EXTENT_FRACTION = {"hole": 0.25, "patch": 0.42, "scratch": 0.45, "stain": 0.33}
_MIN_DEFECT_SIZE = 2


def make_defect_textures(
    categories: str | Iterable[str] = _TEXTURES,
    *,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defective: int = 20,
    defect_kinds: str | Iterable[str] = _DEFECT_KINDS,
    random_state: int | np.random.RandomState | None = None,
) -> Bunch:
    """Make the built-in anomaly detection dataset from real texture photographs.

    Each category is one of the greyscale 512 x 512 texture photographs that ship
    with scikit-image (``skimage.data.brick``, ``grass`` and ``gravel``; no
    download). Normal images are random square crops, repeated to 3 RGB channels.
    Defective test images are crops with one synthetic defect each, with its exact
    pixel mask:

    - ``"scratch"``: a thin (1-3 px) bright or dark curved line;
    - ``"stain"``: a smooth elliptical brightening or darkening;
    - ``"patch"``: a rotated rectangle pasted from another texture photograph;
    - ``"hole"``: a dark, irregular region of missing material.

    A defect changes only the pixels inside its mask. Training crops are cut from
    the left 5/8 of each photograph and test crops from the right 3/8, so no
    training pixel appears in a test image.

    Parameters
    ----------
    categories : str or iterable of str, default=("brick", "grass", "gravel")
        Texture photographs to use, each a category.
    image_size : int, default=128
        Side of the square images in pixels, from 32 to 256 (larger crops would
        make the training and test strips overlap).
    n_train : int, default=40
        Number of normal training images per category.
    n_test_good : int, default=10
        Number of normal test images per category.
    n_test_defective : int, default=20
        Number of defective test images per category, shared as evenly as possible
        among ``defect_kinds`` (the first kinds get one more when it does not
        divide).
    defect_kinds : str or iterable of str, default=("hole", "patch", "scratch", "stain")
        Kinds of synthetic defect to make.
    random_state : int, RandomState instance or None, default=None
        Controls the crops and the defects. Pass an int for reproducible output.

    Returns
    -------
    dataset : :class:`~sklearn.utils.Bunch`
        Maps each category name to a Bunch with attributes:

        X_train : ndarray of shape (n_train, image_size, image_size, 3), dtype uint8
            Normal training images.
        X_test : ndarray of shape (n_test, image_size, image_size, 3), dtype uint8
            Test images, ``n_test = n_test_good + n_test_defective``, sorted by
            defect type (as :func:`sk_padim.datasets.load_mvtec_ad` orders them).
        y_test : ndarray of shape (n_test,), dtype int
            0 for normal test images, 1 for defective ones.
        masks_test : ndarray of shape (n_test, image_size, image_size), dtype bool
            Defect masks; all False for normal images.
        defect_types_test : ndarray of shape (n_test,), dtype str
            ``"good"`` or the defect kind.
        origins_train, origins_test : ndarray of shape (n, 2), dtype int
            (row, column) of each crop's top-left corner in the photograph
            ``getattr(skimage.data, category)()``.

    Raises
    ------
    ValueError
        If a category or defect kind is unknown, a size or count is out of range, or
        no test image is asked for.

    See Also
    --------
    sk_padim.datasets.write_mvtec_layout : Write the dataset in the MVTec AD layout.

    Examples
    --------
    >>> from sk_padim.synthetic import make_defect_textures
    >>> dataset = make_defect_textures(random_state=0)
    >>> list(dataset)
    ['brick', 'grass', 'gravel']
    >>> brick = dataset.brick
    >>> brick.X_train.shape, brick.X_test.shape, brick.masks_test.shape
    ((40, 128, 128, 3), (30, 128, 128, 3), (30, 128, 128))
    >>> int(brick.y_test.sum())
    20
    """
    categories = _check_options("categories", categories, _TEXTURES)
    defect_kinds = _check_options("defect_kinds", defect_kinds, _DEFECT_KINDS)
    check_int(image_size, "image_size", _MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE)
    check_int(n_train, "n_train", 1)
    check_int(n_test_good, "n_test_good", 0)
    check_int(n_test_defective, "n_test_defective", 0)
    if n_test_good + n_test_defective == 0:
        raise ValueError("n_test_good and n_test_defective are both 0; ask for a test image.")
    rng = check_random_state(random_state)

    photos = {name: getattr(skimage_data, name)() for name in _TEXTURES}
    test_types = _test_types(n_test_good, n_test_defective, defect_kinds)
    dataset = Bunch()
    for name in categories:
        donors = [photo for other, photo in photos.items() if other != name]
        dataset[name] = _make_category(photos[name], donors, n_train, test_types, image_size, rng)
    return dataset


def _check_options(name: str, values: str | Iterable[str], valid: tuple[str, ...]) -> list[str]:
    values = list(dict.fromkeys([values] if isinstance(values, str) else values))
    unknown = [value for value in values if value not in valid]
    if unknown or not values:
        raise ValueError(
            f"{name} must be a non-empty selection from {list(valid)}, got {values!r}."
        )
    return values


def _test_types(n_good: int, n_defective: int, kinds: list[str]) -> np.ndarray:
    """Defect type of each test image, sorted as the MVTec AD loader orders them."""
    counts = [len(part) for part in np.array_split(np.arange(n_defective), len(kinds))]
    return np.sort(np.repeat([_GOOD, *kinds], [n_good, *counts]))


def _make_category(
    photo: np.ndarray,
    donors: list[np.ndarray],
    n_train: int,
    test_types: np.ndarray,
    size: int,
    rng: np.random.RandomState,
) -> Bunch:
    width = photo.shape[1]
    test_start = width - max(size, round(width * _TEST_STRIP_FRACTION))
    origins_train = _random_origins(photo.shape[0], (0, test_start), size, n_train, rng)
    origins_test = _random_origins(photo.shape[0], (test_start, width), size, len(test_types), rng)

    painters = {
        "hole": _hole,
        "patch": partial(_patch, donors=donors),
        "scratch": _scratch,
        "stain": _stain,
    }
    X_test, masks_test = [], []
    for origin, kind in zip(origins_test, test_types, strict=True):
        clean = _crop(photo, origin, size)
        if kind == _GOOD:
            mask, values = np.zeros_like(clean, dtype=bool), clean
        else:
            mask, values = painters[kind](clean.astype(float), rng)
        X_test.append(np.where(mask, np.clip(np.rint(values), 0, 255), clean).astype(np.uint8))
        masks_test.append(mask)

    return Bunch(
        X_train=_to_rgb(np.stack([_crop(photo, origin, size) for origin in origins_train])),
        X_test=_to_rgb(np.stack(X_test)),
        y_test=(test_types != _GOOD).astype(int),
        masks_test=np.stack(masks_test),
        defect_types_test=test_types,
        origins_train=origins_train,
        origins_test=origins_test,
    )


def _random_origins(
    height: int, columns: tuple[int, int], size: int, n: int, rng: np.random.RandomState
) -> np.ndarray:
    """Top-left corners of ``n`` crops lying inside the given column range."""
    rows = rng.randint(0, height - size + 1, size=n)
    cols = rng.randint(columns[0], columns[1] - size + 1, size=n)
    return np.column_stack([rows, cols])


def _crop(photo: np.ndarray, origin: np.ndarray, size: int) -> np.ndarray:
    row, col = origin
    return photo[row : row + size, col : col + size]


def _to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., np.newaxis], 3, axis=-1)


# Each painter takes a clean float crop and returns (mask, values): the defective
# image is ``values`` inside the mask and the clean crop everywhere else.


def _scratch(clean: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    start = rng.uniform(0.15, 0.85, size=2) * (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.7) * size
    direction = np.array([np.sin(angle), np.cos(angle)])
    end = start + length * direction
    bend = rng.uniform(-0.15, 0.15) * length * np.array([-direction[1], direction[0]])
    control = (start + end) / 2 + bend
    t = np.linspace(0, 1, int(2 * length) + 2)[:, np.newaxis]  # steps under 1 pixel
    points = np.rint((1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end).astype(int)
    points = points[((points >= 0) & (points < size)).all(axis=1)]
    centre_line = np.zeros(clean.shape, dtype=bool)
    centre_line[points[:, 0], points[:, 1]] = True
    mask = ndimage.distance_transform_edt(~centre_line) <= rng.uniform(0.5, 1.5)
    target = 235.0 if rng.rand() < 0.5 else 20.0
    return mask, clean + rng.uniform(0.6, 0.9) * (target - clean)


def _stain(clean: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    u, v = _ellipse_frame(clean.shape[0], (0.08, 0.22), rng)
    radius2 = u**2 + v**2
    amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(35, 70)
    return radius2 < 1, clean + amplitude * (1 - 0.6 * radius2)


def _patch(
    clean: np.ndarray, rng: np.random.RandomState, donors: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    u, v = _ellipse_frame(size, (0.1, 0.22), rng)
    donor = donors[rng.randint(len(donors))]
    origin = rng.randint(0, np.array(donor.shape) - size + 1)
    return np.maximum(np.abs(u), np.abs(v)) < 1, _crop(donor, origin, size).astype(float)


def _hole(clean: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    u, v = _ellipse_frame(clean.shape[0], (0.06, 0.18), rng)
    harmonics = np.arange(2, 5)[:, np.newaxis, np.newaxis]
    amplitudes = rng.uniform(0, 0.12, size=(3, 1, 1))
    phases = rng.uniform(0, 2 * np.pi, size=(3, 1, 1))
    rim = 1 + (amplitudes * np.cos(harmonics * np.arctan2(v, u) + phases)).sum(axis=0)
    depth = np.hypot(u, v) / rim  # 0 at the centre, 1 on the irregular rim
    floor = rng.uniform(10, 30)
    return depth < 1, floor + 25 * depth**2 + rng.normal(0, 2, size=clean.shape)


def _ellipse_frame(
    size: int, axis_range: tuple[float, float], rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a random ellipse's frame: the ellipse is ``u**2 + v**2 < 1``.

    Its centre lies inside the image, so the ellipse covers at least one pixel.
    """
    centre = rng.uniform(0.2, 0.8, size=2) * (size - 1)
    semi_axes = rng.uniform(*axis_range, size=2) * size
    angle = rng.uniform(0, np.pi)
    rows, cols = np.mgrid[:size, :size]
    dy, dx = rows - centre[0], cols - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / semi_axes[0]
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / semi_axes[1]
    return u, v


# ------------------------------------------------------- high-resolution textures


def make_high_resolution_textures(
    category: str = "brick",
    *,
    image_size: int | tuple[int, int] = (2048, 2048),
    n_train: int = 16,
    n_test_good: int = 4,
    n_test_defective: int = 12,
    defect_size: tuple[int, int] = (4, 9),
    defect_kinds: str | Iterable[str] = _DEFECT_KINDS,
    random_state: int | np.random.RandomState | None = None,
) -> Bunch:
    """Make high-resolution images with small defects from a real texture photograph.

    The images are larger than the 512 x 512 greyscale photograph they come from
    (``skimage.data.brick``, ``grass`` or ``gravel``; no download): each is a mosaic of
    128 x 128 crops of the photograph at its own pixel scale, so the texture keeps its
    real fine detail at any size. Each crop is taken at a random place, turned by a
    random multiple of 90 degrees and mirrored at random; the mosaic's grid is the same
    in every image (crop ``(a, b)`` covers rows ``128 a`` to ``128 (a + 1)`` and columns
    ``128 b`` to ``128 (b + 1)``, cut at the image's border), like a part whose layout
    repeats. Training crops come from the left 5/8 of the photograph, test crops from
    the right 3/8, so no training pixel appears in a test image.

    Each defective test image holds one small defect of the kinds of
    :func:`make_defect_textures`, whose extent (the longer side of its mask's bounding
    box) lies in ``defect_size``: scratches a few pixels long and 1-3 px wide, stains,
    patches of another photograph and holes. A defect changes only the pixels inside
    its mask.

    Parameters
    ----------
    category : {"brick", "grass", "gravel"}, default="brick"
        The texture photograph.
    image_size : int or (int, int), default=(2048, 2048)
        ``(height, width)`` of the images in pixels (an int for a square), each at least
        32 and at least the crop a defect is painted in (about 4 times ``defect_size``'s
        upper end).
    n_train : int, default=16
        Number of normal training images.
    n_test_good : int, default=4
        Number of normal test images.
    n_test_defective : int, default=12
        Number of defective test images, shared as evenly as possible among
        ``defect_kinds`` (the first kinds get one more when it does not divide).
    defect_size : (int, int), default=(4, 9)
        Smallest and largest extent of a defect in pixels, from 2 up.
    defect_kinds : str or iterable of str, default=("hole", "patch", "scratch", "stain")
        Kinds of defect to make.
    random_state : int, RandomState instance or None, default=None
        Controls the mosaics and the defects. Pass an int for reproducible output.

    Returns
    -------
    dataset : :class:`~sklearn.utils.Bunch`
        Dictionary-like object with attributes:

        X_train : ndarray of shape (n_train, height, width, 3), dtype uint8
            Normal training images (grey, repeated to 3 RGB channels).
        X_test : ndarray of shape (n_test, height, width, 3), dtype uint8
            Test images, ``n_test = n_test_good + n_test_defective``, sorted by
            defect type (as :func:`sk_padim.datasets.load_mvtec_ad` orders them).
        y_test : ndarray of shape (n_test,), dtype int
            0 for normal test images, 1 for defective ones.
        masks_test : ndarray of shape (n_test, height, width), dtype bool
            Defect masks; all False for normal images.
        defect_types_test : ndarray of shape (n_test,), dtype str
            ``"good"`` or the defect kind.
        tiles_train, tiles_test : ndarray of shape (n, rows, columns, 4), dtype int
            For each image and crop ``(a, b)`` of its mosaic: ``(row, column, turns,
            mirrored)``. The crop is ``photo[row:row + 128, column:column + 128]``
            (``photo = getattr(skimage.data, category)()``) passed through
            ``np.rot90(crop, turns)``, then mirrored left-right if ``mirrored`` is 1.

    Raises
    ------
    ValueError
        If the category or a defect kind is unknown, a size or count is out of range,
        or no test image is asked for.

    See Also
    --------
    make_defect_textures : Small images (up to 256 px) with defects of any size.
    sk_padim.datasets.write_mvtec_layout : Write images as files (``{category: dataset}``).

    Examples
    --------
    >>> from sk_padim.synthetic import make_high_resolution_textures
    >>> data = make_high_resolution_textures(
    ...     "gravel", image_size=(300, 500), n_train=2, n_test_good=1,
    ...     n_test_defective=2, random_state=0)
    >>> data.X_train.shape, data.X_test.shape, data.masks_test.shape
    ((2, 300, 500, 3), (3, 300, 500, 3), (3, 300, 500))
    >>> data.defect_types_test.tolist()
    ['good', 'hole', 'patch']
    >>> data.tiles_train.shape  # a grid of 3 x 4 crops of 128 px
    (2, 3, 4, 4)
    """
    if category not in _TEXTURES:
        raise ValueError(f"category must be one of {list(_TEXTURES)}, got {category!r}.")
    defect_kinds = _check_options("defect_kinds", defect_kinds, _DEFECT_KINDS)
    shape = size_pair(image_size, "image_size")
    check_int(n_train, "n_train", 1)
    check_int(n_test_good, "n_test_good", 0)
    check_int(n_test_defective, "n_test_defective", 0)
    if n_test_good + n_test_defective == 0:
        raise ValueError("n_test_good and n_test_defective are both 0; ask for a test image.")
    _check_defect_size(defect_size, shape, defect_kinds)
    rng = check_random_state(random_state)

    photos = {name: getattr(skimage_data, name)() for name in _TEXTURES}
    photo = photos.pop(category)
    width = photo.shape[1]
    test_start = width - round(width * _TEST_STRIP_FRACTION)
    X_train, tiles_train = _mosaics(photo, n_train, shape, (0, test_start), rng)
    test_types = _test_types(n_test_good, n_test_defective, defect_kinds)
    X_test, tiles_test = _mosaics(photo, len(test_types), shape, (test_start, width), rng)

    painters = {
        "hole": _hole,
        "patch": partial(_patch, donors=list(photos.values())),
        "scratch": _scratch,
        "stain": _stain,
    }
    masks_test = np.zeros(X_test.shape[:3], dtype=bool)
    for image, mask, kind in zip(X_test, masks_test, test_types, strict=True):
        if kind != _GOOD:
            _paint_small_defect(image, mask, painters[kind], kind, defect_size, rng)
    return Bunch(
        X_train=X_train,
        X_test=X_test,
        y_test=(test_types != _GOOD).astype(int),
        masks_test=masks_test,
        defect_types_test=test_types,
        tiles_train=tiles_train,
        tiles_test=tiles_test,
    )


def _check_defect_size(
    defect_size: tuple[int, int], shape: tuple[int, int], kinds: list[str]
) -> None:
    valid = (
        isinstance(defect_size, (tuple, list))
        and len(defect_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in defect_size)
        and _MIN_DEFECT_SIZE <= defect_size[0] <= defect_size[1]
    )
    if not valid:
        raise ValueError(
            f"defect_size must be (smallest, largest) ints with {_MIN_DEFECT_SIZE} <= "
            f"smallest <= largest, got {defect_size!r}."
        )
    needed = max(_MIN_IMAGE_SIZE, *(_defect_crop_side(defect_size[1], kind) for kind in kinds))
    if min(shape) < needed:
        raise ValueError(
            f"image_size={shape} is too small for defect_size={tuple(defect_size)}: "
            f"each side must be at least {needed} px; use a larger image_size or smaller "
            "defects."
        )


def _defect_crop_side(extent: int, kind: str) -> int:
    """Side of the crop a painter makes a defect of about ``extent`` pixels in."""
    return math.ceil(extent / _EXTENT_FRACTION[kind])


def _mosaics(
    photo: np.ndarray,
    n: int,
    shape: tuple[int, int],
    columns: tuple[int, int],
    rng: np.random.RandomState,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB mosaics of turned and mirrored crops from a column range; their tiles."""
    grid = (n, -(-shape[0] // _BLOCK), -(-shape[1] // _BLOCK))
    tiles = np.stack(
        [
            rng.randint(0, photo.shape[0] - _BLOCK + 1, size=grid),
            rng.randint(columns[0], columns[1] - _BLOCK + 1, size=grid),
            rng.randint(4, size=grid),
            rng.randint(2, size=grid),
        ],
        axis=-1,
    )
    images = np.empty((n, *shape, 3), dtype=np.uint8)
    grey = np.empty(shape, dtype=np.uint8)  # one image, then repeated to RGB at once
    for i in range(n):
        for a, b in np.ndindex(grid[1:]):
            row, col, turns, mirrored = tiles[i, a, b]
            block = np.rot90(_crop(photo, (row, col), _BLOCK), turns)
            if mirrored:
                block = block[:, ::-1]
            part = grey[a * _BLOCK : (a + 1) * _BLOCK, b * _BLOCK : (b + 1) * _BLOCK]
            part[...] = block[: part.shape[0], : part.shape[1]]
        images[i] = grey[..., np.newaxis]
    return images, tiles


def _paint_small_defect(
    image: np.ndarray,
    mask: np.ndarray,
    painter,
    kind: str,
    defect_size: tuple[int, int],
    rng: np.random.RandomState,
) -> None:
    """Paint one defect of an extent within ``defect_size`` into ``image`` and ``mask``.

    The painter works in a crop sized for a random extent; a defect whose extent falls
    outside the range is drawn again (about half of them).
    """
    smallest, largest = defect_size
    while True:
        side = _defect_crop_side(rng.randint(smallest, largest + 1), kind)
        top, left = rng.randint(0, np.array(image.shape[:2]) - side + 1)
        window = (slice(top, top + side), slice(left, left + side))
        clean = image[window][..., 0]
        window_mask, values = painter(clean.astype(float), rng)
        if smallest <= _extent(window_mask) <= largest:
            break
    painted = np.where(window_mask, np.clip(np.rint(values), 0, 255), clean)
    image[window] = painted.astype(np.uint8)[..., np.newaxis]
    mask[window] = window_mask


def _extent(mask: np.ndarray) -> int:
    """Longer side of the bounding box of a mask's True pixels (0 if there are none)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0
    return int(max(np.ptp(rows), np.ptp(cols))) + 1
