"""PadimDetector: a Gaussian per patch position, scored by Mahalanobis distance."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn import get_config
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sk_padim._checks import image_labels
from sk_padim.devices import resolve_device
from sk_padim.gaussian import GaussianStatistics, pack_lower, unpack_lower, whitening_factor
from sk_padim.mahalanobis import mahalanobis
from sk_padim.postprocess import anomaly_maps
from sk_padim.versioning import VersionedPickleMixin


class PadimDetector(VersionedPickleMixin, OutlierMixin, BaseEstimator):
    """PaDiM: a multivariate Gaussian per patch position of the feature grid.

    Fitting accumulates, per position, the count, mean and scatter of the training
    feature vectors in a streaming, mergeable form (memory independent of the number of
    images); the covariance is ``scatter / (N - 1) + reg * I``. Scoring computes at each
    position the Mahalanobis distance (the square root) to that position's Gaussian,
    upsamples the grid bilinearly to ``map_size`` and smooths it with a Gaussian of
    ``sigma``; the image score is the maximum of the map.

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
        Image score above which :meth:`predict` says anomalous. ``None``: :meth:`fit`
        sets ``threshold_`` to the highest score of a training image under a model
        fitted without it (two-fold cross-fitting on alternate images; it needs two
        images or more), so that normal images like the training ones are rarely
        flagged. The half-size models score a little high, which errs towards fewer
        false alarms. :meth:`partial_fit` and :meth:`merge` do not score training images
        and leave it unset. For a threshold tuned on labelled data, use
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
        statistics are stored as NumPy arrays, so models load on any machine.

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
    packed_factor_ : ndarray of shape (h * w, d * (d + 1) / 2), float16
        Per-position whitening factor ``U`` (upper triangular, ``|(x - mean) @ U|`` is the
        distance) of the covariance plus ``reg * I``, its transpose packed like
        ``packed_covariance_``. With ``covariance_dtype="float16"``.
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
        X : array-like of shape (n, d, h, w)
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
            features = features[_normal_rows(y, len(features))]
        # Fit a copy and adopt its state at the end, so that an error or an interrupt
        # (while fitting or while scoring for the threshold) changes nothing.
        model = clone(self)
        model._fit_batches([features])
        if self.threshold is not None:
            model.threshold_ = float(self.threshold)
        elif len(features) >= 2:
            model.threshold_ = model._cross_fitted_threshold(features)
        self._adopt_fitted_state(model)
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
        X : array-like of shape (n, d, h, w)
            Features of normal images.
        y : ignored

        Returns
        -------
        self : PadimDetector
        """
        self._validate_params()  # scikit-learn skips it once fitted; set_params may have run
        first_call = not hasattr(self, "n_samples_seen_")
        self._fit_batches([X], None if first_call else self._statistics())
        self._set_threshold_without_scores()
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
        for name in ("reg", "covariance_dtype"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(
                    f"Cannot merge detectors with different {name}: {getattr(self, name)!r} "
                    f"and {getattr(other, name)!r}."
                )
        merged = clone(self)
        stats = self._statistics().merge(other._statistics())
        merged._store(stats, self.feature_shape_)
        merged._set_threshold_without_scores()
        return merged

    def score_samples(self, X) -> np.ndarray:
        """Pixel anomaly maps; higher means more anomalous.

        Parameters
        ----------
        X : array-like of shape (n, d, h, w)
            Features of the images to score.

        Returns
        -------
        maps : ndarray of shape (n, H, W), float32
            ``(H, W)`` is ``map_size``.
        """
        features = self._check_features(X, self._fitted_shape())
        maps = np.empty((len(features), *self._map_size()), dtype=np.float32)
        start = 0
        for batch_maps in self._iter_maps(features):
            maps[start : start + len(batch_maps)] = batch_maps.cpu().numpy()
            start += len(batch_maps)
        return maps

    def decision_function(self, X) -> np.ndarray:
        """Image anomaly scores, the maximum of each map; higher means more anomalous.

        Parameters
        ----------
        X : array-like of shape (n, d, h, w)
            Features of the images to score.

        Returns
        -------
        scores : ndarray of shape (n,), float32
        """
        features = self._check_features(X, self._fitted_shape())
        scores = [batch_maps.amax(dim=(1, 2)).cpu() for batch_maps in self._iter_maps(features)]
        return torch.cat(scores).numpy()

    def predict(self, X) -> np.ndarray:
        """Label images: +1 normal, -1 anomalous (image score above ``threshold_``).

        Parameters
        ----------
        X : array-like of shape (n, d, h, w)

        Returns
        -------
        labels : ndarray of shape (n,), int
        """
        check_is_fitted(self)
        if not hasattr(self, "threshold_"):
            raise NotFittedError(
                "threshold_ is not set: partial_fit does not score the training images. "
                "Set threshold=<float>, call fit, or calibrate with F1ThresholdCalibrator."
            )
        return np.where(self.decision_function(X) > self.threshold_, -1, 1)

    def _cross_fitted_threshold(self, features: np.ndarray) -> float:
        """Highest score of a training image under a model fitted without it.

        Two-fold cross-fitting on alternate images: scores of the training images under
        the model fitted on all of them are far too low (with fewer images than ``d``,
        each one lies almost in its own Gaussian's support), so they would flag every
        new image.
        """
        halves = (features[0::2], features[1::2])
        held_out = []
        for fit_half, score_half in (halves, halves[::-1]):
            half_model = clone(self).set_params(threshold=0.0)
            half_model._fit_batches([fit_half])
            held_out.append(half_model.decision_function(score_half))
        return float(np.concatenate(held_out).max())

    def _adopt_fitted_state(self, model: PadimDetector) -> None:
        for name in [n for n in vars(self) if n.endswith("_") and not n.startswith("__")]:
            delattr(self, name)
        for name, value in vars(model).items():
            if name.endswith("_") or name == "_scoring_cache":
                setattr(self, name, value)

    def _set_threshold_without_scores(self) -> None:
        """``threshold_`` from the parameter alone, when training scores are unavailable."""
        if self.threshold is not None:
            self.threshold_ = float(self.threshold)
        elif hasattr(self, "threshold_"):
            del self.threshold_

    def _fit_batches(self, feature_batches, previous: GaussianStatistics | None = None):
        """Fold feature arrays into ``previous`` (or fresh) statistics, then store them.

        Nothing is stored unless every batch is valid, so a failure or an interruption
        leaves the detector as it was.
        """
        stats, shape = self._accumulate_all(feature_batches, previous)
        if stats is None:
            raise ValueError("No feature batches to fit on; pass at least one.")
        if not _all_finite(stats.scatter):
            raise FloatingPointError(
                "The features are too large for float32 statistics (their squares "
                "overflow); scale them down, e.g. by a constant factor."
            )
        self._store(stats, shape)

    def _accumulate_all(self, feature_batches, stats: GaussianStatistics | None):
        """Statistics and feature shape after folding in every batch.

        A function of its own so that the last batch is released on return, before the
        statistics are packed (their peak memory).
        """
        shape = None if stats is None else self.feature_shape_
        for X in feature_batches:
            features = self._check_features(X, shape)
            shape = features.shape[1:]
            stats = self._accumulate(features, stats)
        return stats, shape

    def _accumulate(self, features: np.ndarray, stats: GaussianStatistics | None):
        d, h, w = features.shape[1:]
        if stats is None:
            stats = GaussianStatistics.empty(h * w, d, resolve_device(self.device))
        chunk = _chunk_positions(stats.mean.device, self.batch_size + 1, d)
        for start in range(0, len(features), self.batch_size):
            batch = _finite_batch(features[start : start + self.batch_size], stats.mean.device)
            stats.update(batch, chunk)
        return stats

    def _statistics(self) -> GaussianStatistics:
        """The fitted statistics as tensors on the estimator's device."""
        if not hasattr(self, "packed_covariance_"):
            raise ValueError(
                "This detector stores float16 whitening factors (covariance_dtype="
                "'float16'), not its statistics, so it cannot be trained further or "
                "merged. Fit with covariance_dtype='float32' for that."
            )
        device = resolve_device(self.device)
        return GaussianStatistics.from_packed(
            self.n_samples_seen_,
            torch.tensor(self.mean_, device=device),
            torch.tensor(self.packed_covariance_, device=device),
        )

    def _store(self, stats: GaussianStatistics, feature_shape) -> None:
        """Set the fitted attributes from the statistics (consumed).

        With float32 storage the whitening factor is computed lazily, at the first
        scoring, so that partial fits and merges that are never scored (shards of a
        distributed fit) skip it; float16 storage keeps the factor itself.
        """
        packed = stats.consume_packed()
        for name in ("packed_covariance_", "packed_factor_", "factor_reg_"):
            vars(self).pop(name, None)  # a model saved with float16 covariances has both
        self.n_samples_seen_ = stats.count
        self.n_features_in_ = int(feature_shape[0])
        self.feature_shape_ = tuple(int(s) for s in feature_shape)
        self.mean_ = stats.mean.cpu().numpy()
        self._scoring_cache = None
        if self.covariance_dtype == "float32":
            self.packed_covariance_ = packed.cpu().numpy()
            return
        factor = whitening_factor(packed, self.reg)
        self.packed_factor_ = pack_lower(factor.transpose(1, 2)).half().cpu().numpy()
        self.factor_reg_ = float(self.reg)

    def _scoring_tensors(self, device: torch.device):
        """Mean (float64) and whitening factor on ``device``, computed once per device."""
        cache = getattr(self, "_scoring_cache", None)
        if cache is None or cache[0] != (device, self.reg):
            mean = torch.as_tensor(self.mean_, device=device)
            cache = ((device, self.reg), mean, self._whitening_factor(device))
            self._scoring_cache = cache
        return cache[1], cache[2]

    def _whitening_factor(self, device: torch.device) -> torch.Tensor:
        if not hasattr(self, "packed_factor_"):
            packed = torch.as_tensor(self.packed_covariance_, device=device)
            return whitening_factor(packed, self.reg)
        if self.reg != self.factor_reg_:
            raise ValueError(
                f"This float16 detector was factorised with reg={self.factor_reg_}; it "
                f"cannot score with reg={self.reg}. Set reg back, or refit."
            )
        packed = torch.as_tensor(self.packed_factor_, device=device).float()
        return unpack_lower(packed, self.feature_shape_[0]).transpose(1, 2).contiguous()

    def _iter_maps(self, features: np.ndarray):
        self._validate_params()  # set_params may have run since fit
        device = resolve_device(self.device)
        mean, factor = self._scoring_tensors(device)
        chunk = _chunk_positions(device, self.batch_size, self.feature_shape_[0])
        for start in range(0, len(features), self.batch_size):
            batch = _finite_batch(features[start : start + self.batch_size], device)
            with torch.inference_mode():
                distances = mahalanobis(batch, mean, factor, chunk)
                yield anomaly_maps(distances, self._map_size(), self.sigma, self.truncate)

    def _map_size(self) -> tuple[int, int]:
        explicit = self._explicit_map_size()
        if explicit is not None:
            return explicit
        _, h, w = self.feature_shape_
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

    def _check_features(self, X, expected_shape=None) -> np.ndarray:
        try:
            features = np.asarray(X)
        except ValueError as error:
            raise ValueError(
                "Features must be one array of shape (n, d, h, w); the items given have "
                "different shapes. Use PatchFeatureTransformer to make them."
            ) from error
        if features.ndim != 4:
            raise ValueError(
                f"Expected features of shape (n, d, h, w); got shape {features.shape}. "
                "Pass images through PatchFeatureTransformer first."
            )
        if len(features) == 0:
            raise ValueError("Got no feature maps (n = 0); pass at least one image's features.")
        if not np.issubdtype(features.dtype, np.number) or features.dtype == np.bool_:
            raise TypeError(f"Features must be numeric; got dtype {features.dtype}.")
        if 0 in features.shape[1:]:
            raise ValueError(
                f"Features of shape {features.shape} have an empty axis (size 0); make "
                "them with PatchFeatureTransformer."
            )
        if features.dtype.itemsize > 4 and np.issubdtype(features.dtype, np.floating):
            largest = np.abs(features[np.isfinite(features)]).max(initial=0)
            if largest > np.finfo(np.float32).max:
                raise ValueError(
                    f"Features reach {largest:.3g}, beyond float32's range; scale them down."
                )
        if expected_shape is not None and tuple(features.shape[1:]) != tuple(expected_shape):
            raise ValueError(
                f"Features have shape (d, h, w) = {tuple(features.shape[1:])} but the "
                f"detector was fitted on {tuple(expected_shape)}; use the same transformer "
                "settings (n_features, layers, image_size) as for fitting."
            )
        return features.astype(np.float32, copy=False)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_scoring_cache", None)
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


def _chunk_positions(device: torch.device, n_rows: int, n_features: int) -> int:
    """Positions per step of the batched kernels.

    Each position needs ``3 * n_rows * n_features`` temporary floats. On the CPU a chunk
    is kept near 4 MiB so that it stays in cache between the copy, the matmul and the
    reduction; on a GPU larger steps mean fewer kernel launches. Both stay within
    scikit-learn's ``working_memory``.
    """
    per_position = 3 * 4 * n_rows * n_features
    budget = get_config()["working_memory"] * 2**20
    if device.type == "cpu":
        budget = min(budget, 4 * 2**20)
    return max(1, int(budget // per_position))


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite.

    A finite sum proves every value finite without a mask as large as the tensor (30x
    faster on the CPU); an infinite sum may be an overflow of finite values, so then the
    values are checked one by one.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _finite_batch(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch of features on ``device``, checked there for NaN and infinity."""
    batch = torch.as_tensor(features).to(device)
    if not _all_finite(batch):
        raise ValueError(
            "Features contain NaN or infinite values; check the images and the backbone."
        )
    return batch
