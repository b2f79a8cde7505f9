"""Anomaly detection metrics and scorers: image AUROC, pixel AUROC and AUPRO.

Every metric takes the ground truth first and the scores second, as
``sklearn.metrics`` does, with **higher scores meaning more anomalous**. Ground truth
may be image labels ``(n,)`` (0 = normal, 1 = anomalous) or pixel masks ``(n, H, W)``;
an image's label is ``mask.any()``. Masks of another ``(H, W)`` than the anomaly maps
are resized to the maps with nearest interpolation (each map pixel takes the mask pixel
whose centre is nearest, as PIL's ``NEAREST`` does for integer scale factors); nothing
else is resized or dropped.

The scorers ``image_auroc_scorer``, ``pixel_auroc_scorer`` and ``aupro_scorer`` have the
``scorer(estimator, X, y) -> float`` signature of scikit-learn's ``scoring`` argument.
"""

from numbers import Real

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.integrate import trapezoid

from sk_padim._checks import (
    check_both_classes,
    check_image_scores,
    check_maps,
    image_labels,
    pixel_masks,
)

__all__ = [
    "aupro",
    "aupro_scorer",
    "image_auroc",
    "image_auroc_scorer",
    "pixel_auroc",
    "pixel_auroc_scorer",
]


def image_auroc(y_true: ArrayLike, image_scores: ArrayLike) -> float:
    """Area under the ROC curve of image anomaly scores.

    Parameters
    ----------
    y_true : array-like of shape (n,) or (n, H, W)
        Image labels (1 = anomalous, 0 = normal) or pixel masks; a mask's image label is
        ``mask.any()``.
    image_scores : array-like of shape (n,)
        Image anomaly scores, higher = more anomalous (``PadimDetector.decision_function``).

    Returns
    -------
    float
        The probability that a random anomalous image scores above a random normal
        one, ties counting one half; equal to ``sklearn.metrics.roc_auc_score``.

    Raises
    ------
    ValueError
        If the lengths differ, the scores hold NaN, or ``y_true`` has only one class.

    Examples
    --------
    >>> from sk_padim.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    labels = image_labels(y_true)
    return _auroc(labels, check_image_scores(image_scores, labels.size))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """Area under the ROC curve of pixel anomaly scores over all pixels of all images.

    Exactly ``sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel())``, computed
    by sorting in O(N log N) for N pixels: five million pixels take about 0.1 s.

    Parameters
    ----------
    masks : array-like of shape (n, H, W)
        Ground-truth masks, 0/1 or boolean (1 = anomalous pixel). Masks of another
        ``(H, W)`` than ``maps`` are resized to the maps with nearest interpolation.
    maps : array-like of shape (n, H', W')
        Pixel anomaly maps, higher = more anomalous (``PadimDetector.score_samples``).

    Returns
    -------
    float
        Pixel-level AUROC.

    Raises
    ------
    ValueError
        If the shapes do not match, the maps hold NaN, or all pixels have one class.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.metrics import pixel_auroc
    >>> masks = np.zeros((1, 2, 2), dtype=bool)
    >>> masks[0, 0, 0] = True
    >>> maps = np.array([[[0.9, 0.2], [0.5, 0.95]]])
    >>> round(pixel_auroc(masks, maps), 4)
    0.6667
    """
    maps = check_maps(maps)
    masks = pixel_masks(masks, maps.shape)
    return _auroc(masks.ravel(), maps.ravel())


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve, as in MVTec AD.

    Each ground-truth mask is split into connected regions (8-connectivity, never
    across images). At a threshold ``t`` the overlap of a region is the fraction of its
    pixels with a score ``>= t``; the PRO is the mean overlap over all regions of all
    images, so a small defect counts as much as a large one. The false positive rate is
    the fraction of normal pixels (outside every mask) scoring ``>= t``. The PRO-vs-FPR
    curve, one point per distinct score plus (0, 0) and (1, 1), is integrated with the
    trapezoidal rule from FPR 0 to ``fpr_limit`` (interpolating linearly at the limit)
    and divided by ``fpr_limit``, as the MVTec AD evaluation code does.

    Parameters
    ----------
    masks : array-like of shape (n, H, W)
        Ground-truth masks, 0/1 or boolean. Masks of another ``(H, W)`` than ``maps``
        are resized to the maps with nearest interpolation.
    maps : array-like of shape (n, H', W')
        Pixel anomaly maps, higher = more anomalous.
    fpr_limit : float, default=0.3
        Upper FPR limit of the integration, in (0, 1].

    Returns
    -------
    float
        AUPRO in [0, 1]; 1 means every region is fully found before any normal pixel.

    Raises
    ------
    ValueError
        If the shapes do not match, the maps hold NaN, ``fpr_limit`` is outside (0, 1],
        or the masks hold no anomalous region or no normal pixel.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.metrics import aupro
    >>> masks = np.zeros((1, 4, 4), dtype=bool)
    >>> masks[0, :2, :2] = True
    >>> maps = masks + np.linspace(0, 0.5, 16).reshape(1, 4, 4)
    >>> aupro(masks, maps)
    1.0
    """
    if not isinstance(fpr_limit, Real) or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be a float in (0, 1]; got {fpr_limit!r}.")
    maps = check_maps(maps)
    masks = pixel_masks(masks, maps.shape)
    fpr, pro = _pro_curve(masks, maps)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def image_auroc_scorer(estimator, X, y: ArrayLike) -> float:
    """Image AUROC of ``estimator.decision_function(X)``; a ``scoring`` callable.

    Parameters
    ----------
    estimator : fitted estimator
        A ``PadimDetector``, a Pipeline ending in one, or any estimator whose
        ``decision_function`` gives image anomaly scores (higher = more anomalous).
    X : array-like
        Images or features, whatever ``estimator`` takes.
    y : array-like of shape (n,) or (n, H, W)
        Image labels (1 = anomalous) or pixel masks.

    Returns
    -------
    float
        ``image_auroc(y, estimator.decision_function(X))``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.metrics import image_auroc_scorer
    >>> class MaxScore:  # stands in for a fitted PadimDetector
    ...     def decision_function(self, X):
    ...         return X.max(axis=(1, 2))
    >>> X = np.array([[[0.1]], [[0.9]], [[0.2]]])
    >>> image_auroc_scorer(MaxScore(), X, [0, 1, 0])
    1.0
    """
    return image_auroc(y, estimator.decision_function(X))


