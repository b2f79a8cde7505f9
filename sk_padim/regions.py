"""Where and how sure: defect regions of anomaly maps, and scores a person can read.

- :func:`defect_regions`: the connected regions of each map at or above a pixel
  threshold, with their box, area, centroid, peak and mean score
  (:func:`skimage.measure.label` and :func:`skimage.measure.regionprops`).
- :func:`predict_regions`: the same from a fitted model and images, cut at the model's
  pixel threshold (``PadimDetector.pixel_threshold_`` set by ``fit``, or a calibrator's).
- :func:`pixel_threshold_of`: the pixel threshold of a fitted model or calibrator.
- :func:`relative_score` and :func:`normalized_score`: a score beside its threshold.

**Readable scores.** A raw PaDiM score is a Mahalanobis distance: its scale depends on
the backbone, the features and the data (420-660 on one dataset, 12-27 on another), so a
number alone says little. Two readings put it beside the threshold it is judged against:

- ``relative = score / threshold``: 1.0 is on the line, 2.0 twice the threshold, 0.5
  half of it.
- ``normalized = relative / (1 + relative) = score / (score + threshold)``: in
  ``[0, 1)``, 0.5 at the threshold, above 0.5 past it, increasing with the score
  (anomalib's convention of the threshold at 0.5).

Both keep the order of the scores and the verdict (``score >= threshold`` exactly when
``relative >= 1`` and ``normalized >= 0.5``). Neither is a probability: 0.8 does not
mean "80 % likely defective"; it means the score is 4 times the threshold. And they are
only as meaningful as the threshold: with a threshold from good images alone, 1.0 means
"as high as the highest normal scores", not "a defect for sure".

This module works on numbers (maps and thresholds); it sits in the evaluation layer and
draws nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from sk_padim._checks import check_int

__all__ = [
    "Region",
    "defect_regions",
    "normalized_score",
    "pixel_threshold_of",
    "predict_regions",
    "relative_score",
]


def relative_score(scores: ArrayLike, threshold: float) -> NDArray[np.float64]:
    """Divide scores by their threshold, ``score / threshold``: 1.0 is on the line.

    Parameters
    ----------
    scores : array-like
        Anomaly scores (image scores or map pixels), higher = more anomalous; PaDiM's are
        distances, so 0 or more.
    threshold : float
        The threshold they are judged against, > 0.

    Returns
    -------
    ndarray of float64, the shape of ``scores``
        ``scores / threshold``; ``>= 1`` exactly when the score is at or past the
        threshold. Not a probability (see the module docstring).

    Examples
    --------
    >>> from sk_padim.regions import relative_score
    >>> relative_score([5.0, 10.0, 20.0], 10.0)
    array([0.5, 1. , 2. ])
    """
    return np.asarray(scores, dtype=np.float64) / _check_threshold(threshold)


def normalized_score(scores: ArrayLike, threshold: float) -> NDArray[np.float64]:
    """Map scores to ``[0, 1)`` with the threshold at 0.5: ``score / (score + threshold)``.

    Equal to ``relative / (1 + relative)`` with ``relative = score / threshold``: 0 for
    a score of 0, 0.5 on the threshold, 2/3 at twice it, towards 1 far past it;
    increasing with the score, so it keeps the scores' order and the verdict
    (``>= 0.5`` exactly when ``score >= threshold``). Negative scores (which PaDiM's
    distances never are) count as 0.

    It is **not a probability** of a defect: it only says how far a score is from the
    threshold, on a bounded scale (anomalib's convention). It is as meaningful as the
    threshold is.

    Parameters
    ----------
    scores : array-like
        Anomaly scores, higher = more anomalous.
    threshold : float
        The threshold they are judged against, > 0.

    Returns
    -------
    ndarray of float64, the shape of ``scores``
        Values in ``[0, 1)``.

    Examples
    --------
    >>> from sk_padim.regions import normalized_score
    >>> normalized_score([0.0, 10.0, 20.0, 30.0], 10.0).round(3)
    array([0.   , 0.5  , 0.667, 0.75 ])
    """
    threshold = _check_threshold(threshold)
    scores = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
    return scores / (scores + threshold)


def _check_threshold(threshold) -> float:
    value = float(threshold)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"The threshold must be a positive number to read scores against it; got {threshold!r}."
        )
    return value


@dataclass(frozen=True)
class Region:
    """One connected defect region of an anomaly map.

    Parameters
    ----------
    image : int
        Index of the image (its map) in the batch.
    label : int
        The region's number within its image, 1, 2, ... in the order of
        :func:`skimage.measure.label` (row-major order of each region's first pixel).
    row_min, col_min, row_max, col_max : int
        Bounding box in map pixels, half-open as in NumPy slicing and scikit-image:
        the region lies in ``map[row_min:row_max, col_min:col_max]``.
    area : int
        Number of pixels of the region.
    centroid_row, centroid_col : float
        Mean row and column of its pixels.
    peak_score : float
        The highest score of its pixels.
    mean_score : float
        The mean score of its pixels.
    threshold : float
        The pixel threshold the map was cut at.
    peak_relative : float
        ``peak_score / threshold`` (:func:`relative_score`).
    peak_normalized : float
        ``peak_score / (peak_score + threshold)`` (:func:`normalized_score`): 0.5 on the
        threshold; not a probability.
    """

    image: int
    label: int
    row_min: int
    col_min: int
    row_max: int
    col_max: int
    area: int
    centroid_row: float
    centroid_col: float
    peak_score: float
    mean_score: float
    threshold: float
    peak_relative: float
    peak_normalized: float

    def as_dict(self) -> dict:
        """Give the fields as a dict of plain Python numbers (for JSON and CSV).

        Returns
        -------
        dict
            Field name to value, in the order of the fields.
        """
        return asdict(self)

    def record(self) -> dict:
        """Give the fields of a ``regions.jsonl`` line, less the image it is in.

        ``label`` is named ``region``, floats are rounded to 6 significant digits, and
        ``image`` (an index) is left out: the writer names the image its own way.

        Returns
        -------
        dict
            ``{"region": label, <the other fields>}``, plain Python numbers.
        """
        fields = self.as_dict()
        del fields["image"]
        record = {"region": fields.pop("label")}
        for name, value in fields.items():
            record[name] = float(f"{value:.6g}") if isinstance(value, float) else value
        return record


def defect_regions(
    maps: ArrayLike, threshold: float, *, min_area: int = 1, connectivity: int = 2
) -> list[list[Region]]:
    """The connected regions of each map where the score is ``>= threshold``.

    The pixels at or above the threshold are grouped into connected regions
    (:func:`skimage.measure.label`; with ``connectivity=2`` diagonal neighbours touch)
    and described by :func:`skimage.measure.regionprops`, all maps in one labelling
    (the maps are stacked with a blank row between them, so no region spans two maps).

    Parameters
    ----------
    maps : array-like of shape (n, H, W) or (H, W)
        Anomaly maps, e.g. ``score_samples(X)``; one map is treated as a batch of one.
    threshold : float
        The pixel threshold, > 0: e.g. ``PadimDetector.pixel_threshold_`` (from the
        training images at ``fit``) or a calibrated one
        (:class:`~sk_padim.QuantileThresholdCalibrator`,
        :class:`~sk_padim.F1ThresholdCalibrator` with ``level="pixel"``).
    min_area : int, default=1
        Regions of fewer pixels are left out.
    connectivity : {1, 2}, default=2
        1: pixels touch by their sides only; 2: by their corners too.

    Returns
    -------
    regions : list of list of Region
        One list per map (empty when no pixel reaches the threshold), each ordered by
        label.

    See Also
    --------
    predict_regions : The regions of images, from a fitted model.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.regions import defect_regions
    >>> maps = np.zeros((2, 8, 8))
    >>> maps[1, 2:4, 3:6] = 4.0
    >>> maps[1, 3, 4] = 6.0
    >>> regions = defect_regions(maps, 2.0)
    >>> len(regions[0]), len(regions[1])
    (0, 1)
    >>> region = regions[1][0]
    >>> (region.row_min, region.col_min, region.row_max, region.col_max), region.area
    ((2, 3, 4, 6), 6)
    >>> region.peak_score, round(region.mean_score, 3), region.peak_relative
    (6.0, 4.333, 3.0)
    """
    from skimage.measure import label, regionprops

    threshold = _check_threshold(threshold)
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n, H, W) or (H, W); got {maps.shape}.")
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2; got {connectivity!r}.")
    min_area = check_int(min_area, "min_area", 1)
    n, height, width = maps.shape
    # One labelling for the batch: the maps one under the other, a blank row after each.
    stacked = np.pad(maps, ((0, 0), (0, 1), (0, 0))).reshape(n * (height + 1), width)
    above = np.pad(maps >= threshold, ((0, 0), (0, 1), (0, 0))).reshape(stacked.shape)
    labels = label(above, connectivity=connectivity)
    regions: list[list[Region]] = [[] for _ in range(n)]
    for props in regionprops(labels, intensity_image=stacked):
        if props.area < min_area:
            continue
        row_min, col_min, row_max, col_max = props.bbox
        image, offset = divmod(row_min, height + 1)
        values = props.image_intensity[props.image]
        peak = float(values.max())
        centroid_row, centroid_col = props.centroid
        regions[image].append(
            Region(
                image=int(image),
                label=len(regions[image]) + 1,
                row_min=int(offset),
                col_min=int(col_min),
                row_max=int(offset + row_max - row_min),
                col_max=int(col_max),
                area=int(props.area),
                centroid_row=float(centroid_row - image * (height + 1)),
                centroid_col=float(centroid_col),
                peak_score=peak,
                mean_score=float(values.mean()),
                threshold=threshold,
                peak_relative=peak / threshold,
                peak_normalized=peak / (peak + threshold),
            )
        )
    return regions


def pixel_threshold_of(model) -> float:
    """Find the pixel threshold a fitted model cuts regions at.

    A calibrator's ``pixel_threshold_`` (:class:`~sk_padim.QuantileThresholdCalibrator`
    or :class:`~sk_padim.F1ThresholdCalibrator`), else the detector's
    (``PadimDetector.pixel_threshold_``, set by ``fit``), the last step of a Pipeline.

    Parameters
    ----------
    model : fitted estimator
        A Pipeline ending in a ``PadimDetector``, a ``PadimDetector``, or a fitted
        calibrator.

    Returns
    -------
    float
        The pixel threshold.

    Raises
    ------
    ValueError
        If the model has no pixel threshold (e.g. it was fitted on one image, or with
        ``partial_fit`` only).
    """
    for candidate in (model, _last_step(model)):
        value = getattr(candidate, "pixel_threshold_", None)
        if value is not None:
            return float(value)
    raise ValueError(
        f"The {type(model).__name__} has no pixel threshold: PadimDetector.fit sets "
        "pixel_threshold_ from two training images or more (partial_fit, merge and a fit "
        "on one image do not). Calibrate one on good held-out images "
        "(QuantileThresholdCalibrator), or pass threshold=."
    )


def _last_step(model):
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else None


def predict_regions(
    model, X, *, threshold: float | None = None, min_area: int = 1, connectivity: int = 2
) -> list[list[Region]]:
    """The defect regions of images, from a fitted model's maps and pixel threshold.

    Parameters
    ----------
    model : fitted estimator
        A Pipeline of ``PatchFeatureTransformer`` and ``PadimDetector`` straight from
        ``fit`` (its detector's ``pixel_threshold_`` is used), or a fitted calibrator
        wrapping one (its ``pixel_threshold_``).
    X : images
        Whatever ``model.score_samples`` takes: an array, a list of files, a folder.
    threshold : float, default=None
        A pixel threshold to use instead of the model's.
    min_area : int, default=1
        Regions of fewer pixels are left out.
    connectivity : {1, 2}, default=2
        See :func:`defect_regions`.

    Returns
    -------
    regions : list of list of Region
        One list per image.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.evaluation import padim_pipeline
    >>> from sk_padim.regions import predict_regions
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 120, (6, 32, 32), dtype=np.uint8)
    >>> pipe = padim_pipeline(weights=None, image_size=32, random_state=0).fit(X[:5])
    >>> (regions,) = predict_regions(pipe, X[5:])  # cut at pipe[-1].pixel_threshold_
    >>> all(region.peak_relative >= 1 for region in regions)
    True
    """
    if threshold is None:
        threshold = pixel_threshold_of(model)
    maps = np.asarray(model.score_samples(X))
    return defect_regions(maps, threshold, min_area=min_area, connectivity=connectivity)
