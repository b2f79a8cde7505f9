"""Decision thresholds: the best F1 on labelled data, or a quantile of good images' pixels."""

from numbers import Real

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import precision_recall_curve
from sklearn.utils import _safe_indexing
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_consistent_length, check_is_fitted

from sk_padim._checks import check_both_classes, image_labels, pixel_masks, truth_and_scores
from sk_padim.regions import Region, defect_regions, pixel_threshold_of

__all__ = [
    "F1ThresholdCalibrator",
    "QuantileThresholdCalibrator",
    "f1_optimal_threshold",
    "good_pixel_threshold",
]

# The estimator method giving the scores that each level thresholds.
_SCORE_METHODS = {"image": "decision_function", "pixel": "score_samples"}


def f1_optimal_threshold(y_true: ArrayLike, scores: ArrayLike) -> float:
    """The anomaly-score threshold that maximises F1 on labelled data.

    A sample is predicted anomalous when its score is ``>=`` the threshold, as in
    :func:`sklearn.metrics.precision_recall_curve`. The threshold is
    ``thresholds[argmax(f1)]`` over that curve (the lowest one if several tie); the
    curve's last point (recall 0) has no threshold and is left out, and a point with
    precision = recall = 0 counts as F1 = 0.

    Parameters
    ----------
    y_true : array-like of shape (n,) or (n, H, W)
        Ground truth, 1 = anomalous: image labels or pixel masks. With image scores
        ``(n,)``, masks give image labels ``mask.any()``; with pixel maps
        ``(n, H', W')``, masks are compared pixel by pixel (resized to the maps with
        nearest interpolation if their size differs).
    scores : array-like of shape (n,) or (n, H', W')
        Image anomaly scores or pixel anomaly maps, higher = more anomalous.

    Returns
    -------
    float
        The F1-optimal threshold, one of the values in ``scores``.

    Raises
    ------
    ValueError
        If the ground truth holds a single class, the shapes disagree, or the scores
        hold NaN.

    See Also
    --------
    F1ThresholdCalibrator : Fits this threshold for a detector and predicts with it.

    Examples
    --------
    >>> from sk_padim.calibration import f1_optimal_threshold
    >>> f1_optimal_threshold([0, 0, 1, 0, 1], [0.1, 0.2, 0.6, 0.7, 0.8])
    0.6
    """
    return _best_f1_threshold(*truth_and_scores(y_true, scores))[0]


def _best_f1_threshold(
    truth: NDArray[np.bool_], scores: NDArray
) -> tuple[float, float, float, float]:
    """The F1-maximising threshold, and its F1, precision and recall."""
    check_both_classes(truth, "An F1-optimal threshold")
    precision, recall, thresholds = precision_recall_curve(truth.ravel(), scores.ravel())
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = np.argmax(f1)
    return float(thresholds[best]), float(f1[best]), float(precision[best]), float(recall[best])


class _DetectorWrapper(BaseEstimator):
    """What both calibrators pass on to the detector they wrap (``estimator_``), and
    their defect regions at ``pixel_threshold_``."""

    def score_samples(self, X) -> NDArray:
        """Pixel anomaly maps of the wrapped detector, higher = more anomalous.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.

        Returns
        -------
        ndarray of shape (n, H, W)
            ``estimator_.score_samples(X)``.
        """
        check_is_fitted(self)
        return self.estimator_.score_samples(X)

    def decision_function(self, X) -> NDArray:
        """Image anomaly scores of the wrapped detector, higher = more anomalous.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.

        Returns
        -------
        ndarray of shape (n,)
            ``estimator_.decision_function(X)``.
        """
        check_is_fitted(self)
        return self.estimator_.decision_function(X)

    def regions(self, X, *, min_area: int = 1) -> list[list[Region]]:
        """Find the defect regions of images: their maps cut at ``pixel_threshold_``.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.
        min_area : int, default=1
            Regions of fewer map pixels are left out.

        Returns
        -------
        regions : list of list of sk_padim.regions.Region
            One list per image (:func:`sk_padim.regions.defect_regions`).
        """
        threshold = self.pixel_threshold_
        if threshold is None:
            raise ValueError(
                "This calibrator has an image-level threshold and its detector has no "
                "pixel_threshold_; fit it with level='pixel' and masks, or calibrate a pixel "
                "threshold on good images with QuantileThresholdCalibrator."
            )
        return defect_regions(self.score_samples(X), threshold, min_area=min_area)


