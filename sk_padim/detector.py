"""PadimDetector: a Gaussian per patch position, scored by Mahalanobis distance."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sk_padim._checks import normal_rows
from sk_padim.core.devices import resolve_device
from sk_padim.core.feature_checks import (
    check_feature_shape_matches,
    check_features,
    feature_batches,
    stream_feature_batches,
)
from sk_padim.core.images import size_pair
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.model import PatchScorer
from sk_padim.core.statistics import PatchStatistics
from sk_padim.fitted_gaussians import FittedGaussians
from sk_padim.fitting import (
    THRESHOLD_ATTRIBUTES,
    Fit,
    added_fit,
    fit_passes,
    fitted_record,
    map_generator,
    scoring_gaussians,
    state_fit,
    statistics_fit,
    warn_of_suspects,
)
from sk_padim.versioning import VersionedPickleMixin

__all__ = ["PadimDetector"]


class PadimDetector(VersionedPickleMixin, OutlierMixin, BaseEstimator):
    """PaDiM: a multivariate Gaussian per patch position of the feature grid.

    Fitting accumulates the count, mean and scatter of the training feature vectors at
    each position; the covariance is ``scatter / (N - 1) + reg * I``. Scoring takes the
    Mahalanobis distance to each position's Gaussian, upsamples the grid bilinearly to
    ``map_size`` and smooths it (``sigma``); the image score is the maximum of the map.
    Features may be NumPy arrays, tensors (any device; tensors in give tensors out) or
    :class:`~sk_padim.core.devices.DeviceFeatures`. Any number of threads may score one
    fitted detector.

    **Sign convention**: :meth:`score_samples` and :meth:`decision_function` are
    *higher for more anomalous* inputs (PaDiM, anomalib and PyOD), the opposite of
    scikit-learn's outlier detectors; :meth:`predict` gives +1 normal, -1 anomalous.

    Parameters
    ----------
    reg : float, default=0.01
        Added to the diagonal of every covariance when it is factorised: a fitted
        detector rescores with a new ``reg`` (``set_params``) without refitting.
    sigma : float, default=4.0
        Standard deviation, in map pixels, of the Gaussian smoothing; 0 disables it.
    truncate : float, default=4.0
        The smoothing kernel is cut at ``truncate * sigma`` (scipy's convention).
    map_size : int, (int, int) or None, default=None
        Size of the anomaly maps; ``None``: four times the feature grid (the image size
        at the default layers of every registered backbone).
    threshold : float or None, default=None
        Image score from which (``>=``) :meth:`predict` says anomalous. ``None``:
        :meth:`fit` sets ``threshold_`` from ``training_scores_`` by
        ``false_alarm_rate``; :meth:`partial_fit` and :meth:`merge` set it only from an
        explicit ``threshold``. To tune it on labelled data, use
        :class:`sk_padim.F1ThresholdCalibrator`.
    false_alarm_rate : float or None, default=None
        The rate ``alpha`` in (0, 1) at which good images like the training ones may be
        flagged: ``threshold_`` is the ``ceil((n + 1)(1 - alpha))``-th smallest of the
        ``n`` training scores (conformal, :mod:`sk_padim.conformal`); it needs
        ``n >= 1 / alpha - 1`` images (19 for 0.05). ``None``: the highest training
        score, which implies ``1 / (n + 1)``. Not with ``threshold``.
    pixel_quantile : float, default=0.999
        ``pixel_threshold_``, where defect regions are cut, is this quantile of the
        pixels of the training images' held-out maps: the expected false-positive pixel
        rate on good images is ``1 - pixel_quantile``. No masks are needed.
    covariance_dtype : {"float32", "float16"}, default="float32"
        How the Gaussians are saved. ``"float32"``: the statistics (a loaded model can
        merge, train further and rescore with another ``reg``). ``"float16"``: half the
        size, for inference: the whitening factors (current ``reg``) rounded to float16,
        which the detector also scores with (scores within about 1e-3 relative).
    batch_size : int, default=32
        Images per step when fitting and scoring.
    device : str or torch.device, default="auto"
        Where fitting and scoring run; ``"auto"`` uses CUDA when available. Pickles
        hold NumPy arrays and load on any machine.
    max_memory : float, default=6.0
        GiB the fitted arrays may take in memory (``8 d + 2 d (d + 1)`` bytes per
        position for the statistics, as much again for the Gaussians). Past it the
        statistics go to ``store``, or without one the Gaussians replace them (the
        detector then cannot :meth:`partial_fit`, :meth:`merge` or change ``reg``);
        Gaussians larger than it need ``store``. The default holds a 2048 x 2048
        image's grid at ``d=100``; see the high-resolution guide.
    texture_tile : int, (int, int) or None, default=None
        Texture mode, for surfaces where a defect can be anywhere: one set of Gaussians
        for a tile of this many feature-grid cells, every tile of every training image
        a sample, the maps stitched back from the tiles (an extra row or column of tiles
        aligned to the far edge where the tile does not divide the grid). ``None``:
        PaDiM's Gaussian per position of the whole grid. See the high-resolution guide.
    store : str, path or None, default=None
        A folder for the arrays that do not fit in ``max_memory``, read and written a
        chunk of positions at a time. Each fit writes a subfolder, marked complete at
        the end; a completed fit deletes earlier fits' files, a failed one its own.

    Attributes
    ----------
    statistics_ : sk_padim.core.statistics.PatchStatistics or None
        Count, per-position mean (float64) and packed scatter (float32) of the training
        features, positions in row-major order; None in a model that keeps its
        Gaussians only.
    n_samples_seen_ : int
        Number of training images.
    n_features_in_ : int
        Number of channels ``d`` of the features.
    feature_shape_ : tuple of int
        ``(d, h, w)`` of the training features.
    threshold_ : float
        See ``threshold`` and ``false_alarm_rate``.
    pixel_threshold_ : float
        See ``pixel_quantile``.
    training_scores_ : ndarray of shape (n,), float32
        Each training image's score under the model fitted without it (exact rank-one
        downdates, :func:`sk_padim.core.statistics.held_out_distances`), in order: what
        the thresholds, :func:`sk_padim.p_values` and :func:`sk_padim.drift_report`
        compare new scores with. Set from two training images.
    threshold_rule_ : dict
        How ``threshold_`` was set: ``rule`` (``"false_alarm_rate"``,
        ``"highest_training_score"`` or ``"given"``), ``false_alarm_rate`` (asked),
        ``implied_false_alarm_rate`` (promised on good images, or None),
        ``n_training_images`` and ``pixel_quantile``.
    suspect_indices_ : ndarray of shape (n_suspects,), int
        Training images whose held-out score is an outlier among the training scores:
        perhaps defective parts; :meth:`fit` warns of them
        (:class:`~sk_padim.conformal.SuspectTrainingImagesWarning`). Refit without them
        with ``fit(X, y)``, ``y`` 1 at these indices.

    See Also
    --------
    PatchFeatureTransformer : Makes the features this detector takes.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PadimDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 5, 4, 4)).astype(np.float32)
    >>> detector = PadimDetector().fit(X)
    >>> detector.score_samples(X[:2]).shape
    (2, 16, 16)
    >>> bool(detector.decision_function(X[:1] + 10)[0] > detector.threshold_)
    True

    A threshold that flags at most 10 % of good images like the training ones:

    >>> detector = PadimDetector(false_alarm_rate=0.1).fit(X)
    >>> detector.threshold_rule_["rule"], detector.training_scores_.shape
    ('false_alarm_rate', (20,))
    >>> detector.threshold_rule_["implied_false_alarm_rate"] <= 0.1
    True
    """

    _parameter_constraints: dict = {
        "reg": [Interval(Real, 0, None, closed="neither")],
        "sigma": [Interval(Real, 0, None, closed="left")],
        "truncate": [Interval(Real, 0, None, closed="neither")],
        "map_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "threshold": [Real, None],
        "false_alarm_rate": [Interval(Real, 0, 1, closed="neither"), None],
        "pixel_quantile": [Interval(Real, 0, 1, closed="both")],
        "covariance_dtype": [StrOptions({"float32", "float16"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "max_memory": [Interval(Real, 0, None, closed="neither")],
        "texture_tile": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "store": [str, os.PathLike, None],
    }

    def __init__(
        self,
        reg: float = 0.01,
        sigma: float = 4.0,
        truncate: float = 4.0,
        map_size: int | tuple[int, int] | None = None,
        threshold: float | None = None,
        false_alarm_rate: float | None = None,
        pixel_quantile: float = 0.999,
        covariance_dtype: str = "float32",
        batch_size: int = 32,
        device: str | torch.device = "auto",
        max_memory: float = 6.0,
        texture_tile: int | tuple[int, int] | None = None,
        store: str | os.PathLike | None = None,
    ):
        self.reg = reg
        self.sigma = sigma
        self.truncate = truncate
        self.map_size = map_size
        self.threshold = threshold
        self.false_alarm_rate = false_alarm_rate
        self.pixel_quantile = pixel_quantile
        self.covariance_dtype = covariance_dtype
        self.batch_size = batch_size
        self.device = device
        self.max_memory = max_memory
        self.texture_tile = texture_tile
        self.store = store

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the per-position Gaussians on features of normal images.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, d, h, w)
            Features of normal images, e.g. from :class:`PatchFeatureTransformer`.
        y : array-like of shape (n,) or (n, H, W), default=None
            Image labels (1 = anomalous) or pixel masks: only normal images are fitted
            on (so a refit by ``GridSearchCV`` on labelled data learns no defects).

        Returns
        -------
        self : PadimDetector
            The fitted detector.
        """
        params = self._checked_params()
        features = check_features(X)
        if y is not None:
            features = features[torch.as_tensor(normal_rows(y, len(features)))]
        device = resolve_device(self.device)
        batches = functools.partial(feature_batches, features, self.batch_size, device)
        self._set_fitted(fit_passes(batches, device, params))
        warn_of_suspects(self, stacklevel=4)  # past fit and _fit_context
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_batches(self, make_batches: Callable[[], Iterable]) -> PadimDetector:
        """Fit on features that come a batch at a time, holding one batch in memory.

        The model equals :meth:`fit` on all the batches at once (to float32 rounding),
        thresholds included: ``make_batches`` is called twice (for the statistics, then
        for the training images' scores) and must give the same features both times.
        Memory holds the fitted arrays and one batch; :func:`sk_padim.fit_streaming` fits
        a pipeline this way. A failed fit leaves the detector unchanged.

        Parameters
        ----------
        make_batches : callable
            Called with no argument, returns an iterable of feature arrays or tensors
            ``(n_i, d, h, w)`` of normal images, all of one ``(d, h, w)``.

        Returns
        -------
        self : PadimDetector
            The fitted detector.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(20, 5, 4, 4)).astype(np.float32)
        >>> streamed = PadimDetector().fit_batches(lambda: np.split(X, 4))
        >>> bool(np.isclose(streamed.threshold_, PadimDetector().fit(X).threshold_))
        True
        """
        params = self._checked_params()
        device = resolve_device(self.device)
        batches = functools.partial(stream_feature_batches, make_batches, self.batch_size, device)
        self._set_fitted(fit_passes(batches, device, params))
        warn_of_suspects(self, stacklevel=4)  # past fit_batches and _fit_context
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add features of more normal images to the fitted statistics.

        Any split of the training images into calls gives the model of one :meth:`fit`
        (to float32 rounding), except the thresholds, set only from ``threshold`` (for
        those of :meth:`fit`, use :meth:`fit_batches`). A failed call leaves the model
        unchanged.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, d, h, w)
            Features of normal images.
        y : None
            Ignored; present for scikit-learn's API.

        Returns
        -------
        self : PadimDetector
            The detector, with the images added.
        """
        params = self._checked_params()  # scikit-learn skips the validation once fitted
        features = check_features(X)
        previous = None
        if hasattr(self, "n_samples_seen_"):
            check_feature_shape_matches(features, self.feature_shape_)
            previous = self._fitted_gaussians.trainable_statistics("train further")
        device = resolve_device(self.device)
        self._set_fitted(added_fit(previous, features, params, device))
        return self

    def merge(self, other: PadimDetector) -> PadimDetector:
        """A new detector fitted on the images of both ``self`` and ``other``.

        Fits of separate shards (other machines, Dask, Ray, Spark) merge into the model of
        one fit on all of them (to float32 rounding); the operands are left unchanged.

        Parameters
        ----------
        other : PadimDetector
            A fitted float32 detector with the same feature shape.

        Returns
        -------
        merged : PadimDetector
            A new detector fitted on both operands' images.
        """
        if not isinstance(other, PadimDetector):
            raise TypeError(f"Can only merge a PadimDetector; got {type(other).__name__}.")
        check_is_fitted(self)
        check_is_fitted(other)
        mine = self._fitted_gaussians.trainable_statistics("merge")
        theirs = other._fitted_gaussians.trainable_statistics("merge")
        if other.feature_shape_ != self.feature_shape_:
            raise ValueError(
                f"Cannot merge detectors fitted on features of shape {self.feature_shape_} "
                f"and {other.feature_shape_}; fit both with the same transformer settings."
            )
        merged = mine.merge(theirs.to(mine.device))
        return type(self).from_statistics(merged, self.feature_shape_, **self.get_params())

    @classmethod
    def from_statistics(
        cls,
        statistics: PatchStatistics,
        feature_shape: tuple[int, int, int],
        *,
        held_out_distances=None,
        **params,
    ) -> PadimDetector:
        """A fitted detector of given statistics, e.g. merged from fits elsewhere.

        Its Gaussians are factorised at the first scoring.

        Parameters
        ----------
        statistics : sk_padim.core.statistics.PatchStatistics
            Used as they are (not copied).
        feature_shape : tuple of int
            ``(d, h, w)`` of the features the statistics are of.
        held_out_distances : iterable of Tensor of shape (n_i, h, w), default=None
            Batches of the training images' leave-one-out distance grids (e.g. made by
            ranges of positions elsewhere and joined): the thresholds are then set from
            their maps, as :meth:`fit` sets them.
        **params
            The detector's parameters.

        Returns
        -------
        detector : PadimDetector
            A fitted detector.
        """
        detector = cls(**params)
        checked = detector._checked_params()
        detector._set_fitted(statistics_fit(statistics, feature_shape, held_out_distances, checked))
        warn_of_suspects(detector, stacklevel=3)
        return detector

    def score_samples(self, X) -> np.ndarray | torch.Tensor:
        """Pixel anomaly maps; higher means more anomalous.

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of the images to score.

        Returns
        -------
        maps : ndarray or Tensor of shape (n, H, W), float32
            ``(H, W)`` is ``map_size``. A tensor on ``X``'s device when ``X`` is one.
        """
        return self._score(X, keep_maps=True)[0]

    def decision_function(self, X) -> np.ndarray | torch.Tensor:
        """Image anomaly scores, the maximum of each map (not kept); higher: more anomalous.

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of the images to score.

        Returns
        -------
        scores : ndarray or Tensor of shape (n,), float32
            A tensor on ``X``'s device when ``X`` is one.
        """
        return self._score(X, keep_maps=False)[1]

    def predict(self, X) -> np.ndarray | torch.Tensor:
        """Label images: +1 normal, -1 anomalous (image score ``>= threshold_``).

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of the images to label.

        Returns
        -------
        labels : ndarray or Tensor of shape (n,), int
            +1 for normal images, -1 for anomalous ones.
        """
        check_is_fitted(self)
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                "threshold_ is not set: fit sets it from two images or more (partial_fit "
                "and merge do not). Set threshold=<float>, fit on two or more images, or "
                "calibrate with F1ThresholdCalibrator."
            )
        scores = self.decision_function(X)
        where = torch.where if isinstance(scores, torch.Tensor) else np.where
        return where(scores >= self.threshold_, -1, 1)

    def to_module(self, device: str | torch.device | None = None) -> PatchScorer:
        """Give the fitted detector as a torch module: features -> (maps, scores).

        Shared by threads; it pickles on its own (e.g. to Dask workers).

        Parameters
        ----------
        device : str or torch.device, default=None
            ``None`` uses the ``device`` parameter.

        Returns
        -------
        scorer : sk_padim.core.model.PatchScorer
            The Gaussians and the map generator, on ``device``.
        """
        check_is_fitted(self)
        params = self._checked_params()
        device = resolve_device(self.device if device is None else device)
        maps = map_generator(self.feature_shape_, params, device)
        gaussians = scoring_gaussians(
            self._gaussians(device), self.feature_shape_, self.texture_tile
        )
        return PatchScorer(gaussians, maps)

    def fitted_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Give the fitted state as NumPy arrays and a JSON-able record (for file formats).

        Returns
        -------
        arrays : dict of str to ndarray
            ``"mean"`` and ``"scatter"`` (float32 models that keep statistics), else
            ``"mean"`` and ``"packed_factor"``.
        record : dict
            Counts, shapes, thresholds, how they were set and the training scores.
        """
        check_is_fitted(self)
        if self.covariance_dtype == "float32" and self.statistics_ is not None:
            return self.statistics_.arrays(), fitted_record(self)
        return self._gaussians(resolve_device(self.device)).arrays(), fitted_record(self)

    @classmethod
    def from_fitted_state(cls, params: dict, arrays: dict, record: dict) -> PadimDetector:
        """Rebuild a detector from :meth:`fitted_state`'s arrays and record.

        Parameters
        ----------
        params : dict
            The detector's parameters (``get_params()``).
        arrays, record : dict
            What :meth:`fitted_state` gave.

        Returns
        -------
        detector : PadimDetector
            Fitted as the detector the state came from; a ``ValueError`` if the arrays
            and the record disagree (shapes, dtypes, non-finite values).
        """
        detector = cls(**params)
        detector._set_fitted(state_fit(arrays, record, detector._checked_params()))
        return detector

    def _set_fitted(self, fit: Fit) -> None:
        """Replace the fitted state at once; the thresholds are fitted attributes by name."""
        for name in THRESHOLD_ATTRIBUTES:
            vars(self).pop(name, None)
        self.n_samples_seen_, self.n_features_in_ = int(fit.count), int(fit.shape[0])
        self.feature_shape_ = tuple(int(size) for size in fit.shape)
        self.statistics_ = fit.statistics
        self._fitted_gaussians = FittedGaussians(fit.statistics, fit.gaussians, self.reg)
        for name, value in fit.thresholds.items():
            setattr(self, name, value)

    def _gaussians(self, device: torch.device) -> PatchGaussians:
        """The fitted Gaussians on ``device``, factorised or moved there once."""
        return self._fitted_gaussians.get(
            device, self.reg, self.covariance_dtype, self.max_memory, self.store
        )

    def _score(self, X, keep_maps: bool):
        check_is_fitted(self)
        features = check_features(X)
        check_feature_shape_matches(features, self.feature_shape_)
        device = resolve_device(self.device)
        # Tensors in, tensors out (on the input's device); NumPy otherwise.
        out_device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
        batches = feature_batches(features, self.batch_size, device)
        maps, scores = self.to_module(device).score_batches(
            batches, len(features), out_device, keep_maps
        )
        if isinstance(X, torch.Tensor):
            return maps, scores
        return (None if maps is None else maps.numpy()), scores.numpy()

    def _checked_params(self) -> dict:
        """The parameters, validated (``set_params`` may have run since ``fit``)."""
        self._validate_params()
        if self.map_size is not None:
            size_pair(self.map_size, "map_size")
        return self.get_params()

    def __getstate__(self):
        state = super().__getstate__()
        if self.covariance_dtype == "float16" and state.get("statistics_") is not None:
            # Saved as the rounded whitening factors, half the bytes (covariance_dtype).
            gaussians = self._gaussians(resolve_device(self.device))
            state.update(
                statistics_=None, _fitted_gaussians=FittedGaussians(None, gaussians, self.reg)
            )
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags
