"""Decisions from good images alone: conformal thresholds, p-values, suspects and drift.

The held-out (leave-one-out) image scores of the ``n`` training images, which
:meth:`sk_padim.PadimDetector.fit` keeps as ``training_scores_``, are (nearly)
exchangeable with the score of a new image of a good part. Hence:

- **threshold**: the ``k = ceil((n + 1)(1 - alpha))``-th smallest training score flags a
  new good image with probability ``(n + 1 - k) / (n + 1) <= alpha`` (split conformal
  prediction; the leave-one-out scores make it a jackknife at no extra cost);
- **p-value** of an image of score ``s``: ``(1 + #{training scores >= s}) / (n + 1)``,
  uniform on good images (up to ties), so "p = 0.02" reads "one good part in 50 scores
  this high"; an image is flagged at rate ``alpha`` when its p-value is ``<= alpha``;
- **suspects**: training images whose held-out score is an outlier among the training
  scores (a robust z-score of the log scores, see :func:`suspect_indices`);
- **drift**: a batch's scores tested against what good images give
  (:func:`drift_report`).

The functions take arrays of scores (NumPy and SciPy only), except :func:`p_values`,
which scores images with a fitted estimator.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy import stats

__all__ = [
    "SuspectTrainingImagesWarning",
    "conformal_rank",
    "conformal_threshold",
    "drift_report",
    "implied_false_alarm_rate",
    "p_values",
    "p_values_from_scores",
    "suspect_indices",
    "training_scores_of",
]

_SUSPECT_CUTOFF = 5.0
"""Robust z-score of a training image's log held-out score above which it is named a
suspect (see :func:`suspect_indices`)."""
_MIN_SUSPECT_IMAGES = 20  # fewer training scores give no robust spread: no suspects named
_MAD_TO_SD = 1.4826  # MAD * this estimates the standard deviation of a normal sample


class SuspectTrainingImagesWarning(UserWarning):
    """Some training images score as outliers among the training images: perhaps defective."""


def conformal_rank(n: int, false_alarm_rate: float) -> int:
    """The rank ``k = ceil((n + 1)(1 - alpha))`` of the conformal threshold among ``n`` scores.

    Parameters
    ----------
    n : int
        Number of training scores.
    false_alarm_rate : float
        ``alpha``, in (0, 1).

    Returns
    -------
    k : int
        In ``[1, n]``: the threshold is the ``k``-th smallest training score.

    Raises
    ------
    ValueError
        If ``n`` is too small for the rate: the rank would pass ``n``, which needs
        ``n >= 1 / alpha - 1`` training images (19 for 0.05, 99 for 0.01).

    Examples
    --------
    >>> from sk_padim.conformal import conformal_rank
    >>> conformal_rank(40, 0.1)  # ceil(41 * 0.9)
    37
    >>> conformal_rank(19, 0.05)
    19
    """
    _check_rate(false_alarm_rate)
    # Rounded first: (n + 1) * (1 - alpha) in floating point may land just above an
    # integer (10 * 0.9 = 9.000000000000002) and cost a rank.
    rank = math.ceil(round((n + 1) * (1 - false_alarm_rate), 9))
    if rank > n:
        needed = math.ceil(round(1 / false_alarm_rate - 1, 9))
        raise ValueError(
            f"false_alarm_rate={false_alarm_rate!r} needs at least {needed} training images "
            f"(n >= 1 / alpha - 1); got {n}. Fit on more images of good parts, or "
            f"ask for a rate of at least {1 / (n + 1):.3g} (1 / (n + 1))."
        )
    return max(rank, 1)


def conformal_threshold(training_scores, false_alarm_rate: float) -> float:
    """The image threshold whose false-alarm rate on good images is at most ``alpha``.

    Parameters
    ----------
    training_scores : array-like of shape (n,)
        Held-out scores of the training images (``PadimDetector.training_scores_``).
    false_alarm_rate : float
        ``alpha``, in (0, 1).

    Returns
    -------
    threshold : float
        The :func:`conformal_rank`-th smallest training score.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.conformal import conformal_threshold
    >>> conformal_threshold(np.arange(1.0, 20.0), 0.1)  # 19 scores: rank ceil(20 * 0.9)
    18.0
    """
    scores = _check_scores(training_scores)
    rank = conformal_rank(len(scores), false_alarm_rate)
    return float(np.sort(scores)[rank - 1])


def implied_false_alarm_rate(training_scores, threshold: float) -> float:
    """The false-alarm rate on good images that a threshold guarantees (an upper bound).

    A new good image scores ``>= threshold`` with probability at most
    ``(1 + #{training scores > threshold}) / (n + 1)``: ``1 / (n + 1)`` for the highest
    training score (the default rule of :class:`~sk_padim.PadimDetector`), and
    ``(n + 1 - k) / (n + 1) <= alpha`` for the conformal threshold of rate ``alpha``.

    Parameters
    ----------
    training_scores : array-like of shape (n,)
        Held-out scores of the training images.
    threshold : float
        An image threshold.

    Returns
    -------
    rate : float
        In ``(0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.conformal import implied_false_alarm_rate
    >>> implied_false_alarm_rate(np.arange(1.0, 20.0), 19.0)  # the highest of 19: 1 / 20
    0.05
    """
    scores = _check_scores(training_scores)
    return float((1 + np.count_nonzero(scores > threshold)) / (len(scores) + 1))


def p_values_from_scores(training_scores, scores) -> np.ndarray:
    """Conformal p-values of image scores: ``(1 + #{training scores >= s}) / (n + 1)``.

    Parameters
    ----------
    training_scores : array-like of shape (n,)
        Held-out scores of the training images.
    scores : array-like of shape (m,)
        Image scores (higher: more anomalous).

    Returns
    -------
    p_values : ndarray of shape (m,), float64
        In ``[1 / (n + 1), 1]``; lower for higher scores.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.conformal import p_values_from_scores
    >>> p_values_from_scores([1.0, 2.0, 3.0], [0.5, 2.5, 9.0])
    array([1.  , 0.5 , 0.25])
    """
    ordered = np.sort(_check_scores(training_scores))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    at_or_above = len(ordered) - np.searchsorted(ordered, scores, side="left")
    return (1.0 + at_or_above) / (len(ordered) + 1.0)


def training_scores_of(estimator) -> np.ndarray:
    """The held-out training scores of a fitted detector, pipeline or calibrator.

    Parameters
    ----------
    estimator : object
        A fitted :class:`~sk_padim.PadimDetector`, a Pipeline ending with one, or a
        calibrator wrapping such a pipeline (its ``estimator_``).

    Returns
    -------
    training_scores : ndarray of shape (n,)
        The detector's ``training_scores_``, as float64.

    Raises
    ------
    ValueError
        If the detector has no training scores (fitted with ``partial_fit``, ``merge``,
        on one image, or by a version of sk-padim before they were kept).

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PadimDetector
    >>> from sk_padim.conformal import training_scores_of
    >>> X = np.random.default_rng(0).normal(size=(12, 4, 3, 3)).astype(np.float32)
    >>> training_scores_of(PadimDetector().fit(X)).shape
    (12,)
    """
    candidate = estimator
    for _ in range(4):  # a calibrator -> its pipeline -> its last step
        scores = getattr(candidate, "training_scores_", None)
        if scores is not None:
            return np.asarray(scores, dtype=np.float64)
        if hasattr(candidate, "estimator_"):
            candidate = candidate.estimator_
        elif hasattr(candidate, "steps"):
            candidate = candidate.steps[-1][1]
        else:
            break
    raise ValueError(
        f"The {type(estimator).__name__} has no training_scores_ (the held-out scores of the "
        "training images): PadimDetector.fit, fit_batches, fit_streaming and fit_distributed "
        "keep them (from two training images), partial_fit and merge do not, and models saved "
        "by an earlier sk-padim have none. Refit it with fit."
    )


def p_values(estimator, X) -> np.ndarray:
    """Conformal p-values of images: the fraction of training images scoring as high.

    ``(1 + #{training scores >= s}) / (n + 1)`` for an image of score ``s``, the training
    scores being the held-out scores the detector kept at fit (``training_scores_``). On
    images of good parts like the training ones the p-values are uniform, so a p-value
    reads as "one good part in ``1 / p`` scores this high"; they rank images as the scores
    do (lower p-value, higher score). ``p <= alpha`` flags the images that the threshold of
    ``false_alarm_rate=alpha`` flags (up to ties with a training score).

    Parameters
    ----------
    estimator : object
        A fitted :class:`~sk_padim.PadimDetector` (then ``X`` are features), a fitted
        ``Pipeline([PatchFeatureTransformer, PadimDetector])`` or a calibrator wrapping one
        (then ``X`` are images).
    X : array-like
        What ``estimator.decision_function`` takes.

    Returns
    -------
    p_values : ndarray of shape (n_images,), float64
        In ``[1 / (n + 1), 1]``.

    See Also
    --------
    sk_padim.conformal.p_values_from_scores : The same from scores.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PadimDetector, p_values
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(19, 4, 3, 3)).astype(np.float32)
    >>> detector = PadimDetector().fit(X)
    >>> p_values(detector, X[:1] + 10)  # far above every training image: 1 / (19 + 1)
    array([0.05])
    """
    training = training_scores_of(estimator)
    scores = estimator.decision_function(X)
    scores = scores.cpu().numpy() if hasattr(scores, "cpu") else np.asarray(scores)
    return p_values_from_scores(training, scores)


def suspect_indices(training_scores, cutoff: float = _SUSPECT_CUTOFF) -> np.ndarray:
    """Training images whose held-out score is an outlier among the training scores.

    The rule: a robust z-score of the logarithm of the scores, ``(log s - median) /
    (1.4826 * MAD)`` (MAD: the median absolute deviation of the log scores; 1.4826 makes
    it a standard deviation for normal data), above ``cutoff``. Logarithms because image
    scores (maxima of maps of distances) are skewed to the right; the median and MAD
    because a few defective images do not move them, as they move a mean and a standard
    deviation. With fewer than 20 scores, or no spread (MAD 0), no image is named.

    At the default cutoff, 5, the rule named a good image in 13 of 600 clean training
    sets of 40 crops of the built-in texture photographs (2 %; 0 % to 9 % by photograph;
    ``benchmarks/conformal_coverage.py``, see ``docs/evaluation.md``). It names images
    far outside the good images' spread (holes and patches mixed into gravel crops at
    128 px); a defect that scores within that spread (a thin scratch, a faint stain) is
    not named: the rule finds gross contamination, it does not replace inspection.

    Parameters
    ----------
    training_scores : array-like of shape (n,)
        Held-out scores of the training images (``PadimDetector.training_scores_``).
    cutoff : float, default=5.0
        Robust z-scores above it are named.

    Returns
    -------
    indices : ndarray of shape (n_suspects,), int
        Positions in ``training_scores``, ascending.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.conformal import suspect_indices
    >>> scores = np.exp(np.random.default_rng(0).normal(size=30))
    >>> scores[[4, 11]] = 500.0
    >>> suspect_indices(scores)
    array([ 4, 11])
    """
    scores = _check_scores(training_scores)
    if len(scores) < _MIN_SUSPECT_IMAGES or not np.all(scores > 0):
        return np.zeros(0, dtype=np.intp)
    logs = np.log(scores)
    median = np.median(logs)
    spread = _MAD_TO_SD * np.median(np.abs(logs - median))
    if not spread > 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero((logs - median) / spread > cutoff)


def drift_report(
    training_scores, scores, threshold: float, level: float = 0.01
) -> dict[str, float | int | bool]:
    """Test whether a batch of image scores departs from what good images give.

    Two one-sided tests, combined by Bonferroni (``drift_p_value = min(1, 2 * min(p))``):

    - **count**: the number of images flagged (``score >= threshold``) against its exact
      distribution for good images. With ``k`` training scores ``<= threshold`` out of
      ``n``, a good image's chance of being flagged is ``Beta(n + 1 - k, k)`` distributed
      (it depends on the training set drawn), so the count among ``m`` good images is
      beta-binomial ``(m, n + 1 - k, k)``: a binomial test that also allows for the
      training set's own randomness (a plain binomial test at the promised rate calls
      drift too often on large batches). Its mean rate is the promised
      ``(n + 1 - k) / (n + 1)``.
    - **shift**: the two-sample Kolmogorov-Smirnov test of the batch's scores against the
      training scores (two-sided). It sees a shift that has not crossed the threshold,
      and scores *lower* than good images give: darker, flatter or defocused images
      score lower, and a defect on them is missed.

    Parameters
    ----------
    training_scores : array-like of shape (n,)
        Held-out scores of the training images (``PadimDetector.training_scores_``).
    scores : array-like of shape (m,)
        Image scores of the batch.
    threshold : float
        The image threshold the batch was labelled with.
    level : float, default=0.01
        ``drift`` is true when ``drift_p_value < level``.

    Returns
    -------
    report : dict
        ``n_images``, ``n_flagged``, ``flagged_rate``, ``threshold``,
        ``false_alarm_rate`` (the rate the threshold promises on good images,
        :func:`~sk_padim.conformal.implied_false_alarm_rate`), ``count_p_value``,
        ``shift_p_value``, ``drift_p_value``, ``level`` and ``drift`` (bool).

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim.conformal import drift_report
    >>> rng = np.random.default_rng(0)
    >>> training = rng.gamma(20.0, size=60)
    >>> threshold = np.sort(training)[-5]
    >>> drift_report(training, rng.gamma(20.0, size=50), threshold)["drift"]
    False
    >>> drift_report(training, rng.gamma(20.0, size=50) + 8, threshold)["drift"]
    True
    """
    training = _check_scores(training_scores)
    batch = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level!r}.")
    n, m = len(training), len(batch)
    n_flagged = int(np.count_nonzero(batch >= threshold))
    below = int(np.count_nonzero(training <= threshold))  # k
    count_p = 1.0
    if m and 0 < below:
        count_p = float(stats.betabinom.sf(n_flagged - 1, m, n + 1 - below, below))
    shift_p = 1.0
    if m:
        shift_p = float(stats.ks_2samp(batch, training).pvalue)
    drift_p = min(1.0, 2 * min(count_p, shift_p))
    return {
        "n_images": m,
        "n_flagged": n_flagged,
        "flagged_rate": n_flagged / m if m else 0.0,
        "threshold": float(threshold),
        "false_alarm_rate": implied_false_alarm_rate(training, threshold),
        "count_p_value": count_p,
        "shift_p_value": shift_p,
        "drift_p_value": drift_p,
        "level": float(level),
        "drift": bool(drift_p < level),
    }


def _check_rate(false_alarm_rate) -> None:
    if (
        isinstance(false_alarm_rate, bool)
        or not isinstance(false_alarm_rate, Real)
        or not 0 < false_alarm_rate < 1
    ):
        raise ValueError(f"false_alarm_rate must be a float in (0, 1); got {false_alarm_rate!r}.")


def _check_scores(training_scores) -> np.ndarray:
    scores = np.asarray(training_scores, dtype=np.float64).reshape(-1)
    if not len(scores):
        raise ValueError("There are no training scores: fit on two training images or more.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("The training scores hold NaN or infinite values; refit the model.")
    return scores
