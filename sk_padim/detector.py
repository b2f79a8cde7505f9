"""PadimDetector: a Gaussian per patch position, scored by Mahalanobis distance."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sk_padim._checks import image_labels
from sk_padim.devices import PerDeviceCache, as_tensor, resolve_device
from sk_padim.images import size_pair
from sk_padim.mahalanobis import PatchGaussians
from sk_padim.model import PatchScorer
from sk_padim.postprocess import AnomalyMapGenerator
from sk_padim.statistics import PatchStatistics, all_finite
from sk_padim.versioning import VersionedPickleMixin

_OVERFLOW = (
    "The features are too large for float32 statistics (their squares overflow); scale "
    "them down, e.g. by a constant factor."
)
_TRANSFORMER_HINT = (
    "PadimDetector takes patch features (n, d, h, w), not images: put a "
    "PatchFeatureTransformer before it, e.g. Pipeline([('feat', PatchFeatureTransformer()), "
    "('padim', PadimDetector())])."
)


class PadimDetector(VersionedPickleMixin, OutlierMixin, BaseEstimator):
    """PaDiM: a multivariate Gaussian per patch position of the feature grid.

    Fitting accumulates, per position, the count, mean and scatter of the training
    feature vectors (:class:`~sk_padim.statistics.PatchStatistics`: streaming and
    mergeable, memory independent of the number of images); the covariance is
    ``scatter / (N - 1) + reg * I``. Scoring computes at each position the Mahalanobis
    distance (the square root) to that position's Gaussian, upsamples the grid
    bilinearly to ``map_size`` and smooths it with a Gaussian of ``sigma``; the image
    score is the maximum of the map.

    Features may be NumPy arrays, torch tensors (on any device) or the
    :class:`~sk_padim.devices.DeviceFeatures` a GPU transformer returns; results are
    tensors (on the input's device) for tensor input, NumPy arrays otherwise. Scoring
    is re-entrant: any number of threads may score one fitted detector.

    **Sign convention**: both :meth:`score_samples` and :meth:`decision_function` are
    *higher for more anomalous* inputs, as in PaDiM, anomalib and PyOD. This is the
    opposite of scikit-learn's own outlier detectors; :meth:`predict` follows
    scikit-learn (+1 normal, -1 anomalous).

    Parameters
    ----------
    reg : float, default=0.01
        Added to the diagonal of every covariance. It is applied when the statistics
        are factorised, so changing it on a fitted detector (``set_params``) rescores
        with the new value without refitting.
    sigma : float, default=4.0
        Standard deviation, in map pixels, of the Gaussian smoothing; 0 disables it.
    truncate : float, default=4.0
        The smoothing kernel is cut at ``truncate * sigma`` (scipy's convention).
    map_size : int, (int, int) or None, default=None
        Size of the anomaly maps. ``None`` gives four times the feature grid, which is
        the transformer's ``image_size`` for layers whose first one has stride 4 (the
        default layers of every registered backbone).
    threshold : float or None, default=None
        Image score from which (``>=``) :meth:`predict` says anomalous. ``None``:
        :meth:`fit` sets ``threshold_`` to the highest score of a training image under
        the model fitted without that image (leave-one-out; it needs two images or
        more), so that normal images like the training ones are rarely flagged. The
        held-out Gaussians are exact rank-one downdates of the fitted ones, so this
        costs one scoring pass over the training features, not a refit (see
        :func:`sk_padim.statistics.held_out_distances`). :meth:`partial_fit` and
        :meth:`merge` do not score training images and set ``threshold_`` only from an
        explicit ``threshold``. For a threshold tuned on labelled data, use
        :class:`sk_padim.F1ThresholdCalibrator`.
    pixel_quantile : float, default=0.999
        :meth:`fit` sets ``pixel_threshold_``, the pixel score that defect regions are
        cut at, to this quantile of the pixels of the training images' leave-one-out
        maps (the same maps as ``threshold_``'s). On normal images like the training
        ones, a fraction ``1 - pixel_quantile`` of pixels (0.1 % by default) is expected
        at or above it: the false-positive pixel rate it implies. No defect masks are
        needed; with masks, :class:`sk_padim.F1ThresholdCalibrator` (``level="pixel"``)
        tunes a pixel threshold instead.
    covariance_dtype : {"float32", "float16"}, default="float32"
        How the fitted Gaussians are stored. ``"float32"``: the statistics
        (``statistics_``), so the model can be merged, trained further with
        :meth:`partial_fit` and rescored with another ``reg``. ``"float16"``: half the
        size, for inference only: the covariances are factorised at the end of the fit
        (with the current ``reg``) and only their whitening factors are kept, in
        float16 (``statistics_`` is None). Rounding the factors leaves the scores within
        about 1e-3 relative; rounding the covariances instead would be amplified by their
        conditioning when inverted (image AUROC 0.97 -> 0.61 at ``d=550`` with 64
        training images; docs/performance.md).
    batch_size : int, default=32
        Images per step when fitting and scoring.
    device : str or torch.device, default="auto"
        Where fitting and scoring run; ``"auto"`` uses CUDA when available. Pickled
        models hold NumPy arrays, so they load on any machine. Features given as torch
        tensors (on any device) are moved there batch by batch.

    Attributes
    ----------
    statistics_ : sk_padim.statistics.PatchStatistics or None
        Count, per-position mean (float64) and packed scatter (float32) of the training
        features, positions in row-major order; None for ``covariance_dtype="float16"``.
    n_samples_seen_ : int
        Number of training images.
    n_features_in_ : int
        Number of channels ``d`` of the features.
    feature_shape_ : tuple of int
        ``(d, h, w)`` of the training features.
    threshold_ : float
        See ``threshold``.
    pixel_threshold_ : float
        See ``pixel_quantile``.

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
    """

    _parameter_constraints: dict = {
        "reg": [Interval(Real, 0, None, closed="neither")],
        "sigma": [Interval(Real, 0, None, closed="left")],
        "truncate": [Interval(Real, 0, None, closed="neither")],
        "map_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "threshold": [Real, None],
        "pixel_quantile": [Interval(Real, 0, 1, closed="both")],
        "covariance_dtype": [StrOptions({"float32", "float16"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str, torch.device],
    }

    def __init__(
        self,
        reg: float = 0.01,
        sigma: float = 4.0,
        truncate: float = 4.0,
        map_size: int | tuple[int, int] | None = None,
        threshold: float | None = None,
        pixel_quantile: float = 0.999,
        covariance_dtype: str = "float32",
        batch_size: int = 32,
        device: str | torch.device = "auto",
    ):
        self.reg = reg
        self.sigma = sigma
        self.truncate = truncate
        self.map_size = map_size
        self.threshold = threshold
        self.pixel_quantile = pixel_quantile
        self.covariance_dtype = covariance_dtype
        self.batch_size = batch_size
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the per-position Gaussians on features of normal images.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, d, h, w)
            Features of normal images, e.g. from :class:`PatchFeatureTransformer`.
        y : array-like of shape (n,) or (n, H, W), default=None
            Optional image labels (1 = anomalous) or pixel masks. When given, only the
            normal images (label 0, empty mask) are fitted on, so that a pipeline refitted
            by ``GridSearchCV`` on labelled data never learns its defects as normal.

        Returns
        -------
        self : PadimDetector
            The fitted detector.
        """
        self._check_map_size()
        features = _check_features(X)
        if y is not None:
            features = features[torch.as_tensor(_normal_rows(y, len(features)))]
        device = resolve_device(self.device)
        # Everything is computed before any attribute changes, so that an error or an
        # interrupt leaves the detector as it was.
        stats = self._accumulate(features, None, device)
        gaussians = stats.gaussians(self.reg, self.covariance_dtype)
        thresholds = (self.threshold, None)
        if stats.count >= 2:
            thresholds = self._held_out_thresholds(stats, gaussians, features, device)
        else:
            warnings.warn(
                "Fitting on one image: its covariances are reg * I and threshold_ and "
                "pixel_threshold_ stay unset (they need two images or more). Fit on more "
                "images of good parts.",
                UserWarning,
                stacklevel=3,  # the caller of fit, past scikit-learn's _fit_context
            )
        kept = None if self.covariance_dtype == "float16" else stats
        self._set_fitted(features.shape[1:], stats.count, kept, gaussians, thresholds)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add features of more normal images to the fitted statistics.

        Any split of the training images into ``partial_fit`` calls gives the model that
        one :meth:`fit` gives (to float32 rounding), except ``threshold_``, set only from
        an explicit ``threshold``. The covariances are factorised at the next scoring,
        so score after the last call rather than between calls. If the call fails, the
        model is unchanged. Only one call's features are in memory at a time: this is
        how :func:`sk_padim.fit_streaming` fits on more images than fit in memory.

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
        self._validate_params()  # scikit-learn skips it once fitted; set_params may have run
        self._check_map_size()
        features = _check_features(X)
        device = resolve_device(self.device)
        previous = None
        if hasattr(self, "n_samples_seen_"):
            previous = self._trainable_statistics("train further").to(device).copy()
            _check_feature_shape_matches(features, self.feature_shape_)
        stats = self._accumulate(features, previous, device)
        self._set_fitted(features.shape[1:], stats.count, stats, thresholds=(self.threshold, None))
        return self

    def merge(self, other: PadimDetector) -> PadimDetector:
        """A new detector fitted on the images of both ``self`` and ``other``.

        The statistics of two fits combine exactly (to float32 rounding), so fits of
        separate shards of a dataset, on other machines or by other engines (Dask, Ray,
        Spark), merge into the model of one fit on all of it. Both operands are left
        unchanged. The result keeps this detector's parameters; like
        :meth:`partial_fit`, it sets ``threshold_`` only from an explicit ``threshold``.

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
        mine = self._trainable_statistics("merge")
        theirs = other._trainable_statistics("merge")
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

        Its Gaussians are factorised at the first scoring. ``threshold_`` is set from an
        explicit ``threshold``, or else, as :meth:`fit` sets it, from the held-out
        distances of the training images when they are given.

        Parameters
        ----------
        statistics : sk_padim.statistics.PatchStatistics
            Used as they are (not copied).
        feature_shape : tuple of int
            ``(d, h, w)`` of the features the statistics are of.
        held_out_distances : iterable of Tensor of shape (n_i, h, w), default=None
            Batches of the training images' leave-one-out distance grids
            (:meth:`sk_padim.statistics.PatchStatistics.held_out_distances`, e.g. made
            by range of positions on other machines and joined): ``threshold_`` is then
            the highest image score of their maps, as after :meth:`fit`.
        **params
            The detector's parameters.

        Returns
        -------
        detector : PadimDetector

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(10, 3, 2, 2)).astype(np.float32)
        >>> left, right = PadimDetector().fit(X[:6]), PadimDetector().fit(X[6:])
        >>> merged = left.statistics_.merge(right.statistics_)
        >>> detector = PadimDetector.from_statistics(merged, (3, 2, 2), threshold=5.0)
        >>> whole = PadimDetector().fit(X)
        >>> bool(np.allclose(detector.score_samples(X), whole.score_samples(X), atol=1e-4))
        True
        """
        detector = cls(**params)
        detector._validate_params()
        detector._check_map_size()
        d, h, w = (int(size) for size in feature_shape)
        if (statistics.n_positions, statistics.n_features) != (h * w, d):
            raise ValueError(
                f"Statistics of {statistics.n_positions} positions and "
                f"{statistics.n_features} features do not fit feature_shape={feature_shape}."
            )
        thresholds = (detector.threshold, None)
        if held_out_distances is not None:
            device = resolve_device(detector.device)
            thresholds = detector._thresholds_of(
                held_out_distances, (d, h, w), statistics.count, device
            )
        half = detector.covariance_dtype == "float16"
        gaussians = statistics.gaussians(detector.reg, "float16") if half else None
        kept = None if half else statistics
        detector._set_fitted((d, h, w), statistics.count, kept, gaussians, thresholds)
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
        """Image anomaly scores, the maximum of each map; higher means more anomalous.

        The maps are made a batch at a time and not kept.

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
                "threshold_ is not set: partial_fit, merge and from_statistics do not score "
                "training images, and fit needs two images or more to set it. Set "
                "threshold=<float>, fit on two or more images, or calibrate with "
                "F1ThresholdCalibrator."
            )
        scores = self.decision_function(X)
        if isinstance(scores, torch.Tensor):
            return torch.where(scores >= self.threshold_, -1, 1)
        return np.where(scores >= self.threshold_, -1, 1)

    def to_module(self, device: str | torch.device | None = None) -> PatchScorer:
        """The fitted detector as a torch module on ``device``: features -> (maps, scores).

        The Gaussians are factorised once per device and ``reg`` and shared: the first
        call after :meth:`partial_fit` factorises the covariances while concurrent
        callers wait, and later calls return at once. The module follows the current
        ``sigma``, ``truncate`` and ``map_size``; it pickles without the detector (e.g.
        to send a fitted model to Dask workers) and holds what an ONNX export needs.

        Parameters
        ----------
        device : str or torch.device, default=None
            ``None`` uses the ``device`` parameter.

        Returns
        -------
        scorer : sk_padim.model.PatchScorer
            The Gaussians and the map generator, on ``device``.
        """
        check_is_fitted(self)
        self._validate_params()  # set_params may have run since fit
        self._check_map_size()
        device = resolve_device(self.device if device is None else device)
        maps = self._map_generator(self.feature_shape_, device)
        return PatchScorer(self._gaussians(device), maps)

    def fitted_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Give the fitted state as NumPy arrays and a JSON-able record (for file formats).

        Returns
        -------
        arrays : dict of str to ndarray
            ``"mean"`` and ``"scatter"`` (float32 models) or ``"mean"`` and
            ``"packed_factor"`` (float16 models).
        record : dict
            Counts, shapes, ``threshold_`` and the ``reg`` of stored factors.

        See Also
        --------
        from_fitted_state : The inverse.
        """
        check_is_fitted(self)
        record = {
            "n_samples_seen_": int(self.n_samples_seen_),
            "feature_shape_": [int(size) for size in self.feature_shape_],
        }
        for name in ("threshold_", "pixel_threshold_"):
            if hasattr(self, name):
                record[name] = float(getattr(self, name))
        if self.statistics_ is not None:
            return self.statistics_.arrays(), record
        gaussians = self._stored_gaussians
        record["factor_reg_"] = float(self._factor_reg)
        arrays = {
            "mean": gaussians.mean64().cpu().numpy(),
            "packed_factor": gaussians.packed_factor_values().cpu().numpy(),
        }
        return arrays, record

    @classmethod
    def from_fitted_state(cls, params: dict, arrays: dict, record: dict) -> PadimDetector:
        """Rebuild a detector from :meth:`fitted_state`'s arrays and record.

        Parameters
        ----------
        params : dict
            The detector's parameters (``get_params()``).
        arrays : dict of str to ndarray
            The arrays of :meth:`fitted_state`.
        record : dict
            The record of :meth:`fitted_state`.

        Returns
        -------
        detector : PadimDetector
            Fitted, scoring as the detector the state came from.

        Raises
        ------
        ValueError
            If the arrays and record are inconsistent (shapes, dtypes, non-finite values).

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(10, 3, 2, 2)).astype(np.float32)
        >>> detector = PadimDetector().fit(X)
        >>> copy = PadimDetector.from_fitted_state(detector.get_params(),
        ...                                        *detector.fitted_state())
        >>> bool(np.array_equal(copy.score_samples(X), detector.score_samples(X)))
        True
        """
        detector = cls(**params)
        shape = tuple(int(size) for size in record["feature_shape_"])
        count = int(record["n_samples_seen_"])
        if "packed_factor" in arrays:
            if detector.covariance_dtype != "float16":
                raise ValueError("whitening factors are stored only for float16 models")
            gaussians = PatchGaussians.from_packed(arrays["mean"], arrays["packed_factor"])
            _check_gaussians_shape(gaussians, shape)
            detector._set_fitted(
                shape, count, None, gaussians, factor_reg=float(record["factor_reg_"])
            )
        else:
            stats = PatchStatistics.from_arrays(count, arrays["mean"], arrays["scatter"])
            if (stats.n_positions, stats.n_features) != (shape[1] * shape[2], shape[0]):
                raise ValueError(f"the statistics do not fit feature_shape_={shape}")
            detector._set_fitted(shape, count, stats)
        for name in ("threshold_", "pixel_threshold_"):
            if name in record:
                setattr(detector, name, float(record[name]))
        return detector

    def _trainable_statistics(self, action: str) -> PatchStatistics:
        check_is_fitted(self)
        if self.statistics_ is None:
            raise ValueError(
                f"This detector keeps only whitening factors (covariance_dtype='float16'), "
                f"not its statistics, so it cannot {action}. Use a detector fitted with "
                "covariance_dtype='float32'."
            )
        return self.statistics_

    def _accumulate(self, features: torch.Tensor, stats, device) -> PatchStatistics:
        """``stats`` (or new statistics on ``device``) with every batch of features added."""
        d, h, w = features.shape[1:]
        if stats is None:
            stats = PatchStatistics.empty(h * w, d, device)
        for batch in self._batches(features, device):
            stats.update(batch)
        if not all_finite(stats.scatter):
            raise FloatingPointError(_OVERFLOW)
        return stats

    def _held_out_thresholds(self, stats, gaussians, features, device) -> tuple[float, float]:
        """``threshold_`` and ``pixel_threshold_`` from the training images' held-out maps.

        Scores of the training images under the model fitted on all of them are far too
        low (with fewer images than ``d``, each one lies almost in its own Gaussian's
        support), so their maximum would flag every new image; leave-one-out scores are
        what a new normal image gets.
        """
        gaussians = gaussians.to(device)
        with torch.inference_mode():
            grids = (
                stats.held_out_distances(gaussians, batch)
                for batch in self._batches(features, device)
            )
            return self._thresholds_of(grids, features.shape[1:], len(features), device)

    def _thresholds_of(self, grids, shape, n_images: int, device) -> tuple[float, float]:
        """The explicit ``threshold`` or the highest image score of the maps of held-out
        distance grids (an iterable of batches), and the ``pixel_quantile`` of their pixels.

        The quantile is exact (NumPy's linear interpolation) from the largest pixel
        values alone, so memory does not grow with the images.
        """
        maps = self._map_generator(shape, device)
        height, width = self._map_size(shape)
        total = n_images * height * width
        rank = self.pixel_quantile * (total - 1)
        keep = total - math.floor(rank)  # the values from rank's lower neighbour up
        highest, top = -math.inf, torch.empty(0, device=device)
        with torch.inference_mode():
            for batch in grids:
                batch_maps, scores = maps.maps_and_scores(batch.to(device))
                highest = max(highest, float(scores.max()))
                values = torch.cat([top, batch_maps.flatten()])
                top = torch.topk(values, min(keep, len(values)), sorted=False).values
        ascending = np.sort(top.double().cpu().numpy())
        fraction = rank - math.floor(rank)
        pixel = ascending[0] + fraction * (ascending[min(1, len(ascending) - 1)] - ascending[0])
        threshold = highest if self.threshold is None else self.threshold
        return float(threshold), float(pixel)

    def _set_fitted(
        self,
        shape,
        count: int,
        statistics,
        gaussians=None,
        thresholds=(None, None),
        factor_reg=None,
    ) -> None:
        """Replace the fitted state at once.

        ``statistics`` (None for float16 models) and/or ``gaussians``, factorised with
        ``factor_reg`` (default: ``reg``); without statistics the Gaussians are the model,
        with them they are kept only to score with. ``thresholds``: ``threshold_`` and
        ``pixel_threshold_``, each set unless None.
        """
        d, h, w = (int(size) for size in shape)
        vars(self).pop("threshold_", None)
        vars(self).pop("pixel_threshold_", None)
        self.n_samples_seen_ = int(count)
        self.n_features_in_ = d
        self.feature_shape_ = (d, h, w)
        self.statistics_ = statistics
        self._gaussians_by_device = PerDeviceCache()
        if statistics is None:
            self._stored_gaussians = gaussians
            self._factor_reg = float(self.reg if factor_reg is None else factor_reg)
        elif gaussians is not None:
            self._gaussians_by_device.put((gaussians.mean_high.device, self.reg), gaussians)
        threshold, pixel_threshold = thresholds
        if threshold is not None:
            self.threshold_ = float(threshold)
        if pixel_threshold is not None:
            self.pixel_threshold_ = float(pixel_threshold)

    def _gaussians(self, device: torch.device) -> PatchGaussians:
        """The fitted Gaussians on ``device``, factorised or moved there once."""
        if self.statistics_ is None and self.reg != self._factor_reg:
            raise ValueError(
                f"This float16 detector was factorised with reg={self._factor_reg}; it "
                f"cannot score with reg={self.reg}. Set reg back, or refit."
            )

        def build() -> PatchGaussians:
            if self.statistics_ is None:
                return self._stored_gaussians.to(device)
            return self.statistics_.to(device).gaussians(self.reg)

        return self._gaussians_by_device.get((device, self.reg), build)

    def _score(self, X, keep_maps: bool):
        check_is_fitted(self)
        features = _check_features(X)
        _check_feature_shape_matches(features, self.feature_shape_)
        device = resolve_device(self.device)
        scorer = self.to_module(device)
        # Tensors in, tensors out (on the input's device); NumPy otherwise.
        target = X.device if isinstance(X, torch.Tensor) else None
        out_device = target or torch.device("cpu")
        scores = torch.empty(len(features), device=out_device)
        maps = None
        if keep_maps:
            maps = torch.empty((len(features), *self._map_size()), device=out_device)
        start = 0
        for batch in self._batches(features, device):
            with torch.inference_mode():
                batch_maps, batch_scores = scorer(batch)
            stop = start + len(batch)
            if keep_maps:
                maps[start:stop] = batch_maps
            scores[start:stop] = batch_scores
            start = stop
        if target is None:
            return (maps.numpy() if keep_maps else None), scores.numpy()
        return maps, scores

    def _batches(self, features: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
        """``batch_size`` rows of the features at a time, float32 on ``device``, checked."""
        for start in range(0, len(features), self.batch_size):
            rows = features[start : start + self.batch_size]
            batch = rows.to(device=device, dtype=torch.float32)
            if not all_finite(batch):
                if bool(torch.isfinite(rows).all()):
                    raise ValueError(
                        "Features reach values beyond float32's range; scale them down."
                    )
                raise ValueError(
                    "Features contain NaN or infinite values; check the images and the backbone."
                )
            yield batch

    def _map_generator(self, shape, device: torch.device) -> AnomalyMapGenerator:
        generator = AnomalyMapGenerator(shape[1:], self._map_size(shape), self.sigma, self.truncate)
        return generator.to(device)

    def _map_size(self, shape=None) -> tuple[int, int]:
        if self.map_size is not None:
            return size_pair(self.map_size, "map_size")
        _, h, w = self.feature_shape_ if shape is None else shape
        return (4 * h, 4 * w)

    def _check_map_size(self) -> None:
        if self.map_size is not None:
            size_pair(self.map_size, "map_size")

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gaussians_by_device", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "n_samples_seen_" in state:
            self._gaussians_by_device = PerDeviceCache()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags


def _normal_rows(y, n_samples: int) -> np.ndarray:
    anomalous = image_labels(y)
    if len(anomalous) != n_samples:
        raise ValueError(f"y has {len(anomalous)} entries but X has {n_samples} images.")
    if anomalous.all():
        raise ValueError("Every image in y is anomalous; fit needs normal images (label 0).")
    return ~anomalous


def _check_features(X) -> torch.Tensor:
    """The features as a tensor (a view of a NumPy array, or the given tensor), checked."""
    features = as_tensor(X)
    if features is None:
        features = torch.from_numpy(_feature_array(X))
    elif not features.dtype.is_floating_point:
        raise TypeError(
            f"Features must be floating point; got a tensor of dtype {features.dtype}. "
            f"{_TRANSFORMER_HINT}"
        )
    _check_feature_shape(tuple(features.shape))
    return features


def _check_feature_shape_matches(features: torch.Tensor, fitted_shape) -> None:
    shape = tuple(features.shape[1:])
    if shape == tuple(fitted_shape):
        return
    count = ""
    if shape[0] != fitted_shape[0]:  # scikit-learn's wording for the feature count
        count = f"X has {shape[0]} features, but PadimDetector is expecting {fitted_shape[0]} "
        count += "features as input. "
    raise ValueError(
        f"{count}Features have shape (d, h, w) = {shape} but the detector was fitted on "
        f"{tuple(fitted_shape)}; use the same transformer settings (n_features, layers, "
        "image_size) as for fitting."
    )


def _check_gaussians_shape(gaussians: PatchGaussians, shape) -> None:
    d, h, w = shape
    if (len(gaussians), gaussians.n_features) != (h * w, d):
        raise ValueError(f"the stored Gaussians do not fit feature_shape_={shape}")


def _feature_array(X) -> np.ndarray:
    """A NumPy array of features: float (float64 is narrowed per batch), writable."""
    try:
        features = np.asarray(X)
    except ValueError as error:
        raise ValueError(
            "Features must be one array of shape (n, d, h, w); the items given have "
            "different shapes. Use PatchFeatureTransformer to make them."
        ) from error
    if features.dtype.kind in "iub":
        raise TypeError(
            f"Features must be floating point; got dtype {features.dtype}. {_TRANSFORMER_HINT}"
        )
    if features.dtype.kind != "f":
        raise TypeError(f"Features must be numeric; got dtype {features.dtype}.")
    if features.dtype == np.float16 or not features.flags.writeable:
        features = features.astype(np.float32)  # torch cannot wrap read-only arrays
    return features


def _check_feature_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ValueError(
            f"Expected features of shape (n, d, h, w); got shape {shape}. "
            "Pass images through PatchFeatureTransformer first."
        )
    if shape[0] == 0:
        raise ValueError("Got no feature maps (n = 0); pass at least one image's features.")
    if 0 in shape[1:]:
        raise ValueError(
            f"Features of shape {shape} have an empty axis (size 0); make "
            "them with PatchFeatureTransformer."
        )
    # Images (n, H, W, C): a last axis of 1, 3 or 4 after two large ones. A feature grid
    # 4 or fewer patches wide under 16 or more channels and rows is not a PaDiM layout.
    if shape[3] in (1, 3, 4) and min(shape[1:3]) >= 16:
        raise ValueError(
            f"Features of shape {shape} look like images (n, H, W, channels). {_TRANSFORMER_HINT}"
        )