def pixel_auroc_scorer(estimator, X, y: ArrayLike) -> float:
    """Pixel AUROC of ``estimator.score_samples(X)``; a ``scoring`` callable.

    Parameters
    ----------
    estimator : fitted estimator
        A ``PadimDetector``, a Pipeline ending in one, or any estimator whose
        ``score_samples`` gives pixel anomaly maps ``(n, H, W)``.
    X : array-like
        Images or features, whatever ``estimator`` takes.
    y : array-like of shape (n, H, W)
        Ground-truth pixel masks.

    Returns
    -------
    float
        ``pixel_auroc(y, estimator.score_samples(X))``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.metrics import pixel_auroc_scorer
    >>> class Identity:  # stands in for a fitted PadimDetector
    ...     def score_samples(self, X):
    ...         return X
    >>> masks = np.array([[[0, 1], [0, 0]]])
    >>> pixel_auroc_scorer(Identity(), masks * 2.0, masks)
    1.0
    """
    return pixel_auroc(y, estimator.score_samples(X))


def aupro_scorer(estimator, X, y: ArrayLike) -> float:
    """AUPRO (``fpr_limit=0.3``) of ``estimator.score_samples(X)``; a ``scoring`` callable.

    For another limit, write ``lambda est, X, y: aupro(y, est.score_samples(X), 0.05)``.

    Parameters
    ----------
    estimator : fitted estimator
        A ``PadimDetector``, a Pipeline ending in one, or any estimator whose
        ``score_samples`` gives pixel anomaly maps ``(n, H, W)``.
    X : array-like
        Images or features, whatever ``estimator`` takes.
    y : array-like of shape (n, H, W)
        Ground-truth pixel masks.

    Returns
    -------
    float
        ``aupro(y, estimator.score_samples(X))``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.metrics import aupro_scorer
    >>> class Identity:  # stands in for a fitted PadimDetector
    ...     def score_samples(self, X):
    ...         return X
    >>> masks = np.array([[[0, 1], [0, 0]]])
    >>> aupro_scorer(Identity(), masks * 2.0, masks)
    1.0
    """
    return aupro(y, estimator.score_samples(X))


def _auroc(labels: NDArray[np.bool_], scores: NDArray) -> float:
    """Mann-Whitney U / (n_pos * n_neg), ties counting one half (exactly sklearn's AUC).

    For each anomalous score, count the normal scores below it and those at most
    equal to it; both sums are exact integers. Two sorts and a binary search: no loop
    over pixels or thresholds.
    """
    check_both_classes(labels, "AUROC")
    positive = np.sort(scores[labels])
    negative = np.sort(scores[~labels])
    below = np.searchsorted(negative, positive, side="left").sum(dtype=np.int64)
    up_to = np.searchsorted(negative, positive, side="right").sum(dtype=np.int64)
    return float((below + up_to) / (2 * positive.size * negative.size))


def _pro_curve(masks: NDArray[np.bool_], maps: NDArray) -> tuple[NDArray, NDArray]:
    """FPR and PRO at every distinct threshold, from (0, 0) to (1, 1)."""
    within_image = np.zeros((3, 3, 3), dtype=bool)
    within_image[1] = True  # 8-connected in (H, W), never linked across images
    regions, n_regions = ndimage.label(masks, structure=within_image)
    normal = regions == 0
    n_normal = np.count_nonzero(normal)
    if n_regions == 0 or n_normal == 0:
        missing = "anomalous region" if n_regions == 0 else "normal pixel"
        raise ValueError(
            f"AUPRO is undefined: the masks hold no {missing}. Evaluate on data with "
            "both anomalous regions and normal pixels."
        )
    overlap_step = 1.0 / np.bincount(regions.ravel())[regions]
    overlap_step[normal] = 0.0

    order = np.argsort(maps.ravel())[::-1]  # order within ties is irrelevant
    scores = maps.ravel()[order]
    fpr = np.cumsum(normal.ravel()[order]) / n_normal
    pro = np.cumsum(overlap_step.ravel()[order]) / n_regions
    last_of_ties = np.append(scores[1:] != scores[:-1], True)
    return np.r_[0.0, fpr[last_of_ties], 1.0], np.r_[0.0, pro[last_of_ties], 1.0]


def _area_up_to(x: NDArray, y: NDArray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` (x non-decreasing, from 0 to 1) for x <= x_max."""
    end = np.searchsorted(x, x_max, side="right")
    if end < x.size:  # close the curve with a point interpolated at x_max
        y_max = np.interp(x_max, x[end - 1 : end + 1], y[end - 1 : end + 1])
        x, y = np.append(x[:end], x_max), np.append(y[:end], y_max)
    return float(trapezoid(y, x))