class F1ThresholdCalibrator(_DetectorWrapper):
    """Anomaly detector with the decision threshold that maximises F1 on validation data.

    Wraps a ``PadimDetector`` (or a Pipeline ending in one) and picks, from labelled
    validation images, the anomaly-score threshold with the best F1
    (:func:`f1_optimal_threshold`), either on image scores (``level="image"``) or on
    pixel scores (``level="pixel"``). Like scikit-learn's
    ``TunedThresholdClassifierCV``, but for detectors scored with higher = more
    anomalous.

    Parameters
    ----------
    estimator : estimator object
        A detector with ``decision_function(X) -> (n,)`` image scores and
        ``score_samples(X) -> (n, H, W)`` pixel maps, higher = more anomalous. If it is
        already fitted, it is used as is and never refitted. If not, a clone of it is
        fitted on the normal images of ``X`` (those labelled 0, or with an empty mask).
        Those images are then scored in-sample, so they look more normal than unseen
        normal images would; the threshold comes out lower than it should, and new
        normal images get more false alarms. Prefer a detector fitted on other images.
        Note that ``sklearn.base.clone`` of the calibrator (as in ``GridSearchCV``)
        clones an unfitted detector, which is then fitted on the normal images.
    level : {"image", "pixel"}, default="image"
        ``"image"`` thresholds the image scores ``decision_function(X)`` against image
        labels; ``"pixel"`` thresholds the pixel maps ``score_samples(X)`` against
        pixel masks (``y`` must then be masks).

    Attributes
    ----------
    estimator_ : estimator object
        The detector whose scores are thresholded: ``estimator`` itself if it was
        fitted, otherwise its fitted clone.
    threshold_ : float
        The F1-optimal threshold; a score ``>=`` it is anomalous.
    best_score_ : float
        The F1 at ``threshold_`` on the data given to ``fit``.
    precision_, recall_ : float
        The precision and recall at ``threshold_`` on the data given to ``fit``.

    See Also
    --------
    f1_optimal_threshold : The threshold from labels and scores alone.
    sklearn.model_selection.TunedThresholdClassifierCV : The same idea for classifiers.

    Notes
    -----
    The F1 reached on the validation data (``best_score_``) is an optimistic
    estimate of the F1 on new data, since the threshold was chosen on that data.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import F1ThresholdCalibrator, PadimDetector
    >>> rng = np.random.default_rng(0)
    >>> X_train = rng.normal(size=(30, 4, 8, 8)).astype(np.float32)
    >>> X_val = rng.normal(size=(10, 4, 8, 8)).astype(np.float32)
    >>> X_val[5:, :, 2:4, 2:4] += 5.0
    >>> y_val = np.array([0] * 5 + [1] * 5)
    >>> detector = PadimDetector().fit(X_train)
    >>> calibrator = F1ThresholdCalibrator(detector).fit(X_val, y_val)
    >>> calibrator.best_score_
    1.0
    >>> calibrator.predict(X_val)
    array([ 1,  1,  1,  1,  1, -1, -1, -1, -1, -1])
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["decision_function"]), HasMethods(["score_samples"])],
        "level": [StrOptions(set(_SCORE_METHODS))],
    }

    def __init__(self, estimator, *, level: str = "image"):
        self.estimator = estimator
        self.level = level

    # Not skipped: an unfitted estimator is fitted here and validates its own parameters.
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y: ArrayLike) -> "F1ThresholdCalibrator":
        """Fit the detector if needed, then pick the F1-optimal threshold.

        Parameters
        ----------
        X : array-like
            Labelled validation images (or features), whatever ``estimator`` takes.
        y : array-like of shape (n,) or (n, H, W)
            Image labels (1 = anomalous) or pixel masks; masks at ``level="pixel"``.

        Returns
        -------
        self : F1ThresholdCalibrator
            The fitted calibrator.
        """
        score_method = self._score_method()
        truth = pixel_masks(y) if self.level == "pixel" else image_labels(y)
        check_both_classes(truth, "An F1-optimal threshold")
        labels = image_labels(truth)
        check_consistent_length(X, labels)
        self.estimator_ = self._fitted_estimator(X, labels)
        scores = getattr(self.estimator_, score_method)(X)
        self.threshold_, self.best_score_, self.precision_, self.recall_ = _best_f1_threshold(
            *truth_and_scores(truth, scores)
        )
        return self

    def predict(self, X) -> NDArray[np.int_]:
        """Predict +1 for normal and -1 for anomalous images.

        At ``level="image"`` an image is anomalous if its image score is
        ``>= threshold_``; at ``level="pixel"`` if any pixel of its map is.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.

        Returns
        -------
        ndarray of shape (n,)
            +1 (normal) or -1 (anomalous), scikit-learn's outlier convention.
        """
        check_is_fitted(self)
        scores = getattr(self.estimator_, _SCORE_METHODS[self.level])(X)
        anomalous = np.asarray(scores).reshape(len(scores), -1) >= self.threshold_
        return np.where(anomalous.any(axis=1), -1, 1)

    def predict_masks(self, X) -> NDArray[np.bool_]:
        """Predict boolean anomaly masks, ``score_samples(X) >= threshold_``.

        Only at ``level="pixel"``, where ``threshold_`` is a pixel-score threshold.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.

        Returns
        -------
        ndarray of shape (n, H, W)
            True where a pixel is predicted anomalous.
        """
        check_is_fitted(self)
        if self.level != "pixel":
            raise ValueError(
                "predict_masks needs a pixel-level threshold, but this calibrator was fitted "
                "with level='image' (threshold_ is an image-score threshold). Fit it with "
                "level='pixel' and pixel masks."
            )
        return self.estimator_.score_samples(X) >= self.threshold_

    @property
    def pixel_threshold_(self) -> float | None:
        """The pixel threshold that :meth:`regions` cuts maps at.

        ``threshold_`` at ``level="pixel"``; at ``level="image"``, the wrapped
        detector's own ``pixel_threshold_`` (set by ``PadimDetector.fit`` from the
        training images), or None if it has none.
        """
        check_is_fitted(self)
        if self.level == "pixel":
            return self.threshold_
        try:
            return pixel_threshold_of(self.estimator_)
        except ValueError:
            return None

    @property
    def n_features_in_(self) -> int:
        """Number of features seen by the fitted detector (when it records it)."""
        try:
            check_is_fitted(self)
        except NotFittedError as error:
            raise AttributeError(
                f"{type(self).__name__} is not fitted yet, so it has no n_features_in_."
            ) from error
        return self.estimator_.n_features_in_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _score_method(self) -> str:
        """The estimator's method whose scores ``level`` thresholds; checked to exist."""
        method = _SCORE_METHODS[self.level]
        if not hasattr(self.estimator, method):
            raise TypeError(
                f"level={self.level!r} thresholds {method}(X), which "
                f"{type(self.estimator).__name__} does not have. Pass a PadimDetector or a "
                "Pipeline ending in one."
            )
        return method

    def _fitted_estimator(self, X, labels: NDArray[np.bool_]):
        """``estimator`` if fitted, else a clone fitted on the normal images of X."""
        if _is_fitted(self.estimator):
            return self.estimator
        normal = np.flatnonzero(~labels)
        if normal.size == 0:
            raise ValueError(
                "estimator is not fitted and y holds no normal image to fit it on. Pass a "
                "fitted estimator, or add normal images to X."
            )
        return clone(self.estimator).fit(_safe_indexing(X, normal))


