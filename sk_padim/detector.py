"""PadimDetector: a Gaussian per patch position, scored by Mahalanobis distance."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sk_padim._checks import image_labels
from sk_padim.devices import PerDeviceCache, as_tensor, resolve_device
from sk_padim.gaussian import (
    GaussianStatistics,
    all_finite,
    factorise_statistics,
    held_out_distances,
    merge_packed_covariances,
    pack_lower,
    unpack_upper,
    whitening_factor,
)
from sk_padim.mahalanobis import PatchGaussians, positions_per_chunk
from sk_padim.model import PatchScorer
from sk_padim.postprocess import AnomalyMapGenerator
from sk_padim.versioning import VersionedPickleMixin

_FITTED = (
    "n_samples_seen_",
    "n_features_in_",
    "feature_shape_",
    "mean_",
    "packed_covariance_",
    "packed_factor_",
    "factor_reg_",
    "threshold_",
)


class PadimDetector(VersionedPickleMixin, OutlierMixin, BaseEstimator):
    """PaDiM: a multivariate Gaussian per patch position of the feature grid.

    Fitting accumulates, per position, the count, mean and scatter of the training
    feature vectors in a streaming, mergeable form (memory independent of the number of
    images); the covariance is ``scatter / (N - 1) + reg * I``, factorised at the end of
    :meth:`fit` (and lazily, at the first scoring, after :meth:`partial_fit`,
    :meth:`fit_batches` or :meth:`merge`). Scoring computes at each
    position the Mahalanobis distance (the square root) to that position's Gaussian,
    upsamples the grid bilinearly to ``map_size`` and smooths it with a Gaussian of
    ``sigma``; the image score is the maximum of the map.

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
        :func:`sk_padim.gaussian.held_out_distances`; :meth:`held_out_scores` gives
        each image's score). :meth:`partial_fit`, :meth:`fit_batches` and :meth:`merge`
        do not score training images and leave it unset. For a threshold tuned on labelled data, use
        :class:`sk_padim.F1ThresholdCalibrator`.
    covariance_dtype : {"float32", "float16"}, default="float32"
        How the fitted Gaussians are stored. ``"float32"``: the covariances
        (``packed_covariance_``), so the model can be merged, trained further with
        :meth:`partial_fit` and rescored with another ``reg``. ``"float16"``: half the
        size, for inference only: each covariance is factorised at the end of the fit
        (with the current ``reg``) and its whitening factor is stored in float16
        (``packed_factor_``). Rounding the factor leaves the scores within about 1e-3
        relative; rounding the covariance instead would be amplified by its conditioning
        when it is inverted (image AUROC 0.97 -> 0.61 at ``d=550`` with 64 training
        images; docs/performance.md).
    batch_size : int, default=32
        Images per step when fitting and scoring.
    device : str or torch.device, default="auto"
        Where fitting and scoring run; ``"auto"`` uses CUDA when available. Fitted
        statistics are stored as NumPy arrays, so models load on any machine. Features
        given as torch tensors (on any device) are moved there batch by batch.

    Attributes
    ----------
    n_samples_seen_ : int
        Number of training images.
    n_features_in_ : int
        Number of channels ``d`` of the features.
    feature_shape_ : tuple of int
        ``(d, h, w)`` of the training features.
    mean_ : ndarray of shape (h * w, d), float64
        Per-position mean, positions in row-major order.
    packed_covariance_ : ndarray of shape (h * w, d * (d + 1) / 2), float32
        Per-position covariance (N - 1 normalised, without ``reg``), its lower triangle
        packed row by row (``torch.tril_indices`` order). With ``covariance_dtype="float32"``.
    packed_factor_ : ndarray of shape (h * w, d * (d + 1) / 2), float16 or float32
        Per-position whitening factor ``U`` (upper triangular, ``|(x - mean) @ U|`` is the
        distance) of the covariance plus ``reg * I``, its transpose packed like
        ``packed_covariance_``. With ``covariance_dtype="float16"`` (float16), and in a
        :meth:`scoring_copy` (float32).
    factor_reg_ : float
        The ``reg`` that ``packed_factor_`` was computed with.
    threshold_ : float
        See ``threshold``.

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
        covariance_dtype: str = "float32",
        batch_size: int = 32,
        device: str | torch.device = "auto",
    ):
        self.reg = reg
        self.sigma = sigma
        self.truncate = truncate
        self.map_size = map_size
        self.threshold = threshold
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
        """
        self._explicit_map_size()
        features = self._check_features(X)
        if y is not None:
            features = features[torch.as_tensor(_normal_rows(y, len(features)))]
        device = resolve_device(self.device)
        # The previous model's Gaussians would double the peak memory; its stored
        # attributes stay (a failed fit leaves them) and refactorise if needed.
        self._gaussians_by_device = PerDeviceCache()
        stats, shape = self._accumulate([features], None, device)
        # Everything is computed before any attribute changes, so that an error or an
        # interrupt leaves the detector as it was.
        fitted, gaussians = self._factorised(stats, shape)
        threshold = self.threshold
        if threshold is None and len(features) >= 2:
            scorer = PatchScorer(gaussians, self._map_generator(shape, device))
            batches = self._batches(features, device)
            threshold = float(_held_out_scores(scorer, batches, stats.count).max())
        self._adopt(fitted, threshold, gaussians, device)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add features of more normal images to the fitted statistics.

        Any split of the training images into ``partial_fit`` calls gives the model that
        one :meth:`fit` gives (to float32 rounding). The covariances are factorised
        again at the next scoring, so score after the last call rather than between
        calls. If the call fails, the model is unchanged. A ``covariance_dtype="float16"``
        detector keeps whitening factors, not statistics: it cannot be trained further
        once fitted.

        Parameters
        ----------
        X : array-like or Tensor of shape (n, d, h, w)
            Features of normal images.
        y : ignored

        Returns
        -------
        self : PadimDetector
        """
        self.check_params()  # scikit-learn skips it once fitted; set_params may have run
        previous = self.statistics() if hasattr(self, "n_samples_seen_") else None
        self._fit_lazily([X], previous)
        return self

    def fit_batches(self, batches: Iterable) -> PadimDetector:
        """Fit on feature batches given one at a time, e.g. chunks of a large image set.

        Equal to :meth:`fit` on the concatenation of the batches, except that the
        training images are not scored, so ``threshold_`` is set only from an explicit
        ``threshold`` and the factorisation waits for the first scoring. Only one batch
        is in memory at a time. Nothing changes unless every batch is valid.

        Parameters
        ----------
        batches : iterable of array-like or Tensor of shape (n_i, d, h, w)

        Returns
        -------
        self : PadimDetector
        """
        self.check_params()
        self._fit_lazily(batches, None)
        return self

    def accumulate(
        self, batches: Iterable, stats: GaussianStatistics | None = None
    ) -> GaussianStatistics:
        """Statistics of feature batches, checked as :meth:`fit` checks them; no model.

        For code that fits in pieces and combines the pieces itself (Dask): the result
        merges (``GaussianStatistics.merge``), and :meth:`set_statistics` makes it a
        model. The detector is not changed.

        Parameters
        ----------
        batches : iterable of array-like or Tensor of shape (n_i, d, h, w)
        stats : sk_padim.gaussian.GaussianStatistics, default=None
            Statistics to add the batches to (updated in place and returned); ``None``
            starts from none.

        Returns
        -------
        stats : sk_padim.gaussian.GaussianStatistics
            On the detector's device.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(6, 3, 2, 2)).astype(np.float32)
        >>> stats = PadimDetector().accumulate([X[:4], X[4:]])
        >>> stats.count, tuple(stats.scatter.shape)
        (6, (4, 3, 3))
        """
        self.check_params()
        return self._accumulate(batches, stats, resolve_device(self.device))[0]

    def check_params(self) -> PadimDetector:
        """Validate the parameters now (:meth:`fit` does it itself).

        For code that fits in pieces (streaming, Dask), so that a bad parameter fails
        before any work.

        Returns
        -------
        self : PadimDetector
        """
        self._validate_params()
        self._explicit_map_size()
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
            A fitted float32 detector (``covariance_dtype="float16"`` ones keep no
            statistics) with the same feature shape and the same ``reg`` and
            ``covariance_dtype``.

        Returns
        -------
        merged : PadimDetector
        """
        check_is_fitted(self)
        if not isinstance(other, PadimDetector):
            raise TypeError(f"Can only merge a PadimDetector; got {type(other).__name__}.")
        check_is_fitted(other)
        if other.feature_shape_ != self.feature_shape_:
            raise ValueError(
                f"Cannot merge detectors fitted on features of shape {self.feature_shape_} "
                f"and {other.feature_shape_}; fit both with the same transformer settings."
            )
        _check_same_model_settings(self, other, "merge")
        count, mean, covariance = merge_packed_covariances(
            self._packed_statistics(), other._packed_statistics()
        )
        merged = type(self)(**self.get_params())
        merged._adopt_packed(count, mean, covariance, self.feature_shape_)
        return merged

    def split_positions(self, n_parts: int) -> list[PadimDetector]:
        """The model cut into contiguous ranges of positions, a detector for each.

        The positions of the ``(h, w)`` grid, in row-major order, are cut into
        ``n_parts`` ranges of near-equal size (as ``np.array_split``); part ``k`` is a
        fitted detector of features ``(d, 1, p_k)`` holding those positions' Gaussians.
        Positions are independent, so each part merges (:meth:`merge`), factorises and
        scores its positions on its own, e.g. on another machine, and
        :meth:`join_positions` puts the parts back together. The parts' arrays are views
        of this model's (nothing is copied). ``threshold_`` is not carried over (it is a
        property of whole images).

        Parameters
        ----------
        n_parts : int
            Between 1 and the number of positions ``h * w``.

        Returns
        -------
        parts : list of PadimDetector

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(6, 3, 2, 5)).astype(np.float32)
        >>> parts = PadimDetector().fit(X).split_positions(3)
        >>> [part.feature_shape_ for part in parts]
        [(3, 1, 4), (3, 1, 3), (3, 1, 3)]
        >>> joined = PadimDetector.join_positions(parts, (3, 2, 5))
        >>> bool(np.array_equal(joined.mean_, PadimDetector().fit(X).mean_))
        True
        """
        count, mean, covariance = self._packed_statistics()
        d, h, w = self.feature_shape_
        if not isinstance(n_parts, Integral) or not 1 <= n_parts <= h * w:
            raise ValueError(f"n_parts must be an int from 1 to h * w = {h * w}; got {n_parts!r}.")
        parts = []
        for positions in np.array_split(np.arange(h * w), int(n_parts)):
            rows = slice(int(positions[0]), int(positions[-1]) + 1)
            part = type(self)(**self.get_params())
            part._adopt_packed(count, mean[rows], covariance[rows], (d, 1, len(positions)))
            parts.append(part)
        return parts

    @classmethod
    def join_positions(cls, parts, feature_shape) -> PadimDetector:
        """One detector from the parts of :meth:`split_positions`, in their order.

        Parameters
        ----------
        parts : sequence of PadimDetector
            Fitted on the same images (equal ``n_samples_seen_``) and features ``d``,
            with the same ``reg`` and ``covariance_dtype``; their positions, in order,
            cover the grid. The result has the first part's parameters.
        feature_shape : tuple of int
            ``(d, h, w)`` of the whole model's features.

        Returns
        -------
        detector : PadimDetector
        """
        parts = list(parts)
        if not parts or not all(isinstance(part, PadimDetector) for part in parts):
            raise TypeError("join_positions needs a non-empty list of fitted PadimDetector parts.")
        statistics = [part._packed_statistics() for part in parts]
        first = parts[0]
        for part in parts[1:]:
            _check_same_model_settings(first, part, "join")
        d, h, w = (int(size) for size in feature_shape)
        counts = {count for count, _, _ in statistics}
        n_positions = sum(len(mean) for _, mean, _ in statistics)
        if (
            len(counts) != 1
            or {part.n_features_in_ for part in parts} != {d}
            or n_positions != h * w
        ):
            raise ValueError(
                f"Cannot join parts of {sorted(counts)} images, {n_positions} positions and "
                f"{sorted({part.n_features_in_ for part in parts})} features into "
                f"feature_shape={tuple(feature_shape)}: join the parts of one split model."
            )
        joined = cls(**first.get_params())
        joined._adopt_packed(
            counts.pop(),
            torch.cat([mean for _, mean, _ in statistics]),
            torch.cat([covariance for _, _, covariance in statistics]),
            (d, h, w),
        )
        return joined

    def _packed_statistics(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Count, mean (float64) and packed covariance (float32) as CPU tensors (shared)."""
        check_is_fitted(self)
        if not hasattr(self, "packed_covariance_"):
            raise ValueError(
                "This detector stores whitening factors (covariance_dtype='float16', or a "
                "scoring_copy()), not its statistics, so it cannot be trained further, "
                "merged or split. Use a detector fitted with covariance_dtype='float32'."
            )
        mean, covariance = (
            _shared_tensor(array) for array in (self.mean_, self.packed_covariance_)
        )
        return self.n_samples_seen_, mean, covariance

    def _adopt_packed(self, count: int, mean, covariance, shape) -> None:
        """Make a packed float32 model the fitted state (factorised at the first scoring)."""
        if not all_finite(covariance):
            raise FloatingPointError(
                "The features are too large for float32 statistics (their squares "
                "overflow); scale them down, e.g. by a constant factor."
            )
        fitted = _fitted_attributes(count, mean, shape)
        fitted["packed_covariance_"] = covariance.numpy()
        self._adopt(fitted, self.threshold, None, resolve_device(self.device))

    def scoring_copy(self) -> PadimDetector:
        """A copy that stores the whitening factors this detector scores with.

        A fitted detector stores its covariances and factorises them at its first
        scoring in each process (about 0.5 s on one core for ResNet-18 features at
        224 px, much longer for Wide-ResNet-50-2's ``d=550``). The copy stores the
        packed float32 factors instead (the same bytes as the covariances), so once
        pickled into other processes (Dask workers, a pool of inference processes) it
        scores at once, with the same scores. Like a ``covariance_dtype="float16"``
        detector, it keeps no statistics: it cannot be trained further, merged or split,
        nor score with another ``reg``. A float16 detector is copied as it is.

        Returns
        -------
        copy : PadimDetector
            With this detector's parameters and ``threshold_``.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(6, 3, 2, 2)).astype(np.float32)
        >>> detector = PadimDetector().fit(X)
        >>> copy = detector.scoring_copy()
        >>> copy.packed_factor_.dtype, hasattr(copy, "packed_covariance_")
        (dtype('float32'), False)
        >>> bool(np.array_equal(copy.decision_function(X), detector.decision_function(X)))
        True
        """
        check_is_fitted(self)
        device = resolve_device(self.device)
        gaussians = self._cached_gaussians(device)
        fitted = _fitted_attributes(
            self.n_samples_seen_, torch.from_numpy(self.mean_), self.feature_shape_
        )
        if hasattr(self, "packed_factor_"):
            fitted["packed_factor_"] = self.packed_factor_
            fitted["factor_reg_"] = self.factor_reg_
        else:
            factor = pack_lower(gaussians.factor.transpose(1, 2))
            fitted["packed_factor_"] = factor.cpu().numpy()
            fitted["factor_reg_"] = float(self.reg)
        copy = type(self)(**self.get_params())
        copy._adopt(fitted, getattr(self, "threshold_", None), gaussians, device)
        return copy

    def statistics(self) -> GaussianStatistics:
        """The fitted statistics (count, mean, scatter) as tensors on the detector's device.

        A new object each call: update or merge it freely, then :meth:`set_statistics`.

        Returns
        -------
        stats : sk_padim.gaussian.GaussianStatistics
        """
        count, mean, covariance = self._packed_statistics()
        device = resolve_device(self.device)
        return GaussianStatistics.from_packed(
            count, mean.to(device, copy=True), covariance.to(device, copy=True)
        )

    def set_statistics(
        self, stats: GaussianStatistics, feature_shape, factorise: bool = False
    ) -> PadimDetector:
        """Make these statistics the fitted model (they are consumed).

        The factorisation waits for the first scoring unless ``factorise``, and
        ``threshold_`` is set only from an explicit ``threshold``, as after
        :meth:`partial_fit`.

        Parameters
        ----------
        stats : sk_padim.gaussian.GaussianStatistics
            E.g. from :meth:`statistics` of fitted detectors, merged.
        feature_shape : tuple of int
            ``(d, h, w)`` of the features the statistics are of.
        factorise : bool, default=False
            Factorise the covariances now, as :meth:`fit` does (on the statistics'
            device, straight from the scatter matrices).

        Returns
        -------
        self : PadimDetector
        """
        self.check_params()
        d, h, w = (int(size) for size in feature_shape)
        if tuple(stats.mean.shape) != (h * w, d):
            raise ValueError(
                f"Statistics of {tuple(stats.mean.shape)} (positions, features) do not fit "
                f"feature_shape={tuple(feature_shape)}."
            )
        if not all_finite(stats.scatter):
            raise FloatingPointError(
                "The features are too large for float32 statistics (their squares "
                "overflow); scale them down, e.g. by a constant factor."
            )
        device = stats.mean.device
        if factorise or self.covariance_dtype == "float16":
            fitted, gaussians = self._factorised(stats, (d, h, w))
        else:
            fitted, gaussians = _fitted_attributes(stats.count, stats.mean, (d, h, w)), None
            fitted["packed_covariance_"] = stats.consume_packed().cpu().numpy()
        self._adopt(fitted, self.threshold, gaussians, device)
        return self

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
        return self.maps_and_scores(X)[0]

    def decision_function(self, X) -> np.ndarray | torch.Tensor:
        """Image anomaly scores, the maximum of each map; higher means more anomalous.

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

    def maps_and_scores(self, X) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
        """:meth:`score_samples` and :meth:`decision_function` in one pass.

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of the images to score.

        Returns
        -------
        maps : ndarray or Tensor of shape (n, H, W), float32
        scores : ndarray or Tensor of shape (n,), float32
        """
        return self._score(X, keep_maps=True)

    def held_out_scores(self, X) -> np.ndarray | torch.Tensor:
        """Leave-one-out image scores of training images: each under the model without it.

        For features of images this detector was fitted on, the score each image gets
        from the Gaussians fitted on all the other training images (exact rank-one
        downdates, see :func:`sk_padim.gaussian.held_out_distances`: one scoring pass, no
        refit). The default ``threshold_`` of :meth:`fit` is their maximum, so a fit
        spread over machines (:func:`sk_padim.dask.fit_distributed`) gets the same
        threshold as the maximum of each shard's maximum. For images the detector was
        not fitted on the numbers mean nothing; use :meth:`decision_function`.

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of training images.

        Returns
        -------
        scores : ndarray or Tensor of shape (n,), float32
            A tensor on ``X``'s device when ``X`` is one.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(20, 5, 4, 4)).astype(np.float32)
        >>> detector = PadimDetector().fit(X)
        >>> bool(detector.held_out_scores(X).max() == np.float32(detector.threshold_))
        True
        """
        scorer = self.to_module(resolve_device(self.device))
        return self._held_out(X, lambda distances: scorer.maps_of_distances(distances)[1])

    def held_out_distances(self, X) -> np.ndarray | torch.Tensor:
        """Leave-one-out distance grids of training images: each under the model without it.

        The Mahalanobis distance of each training feature vector to its position's
        Gaussian fitted on all the other training images: the grids behind
        :meth:`held_out_scores`, before they are made maps. For the parts of a model cut
        with :meth:`split_positions` (e.g. on other machines): join the parts' grids
        along the positions and :meth:`maps_of_distances` gives the held-out scores.

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)
            Features of training images.

        Returns
        -------
        distances : ndarray or Tensor of shape (n, h, w), float32
            A tensor on ``X``'s device when ``X`` is one.

        Examples
        --------
        >>> import numpy as np
        >>> from sk_padim import PadimDetector
        >>> X = np.random.default_rng(0).normal(size=(20, 5, 4, 4)).astype(np.float32)
        >>> import torch
        >>> detector = PadimDetector().fit(X)
        >>> grids = torch.from_numpy(detector.held_out_distances(X))
        >>> scores = detector.maps_of_distances(grids)[1].numpy()
        >>> bool(np.allclose(scores, detector.held_out_scores(X)))
        True
        """
        return self._held_out(X, lambda distances: distances)

    def _held_out(self, X, per_batch):
        """``per_batch`` of each batch's held-out distance grids, concatenated, as a
        tensor on ``X``'s device for tensor input, else a NumPy array."""
        features = self._check_features(X, self._fitted_shape())
        device = resolve_device(self.device)
        gaussians = self._cached_gaussians(device)
        batches = self._batches(features, device)
        with torch.inference_mode():
            grids = _held_out_grids(gaussians, batches, self.n_samples_seen_)
            result = torch.cat([per_batch(distances) for distances in grids])
        return result.to(X.device) if isinstance(X, torch.Tensor) else result.cpu().numpy()

    def maps_of_distances(self, distances) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and image scores of Mahalanobis distance grids, as scoring makes them.

        The grids are upsampled to ``map_size`` (by default four times the grid) and
        smoothed with ``sigma``; an image's score is its map's maximum. For distances
        computed outside :meth:`score_samples`, e.g. by the parts of a model cut with
        :meth:`split_positions`, put back together into grids. Needs no fit.

        Parameters
        ----------
        distances : Tensor of shape (n, h, w)

        Returns
        -------
        maps : Tensor of shape (n, H, W)
        scores : Tensor of shape (n,)

        Examples
        --------
        >>> import torch
        >>> from sk_padim import PadimDetector
        >>> maps, scores = PadimDetector(sigma=0).maps_of_distances(torch.ones(2, 3, 3))
        >>> tuple(maps.shape), scores.tolist()
        ((2, 12, 12), [1.0, 1.0])
        """
        self.check_params()
        grid = (0, *distances.shape[1:])
        with torch.inference_mode():
            return self._map_generator(grid, distances.device).maps_and_scores(distances)

    def predict(self, X) -> np.ndarray | torch.Tensor:
        """Label images: +1 normal, -1 anomalous (image score ``>= threshold_``).

        Parameters
        ----------
        X : array-like, Tensor or DeviceFeatures of shape (n, d, h, w)

        Returns
        -------
        labels : ndarray or Tensor of shape (n,), int
        """
        check_is_fitted(self)
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                "threshold_ is not set: partial_fit does not score the training images. "
                "Set threshold=<float>, call fit, or calibrate with F1ThresholdCalibrator."
            )
        scores = self.decision_function(X)
        if isinstance(scores, torch.Tensor):
            return torch.where(scores >= self.threshold_, -1, 1)
        return np.where(scores >= self.threshold_, -1, 1)

    def to_module(self, device: str | torch.device | None = None) -> PatchScorer:
        """The fitted detector as a torch module on ``device``: features -> (maps, scores).

        The Gaussians (mean and whitening factor) are built once per device and ``reg``
        and shared: the first call after :meth:`partial_fit` factorises the covariances
        while concurrent callers wait, and later calls return at once. The module
        follows the current ``sigma``, ``truncate`` and ``map_size``.

        Parameters
        ----------
        device : str or torch.device, default=None
            ``None`` uses the ``device`` parameter.

        Returns
        -------
        scorer : sk_padim.model.PatchScorer
        """
        shape = self._fitted_shape()
        self.check_params()  # set_params may have run since fit
        device = resolve_device(self.device if device is None else device)
        return PatchScorer(self._cached_gaussians(device), self._map_generator(shape, device))

    def _cached_gaussians(self, device: torch.device) -> PatchGaussians:
        cache = vars(self).setdefault("_gaussians_by_device", PerDeviceCache())
        return cache.get((device, self.reg), lambda: self._gaussians(device))

    def _score(self, X, keep_maps: bool):
        features = self._check_features(X, self._fitted_shape())
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

    def _fit_lazily(self, batches: Iterable, previous: GaussianStatistics | None) -> None:
        """Fold feature batches into ``previous`` (or fresh) statistics and store them."""
        device = resolve_device(self.device)
        shape = None if previous is None else self.feature_shape_
        stats, shape = self._accumulate(batches, previous, device, shape)
        self.set_statistics(stats, shape)

    def _accumulate(self, batches: Iterable, stats: GaussianStatistics | None, device, shape=None):
        """Statistics and feature shape after folding in every batch of features.

        ``shape``, when given, is the feature shape every batch must have. A function of
        its own so that the last batch is released on return, before the statistics are
        factorised or packed (their peak memory).
        """
        for X in batches:
            features = self._check_features(X, shape)
            shape = tuple(features.shape[1:])
            if stats is not None and tuple(stats.mean.shape) != (shape[1] * shape[2], shape[0]):
                raise ValueError(
                    f"Features of shape {shape} do not fit statistics of "
                    f"{tuple(stats.mean.shape)} (positions, features)."
                )
            d, h, w = shape
            if stats is None:
                stats = GaussianStatistics.empty(h * w, d, device)
            chunk = positions_per_chunk(device, self.batch_size + 1, d)
            for batch in self._batches(features, device):
                stats.update(batch, chunk)
        if stats is None:
            raise ValueError("No feature batches to fit on; pass at least one.")
        if not all_finite(stats.scatter):
            raise FloatingPointError(
                "The features are too large for float32 statistics (their squares "
                "overflow); scale them down, e.g. by a constant factor."
            )
        return stats, shape

    def _factorised(self, stats: GaussianStatistics, shape) -> tuple[dict, PatchGaussians]:
        """Fitted attributes and Gaussians of statistics (consumed), factorised now."""
        fitted = _fitted_attributes(stats.count, stats.mean, shape)
        mean = stats.mean
        packed, factor = factorise_statistics(stats, self.reg)
        if self.covariance_dtype == "float32":
            fitted["packed_covariance_"] = packed.numpy()
        else:
            rounded = pack_lower(factor.transpose(1, 2)).half()
            fitted["packed_factor_"] = rounded.cpu().numpy()
            fitted["factor_reg_"] = float(self.reg)
            del factor
            # Score with the stored, rounded factor, as a reloaded model does.
            factor = unpack_upper(rounded.float(), shape[0])
        return fitted, PatchGaussians(mean, factor)

    def _adopt(self, fitted: dict, threshold, gaussians: PatchGaussians | None, device) -> None:
        """Replace the fitted state at once (the previous Gaussians are dropped).

        ``gaussians`` (on ``device``, the resolved ``device`` parameter of the fit) are
        kept for scoring there.
        """
        for name in _FITTED:
            vars(self).pop(name, None)
        vars(self).update(fitted)
        if threshold is not None:
            self.threshold_ = float(threshold)
        self._gaussians_by_device = PerDeviceCache()
        if gaussians is not None:
            self._gaussians_by_device.put((device, self.reg), gaussians)

    def _gaussians(self, device: torch.device) -> PatchGaussians:
        """The fitted Gaussians on ``device``, factorised from the stored covariances."""
        mean = torch.as_tensor(self.mean_, device=device)
        if not hasattr(self, "packed_factor_"):
            packed = torch.as_tensor(self.packed_covariance_, device=device)
            return PatchGaussians(mean, whitening_factor(packed, self.reg))
        if self.reg != self.factor_reg_:
            raise ValueError(
                f"This float16 detector was factorised with reg={self.factor_reg_}; it "
                f"cannot score with reg={self.reg}. Set reg back, or refit."
            )
        packed = torch.as_tensor(self.packed_factor_, device=device).float()
        factor = unpack_upper(packed, self.feature_shape_[0])
        return PatchGaussians(mean, factor)

    def _map_generator(self, shape, device: torch.device) -> AnomalyMapGenerator:
        generator = AnomalyMapGenerator(shape[1:], self._map_size(shape), self.sigma, self.truncate)
        return generator.to(device)

    def _batches(self, features: torch.Tensor, device: torch.device):
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

    def _map_size(self, shape=None) -> tuple[int, int]:
        explicit = self._explicit_map_size()
        if explicit is not None:
            return explicit
        _, h, w = self.feature_shape_ if shape is None else shape
        return (4 * h, 4 * w)

    def _explicit_map_size(self) -> tuple[int, int] | None:
        """The ``map_size`` parameter as ``(height, width)``, or None; checked."""
        if self.map_size is None:
            return None
        if isinstance(self.map_size, Integral):
            return (int(self.map_size), int(self.map_size))
        if len(self.map_size) != 2 or not all(
            isinstance(s, Integral) and s > 0 for s in self.map_size
        ):
            raise ValueError(f"map_size must be an int or (height, width); got {self.map_size!r}.")
        return (int(self.map_size[0]), int(self.map_size[1]))

    def _fitted_shape(self) -> tuple[int, int, int]:
        check_is_fitted(self)
        return self.feature_shape_

    def _check_features(self, X, expected_shape=None) -> torch.Tensor:
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
        if expected_shape is not None and tuple(features.shape[1:]) != tuple(expected_shape):
            raise ValueError(
                f"Features have shape (d, h, w) = {tuple(features.shape[1:])} but the "
                f"detector was fitted on {tuple(expected_shape)}; use the same transformer "
                "settings (n_features, layers, image_size) as for fitting."
            )
        return features

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gaussians_by_device", None)
        return state

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


_TRANSFORMER_HINT = (
    "PadimDetector takes patch features (n, d, h, w), not images: put a "
    "PatchFeatureTransformer before it, e.g. Pipeline([('feat', PatchFeatureTransformer()), "
    "('padim', PadimDetector())])."
)


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


def _shared_tensor(array) -> torch.Tensor:
    """A tensor sharing a fitted array's memory (a copy if it is read-only, e.g. mapped)."""
    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _check_same_model_settings(first: PadimDetector, other: PadimDetector, action: str) -> None:
    for name in ("reg", "covariance_dtype"):
        if getattr(first, name) != getattr(other, name):
            raise ValueError(
                f"Cannot {action} detectors with different {name}: {getattr(first, name)!r} "
                f"and {getattr(other, name)!r}."
            )


def _fitted_attributes(count: int, mean: torch.Tensor, shape) -> dict:
    return {
        "n_samples_seen_": count,
        "n_features_in_": int(shape[0]),
        "feature_shape_": tuple(int(size) for size in shape),
        "mean_": mean.cpu().numpy(),
    }


def _held_out_scores(scorer: PatchScorer, batches, n_samples: int) -> torch.Tensor:
    """Image scores of the training features under the model fitted without each.

    Scores of the training images under the model fitted on all of them are far too low
    (with fewer images than ``d``, each one lies almost in its own Gaussian's support),
    so their maximum would flag every new image; leave-one-out scores are what a new
    normal image gets.
    """
    with torch.inference_mode():
        grids = _held_out_grids(scorer.gaussians, batches, n_samples)
        return torch.cat([scorer.maps_of_distances(distances)[1] for distances in grids])


def _held_out_grids(gaussians: PatchGaussians, batches, n_samples: int):
    """Held-out distance grids ``(n_i, h, w)`` of each batch of training features."""
    for batch in batches:
        yield held_out_distances(gaussians(batch), n_samples)
