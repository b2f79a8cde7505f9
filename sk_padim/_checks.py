"""Validation of evaluation inputs: labels, masks and anomaly scores (private).

The metrics, the threshold calibrator and the CV splitter all accept ``y`` as image
labels ``(n,)`` (0 = normal, 1 = anomalous) or pixel masks ``(n, H, W)``; this module
turns either form into what each of them needs and rejects anything else with a
message that says how to fix it. :func:`one_line` puts such a message on one line, as
the front reports it.
"""

import numbers

import numpy as np
from numpy.typing import ArrayLike, NDArray


def image_labels(y: ArrayLike) -> NDArray[np.bool_]:
    """Image labels ``(n,)`` from labels ``(n,)`` or masks ``(n, H, W)`` (``mask.any()``)."""
    if y is None:
        raise ValueError(
            "This requires y to be passed, but the target y is None: pass image labels "
            "of shape (n,) (1 = anomalous) or pixel masks of shape (n, H, W)."
        )
    y = np.asarray(y)
    if y.ndim == 1:
        return _as_bool(
            y,
            "Image labels",
            "With scikit-learn's +1 normal / -1 outlier convention, pass y == -1.",
        )
    if y.ndim == 3:
        return pixel_masks(y).reshape(len(y), -1).any(axis=1)
    raise ValueError(
        f"y must be image labels of shape (n,) or pixel masks of shape (n, H, W); "
        f"got an array of shape {y.shape}."
    )


def pixel_masks(y: ArrayLike, shape: tuple[int, ...] | None = None) -> NDArray[np.bool_]:
    """Boolean masks ``(n, H, W)``, resized with nearest interpolation to ``shape``.

    Masks of another ``(H, W)`` than ``shape = (n, H', W')`` take, at each output
    pixel, the mask pixel whose centre is nearest; an exact tie (the output centre on a
    border between mask pixels) goes to the later pixel. For integer scale factors this
    is what PIL's ``NEAREST`` and torch's ``nearest-exact`` give.
    """
    masks = np.asarray(y)
    if masks.ndim != 3:
        raise ValueError(
            f"Pixel masks of shape (n, H, W) are needed; got an array of shape {masks.shape}. "
            "Image labels (n,) suit image-level evaluation only."
        )
    masks = _as_bool(masks, "Pixel masks", "For 0/255 mask images, pass masks > 0.")
    if shape is None or masks.shape == tuple(shape):
        return masks
    if masks.shape[0] != shape[0]:
        raise ValueError(
            f"Masks of shape {masks.shape} do not match anomaly maps of shape {tuple(shape)}: "
            "both need one entry per image."
        )
    rows = _nearest_indices(masks.shape[1], shape[1])
    cols = _nearest_indices(masks.shape[2], shape[2])
    return masks[:, rows[:, None], cols[None, :]]


def check_image_scores(scores: ArrayLike, n_images: int) -> NDArray:
    """Image anomaly scores as an ``(n_images,)`` array without NaN."""
    scores = np.asarray(scores)
    if scores.shape != (n_images,):
        raise ValueError(
            f"Image scores must have shape ({n_images},), one per image of the ground "
            f"truth; got {scores.shape}."
        )
    _check_no_nan(scores, "Image scores")
    return scores


def check_maps(maps: ArrayLike) -> NDArray:
    """Pixel anomaly maps as an ``(n, H, W)`` array without NaN."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"Anomaly maps must have shape (n, H, W); got {maps.shape}.")
    _check_no_nan(maps, "Anomaly maps")
    return maps


def truth_and_scores(y: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.bool_], NDArray]:
    """Ground truth at the level of ``scores``: image labels for ``(n,)`` scores, pixel
    masks (resized to the maps) for ``(n, H, W)`` maps."""
    scores = np.asarray(scores)
    if scores.ndim == 3:
        maps = check_maps(scores)
        return pixel_masks(y, maps.shape), maps
    labels = image_labels(y)
    return labels, check_image_scores(scores, labels.size)


def check_both_classes(truth: NDArray[np.bool_], what: str) -> None:
    """Raise if the boolean ground truth holds a single class."""
    if truth.all() or not truth.any():
        found = "anomalous" if truth.all() else "normal"
        raise ValueError(
            f"{what} is undefined: the ground truth holds only {found} samples. Use data "
            "with both normal and anomalous images (or pixels)."
        )


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an ``int``; a ``ValueError`` naming ``name`` unless it is an integer
    (not a bool) from ``low`` to ``high`` (no upper bound when None)."""
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not valid or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}; got {value!r}.")
    return int(value)


def one_line(message: object, limit: int | None = None) -> str:
    """A message on one line: its whitespace runs as single spaces, cut at ``limit``.

    The front (the command line, the export) reports errors and warnings with it.

    Parameters
    ----------
    message : object
        An exception, a warning or text; its ``str`` is taken.
    limit : int, default=None
        The most characters kept, ``...`` ending a cut message; None keeps all.

    Returns
    -------
    line : str

    Examples
    --------
    >>> from sk_padim._checks import one_line
    >>> one_line(ValueError("Bad input:\\n  see   the docs"))
    'Bad input: see the docs'
    >>> one_line("x" * 10, limit=5)
    'xx...'
    """
    line = " ".join(str(message).split())
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."


def _as_bool(values: NDArray, name: str, fix: str) -> NDArray[np.bool_]:
    """``values`` as booleans, refusing anything but 0/1 (or bool)."""
    if values.dtype == bool:
        return values
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 or boolean; got dtype {values.dtype}.")
    unexpected = np.setdiff1d(np.unique(values), [0, 1])
    if unexpected.size:
        raise ValueError(
            f"{name} must hold only 0 (normal) and 1 (anomalous); got the values "
            f"{unexpected[:5].tolist()}. {fix}"
        )
    return values.astype(bool)


def _check_no_nan(scores: NDArray, name: str) -> None:
    if np.isnan(scores).any():
        raise ValueError(
            f"{name} contain NaN, so they cannot be ranked; check the estimator's fit "
            "(e.g. features holding NaN, or too few training images)."
        )


def _nearest_indices(size_in: int, size_out: int) -> NDArray[np.intp]:
    """Index of the input pixel whose centre is nearest each output pixel's centre.

    That is ``floor((i + 1/2) * size_in / size_out)``, in exact integer arithmetic.
    """
    return (2 * np.arange(size_out) + 1) * size_in // (2 * size_out)


def normal_rows(y: ArrayLike, n_samples: int) -> NDArray[np.bool_]:
    """The rows of ``n_samples`` images that ``y`` (labels or masks) says are normal.

    Raises a ``ValueError`` when ``y`` has another number of entries or no normal image.
    """
    anomalous = image_labels(y)
    if len(anomalous) != n_samples:
        raise ValueError(f"y has {len(anomalous)} entries but X has {n_samples} images.")
    if anomalous.all():
        raise ValueError("Every image in y is anomalous; fit needs normal images (label 0).")
    return ~anomalous