def good_pixel_threshold(maps: ArrayLike, quantile: float = 0.999) -> float:
    """A pixel threshold from the anomaly maps of good images alone: their ``quantile``.

    On new good images like these, a fraction of about ``1 - quantile`` of the pixels
    is at or above the threshold (0.1 % at the default 0.999): the false-positive pixel
    rate it implies. The maps must be of images the model was not fitted on (held out):
    training images score lower than new ones, which would put the threshold too low.

    Parameters
    ----------
    maps : array-like of shape (n, H, W)
        Anomaly maps of good (defect-free) held-out images, e.g. ``score_samples(X)``.
    quantile : float, default=0.999
        In (0, 1); NumPy's linear interpolation between pixel values.

    Returns
    -------
    float
        The threshold; a pixel ``>=`` it is anomalous.

    See Also
    --------
    QuantileThresholdCalibrator : The same, as an estimator wrapping a fitted model.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.calibration import good_pixel_threshold
    >>> maps = np.arange(1000.0).reshape(10, 10, 10)
    >>> good_pixel_threshold(maps, 0.99)
    989.01
    """
    quantile = _check_quantile(quantile)
    values = np.asarray(maps, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("maps must be a non-empty array of finite anomaly scores.")
    return float(np.quantile(values, quantile))


def _check_quantile(quantile) -> float:
    value = float(quantile)
    if not 0 < value < 1:
        raise ValueError(f"quantile must be in (0, 1), e.g. 0.999; got {quantile!r}.")
    return value


class QuantileThresholdCalibrator(_DetectorWrapper):
    """A fitted detector with a pixel threshold calibrated on good held-out images alone.

    No defect masks are needed: ``fit`` scores good (defect-free) images that the
    detector was not fitted on and sets ``pixel_threshold_`` to the ``quantile`` of
    their map pixels (:func:`good_pixel_threshold`). On new good images like them, a
    fraction of about ``1 - quantile`` of the pixels is at or above it (0.1 % at the
    default 0.999): the false-positive pixel rate it implies; the rate measured on the
    calibration images is ``false_positive_rate_``. With masks of defects, use
    :class:`F1ThresholdCalibrator` with ``level="pixel"`` instead.

    ``PadimDetector.fit`` already sets such a threshold (``pixel_threshold_``, from
    the training images' leave-one-out maps); this calibrator replaces it with one from
    images closer to those the model will see (another day, another camera setting).

    Parameters
    ----------
    estimator : fitted estimator
        A fitted Pipeline of ``PatchFeatureTransformer`` and ``PadimDetector`` (or a
        fitted ``PadimDetector``). It is never refitted.
    quantile : float, default=0.999
        The quantile of the good pixels' scores, in (0, 1).

    Attributes
    ----------
    estimator_ : estimator object
        ``estimator``.
    pixel_threshold_ : float
        The calibrated pixel threshold; a pixel ``>=`` it is anomalous.
    false_positive_rate_ : float
        The fraction of the calibration images' pixels ``>= pixel_threshold_``.
    threshold_ : float or None
        The image threshold of :meth:`predict`: the detector's own ``threshold_``
        (unchanged by this calibration), or None if it has none.
    n_images_ : int
        Number of calibration images.

    See Also
    --------
    good_pixel_threshold : The threshold from maps alone.
    sk_padim.regions.defect_regions : Regions of maps cut at a threshold.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PadimDetector
    >>> from sk_padim.calibration import QuantileThresholdCalibrator
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 4, 8, 8)).astype(np.float32)
    >>> detector = PadimDetector().fit(X[:30])
    >>> calibrator = QuantileThresholdCalibrator(detector, quantile=0.99).fit(X[30:])
    >>> bool(calibrator.false_positive_rate_ <= 0.011)
    True
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["score_samples"])],
        "quantile": [Interval(Real, 0, 1, closed="neither")],
    }

    def __init__(self, estimator, *, quantile: float = 0.999):
        self.estimator = estimator
        self.quantile = quantile

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None) -> "QuantileThresholdCalibrator":
        """Set ``pixel_threshold_`` from the maps of good held-out images.

        Parameters
        ----------
        X : array-like
            Good images (or features) the detector was not fitted on, whatever
            ``estimator`` takes.
        y : None
            Ignored: every image is taken as good.

        Returns
        -------
        self : QuantileThresholdCalibrator
            The fitted calibrator.
        """
        if not _is_fitted(self.estimator):
            raise ValueError(
                "QuantileThresholdCalibrator needs a fitted estimator: the good images it "
                "calibrates on must be held out from the fit. Fit the model first."
            )
        maps = np.asarray(self.estimator.score_samples(X))
        self.estimator_ = self.estimator
        self.pixel_threshold_ = good_pixel_threshold(maps, self.quantile)
        self.false_positive_rate_ = float(np.mean(maps >= self.pixel_threshold_))
        self.n_images_ = len(maps)
        detector = self.estimator[-1] if hasattr(self.estimator, "steps") else self.estimator
        threshold = getattr(detector, "threshold_", None)
        self.threshold_ = None if threshold is None else float(threshold)
        return self

    def predict(self, X) -> NDArray[np.int_]:
        """+1 normal, -1 anomalous: the image score against ``threshold_`` (the detector's).

        Parameters
        ----------
        X : array-like
            Images (or features).

        Returns
        -------
        ndarray of shape (n,)
            +1 (normal) or -1 (anomalous), scikit-learn's outlier convention.
        """
        check_is_fitted(self)
        if self.threshold_ is None:
            raise ValueError(
                "The detector has no image threshold (threshold_), so there is no verdict; "
                "it was fitted on one image, or with partial_fit. Fit on two images or "
                "more, or calibrate one with F1ThresholdCalibrator."
            )
        scores = np.asarray(self.estimator_.decision_function(X))
        return np.where(scores >= self.threshold_, -1, 1)

    def predict_masks(self, X) -> NDArray[np.bool_]:
        """Predict boolean anomaly masks, ``score_samples(X) >= pixel_threshold_``.

        Parameters
        ----------
        X : array-like
            Images (or features), whatever ``estimator`` takes.

        Returns
        -------
        ndarray of shape (n, H, W)
            True where a pixel is predicted anomalous.
        """
        check_is_fitted(self)
        return np.asarray(self.estimator_.score_samples(X)) >= self.pixel_threshold_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        return tags


def _is_fitted(estimator) -> bool:
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True
