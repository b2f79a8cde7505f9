"""Decision thresholds that maximise F1 on labelled validation data."""

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import precision_recall_curve
from sklearn.utils import _safe_indexing
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.validation import check_consistent_length, check_is_fitted

from sk_padim._checks import check_both_classes, image_labels, pixel_masks, truth_and_scores

__all__ = ["F1ThresholdCalibrator", "f1_optimal_threshold"]

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


class F1ThresholdCalibrator(BaseEstimator):
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


def _is_fitted(estimator) -> bool:
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        return False
    return True
