"""PadimDetector: a Gaussian per patch position, scored by Mahalanobis distance."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from sk_padim._checks import normal_rows
from sk_padim.conformal import conformal_rank
from sk_padim.core.devices import PerDeviceCache, resolve_device
from sk_padim.core.feature_checks import (
    check_feature_shape_matches,
    check_features,
    feature_batches,
)
from sk_padim.core.images import size_pair
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.model import PatchScorer
from sk_padim.core.postprocess import AnomalyMapGenerator
from sk_padim.core.statistics import PatchStatistics
from sk_padim.core.store import StoreFolder
from sk_padim.fitting import (
    THRESHOLD_ATTRIBUTES,
    accumulate,
    check_threshold_rule,
    feature_tiles,
    first_shape,
    fit_gaussians,
    fit_statistics,
    given_threshold,
    held_out_grids,
    memory_layout,
    n_positions,
    scoring_gaussians,
    threshold_attributes,
    threshold_record,
    thresholds_from_grids,
    too_few_images,
    warn_of_suspects,
)
from sk_padim.versioning import VersionedPickleMixin

__all__ = ["PadimDetector"]


class PadimDetector(VersionedPickleMixin, OutlierMixin, BaseEstimator):
    """PaDiM: a multivariate Gaussian per patch position of the feature grid.

    Fitting accumulates the count, mean and scatter of the training feature vectors at
    each position (:class:`~sk_padim.core.statistics.PatchStatistics`); the covariance is
    ``scatter / (N - 1) + reg * I``. Scoring takes the Mahalanobis distance to each
    position's Gaussian, upsamples the grid bilinearly to ``map_size`` and smooths it
    (``sigma``); the image score is the maximum of the map. Features may be NumPy
    arrays, tensors (any device) or :class:`~sk_padim.core.devices.DeviceFeatures`; tensors
    in give tensors out. Any number of threads may score one fitted detector.

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
        for the default layers of every registered backbone, of stride 4).
    threshold : float or None, default=None
        Image score from which (``>=``) :meth:`predict` says anomalous. ``None``:
        :meth:`fit` sets ``threshold_`` from the held-out scores of the training images
        (``training_scores_``: each image's score under the model fitted without it,
        by exact rank-one downdates in one scoring pass, see
        :func:`sk_padim.core.statistics.held_out_distances`), by ``false_alarm_rate``.
        :meth:`partial_fit` and :meth:`merge` set it only from an explicit
        ``threshold``. To tune it on labelled data, use
        :class:`sk_padim.F1ThresholdCalibrator`.
    false_alarm_rate : float or None, default=None
        The rate ``alpha``, in (0, 1), at which images of good parts like the training
        ones may be flagged: ``threshold_`` is the ``ceil((n + 1)(1 - alpha))``-th
        smallest of the ``n`` training scores, which a new good image reaches with
        probability at most ``alpha`` (conformal prediction; see
        :mod:`sk_padim.conformal`). It needs ``n >= 1 / alpha - 1`` training images (19
        for 0.05), else :meth:`fit` raises. ``None``: the highest training score, which
        implies the rate ``1 / (n + 1)`` (0.024 for 40 training images). Not with
        ``threshold``.
    pixel_quantile : float, default=0.999
        :meth:`fit` sets ``pixel_threshold_``, the pixel score defect regions are cut
        at, to this quantile of the pixels of the same leave-one-out maps: on normal
        images like the training ones, a fraction ``1 - pixel_quantile`` of pixels is
        expected at or above it (the false-positive pixel rate). No masks are needed.
    covariance_dtype : {"float32", "float16"}, default="float32"
        How the Gaussians are saved (pickles, ``save_npz``). ``"float32"``: the
        statistics, which a loaded model can merge, train further and rescore with
        another ``reg``. ``"float16"``: half the size, for inference: the whitening
        factors (with the current ``reg``) rounded to float16, which the detector also
        scores with before saving (scores within about 1e-3 relative; rounding
        covariances instead lost image AUROC, 0.97 -> 0.61 at ``d=550``).
    batch_size : int, default=32
        Images per step when fitting and scoring.
    device : str or torch.device, default="auto"
        Where fitting and scoring run; ``"auto"`` uses CUDA when available. Pickles
        hold NumPy arrays and load on any machine.
    max_memory : float, default=6.0
        GiB the fitted model's arrays may take in memory. Per position of the feature
        grid, the statistics take ``8 d + 2 d (d + 1)`` bytes (20.8 kB at ``d=100``)
        and the Gaussians that score as much again. When both fit, both are kept. When
        only the Gaussians fit, the statistics go to ``store`` if it is set; otherwise
        the Gaussians are factorised in place of the statistics, and the detector keeps
        the Gaussians only: it scores, saves and exports, but cannot :meth:`partial_fit`,
        :meth:`merge` or score with another ``reg``. When the Gaussians do not fit
        either, both go to ``store`` (then required). The default holds a 2048 x 2048
        image's grid at ``d=100`` (5.1 GiB of Gaussians) on a 16 GB machine; see the
        high-resolution guide.
    texture_tile : int, (int, int) or None, default=None
        Texture mode, for webs and surfaces where a defect can be anywhere and the
        position within the part means nothing: one set of per-position Gaussians for a
        tile of this many feature-grid cells (4 image pixels each at the default
        layers), every tile of every training image being a sample, and maps stitched
        back from the tiles. Memory is that of one tile whatever the image size, and a
        few images give many samples. ``None``: PaDiM's one Gaussian per position of the
        whole grid. Where the tile does not divide the grid, one more row (column) of
        tiles is aligned to the far edge. See the high-resolution guide for when to
        choose which.
    store : str, path or None, default=None
        A folder for the arrays that do not fit in ``max_memory`` (out of core: read
        and written a chunk of positions at a time). Each fit writes a new subfolder,
        marked complete when it is done; a completed fit deletes the files of the fits
        before it, a failed or interrupted one its own. Pickles of such a model hold
        the arrays themselves.

    Attributes
    ----------
    statistics_ : sk_padim.core.statistics.PatchStatistics or None
        Count, per-position mean (float64) and packed scatter (float32) of the training
        features, positions in row-major order; None in a model loaded from float16
        factors.
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
        Held-out image scores of the training images, in their order: what the
        thresholds, :func:`sk_padim.p_values` and :func:`sk_padim.drift_report` compare
        new scores with. Set by :meth:`fit`, :meth:`fit_batches` and
        :meth:`from_statistics` with ``held_out_distances`` (from two training images).
    threshold_rule_ : dict
        How ``threshold_`` was set: ``rule`` (``"false_alarm_rate"``,
        ``"highest_training_score"`` or ``"given"``), ``false_alarm_rate`` (the rate
        asked, or None), ``implied_false_alarm_rate`` (the rate the threshold promises on
        good images, ``(1 + #{training scores > threshold_}) / (n + 1)``, or None without
        training scores), ``n_training_images`` and ``pixel_quantile`` (None where the
        pixel threshold was not set).
    suspect_indices_ : ndarray of shape (n_suspects,), int
        Training images whose held-out score is an outlier among the training scores
        (:func:`sk_padim.conformal.suspect_indices`): perhaps defective parts among the
        good ones. :meth:`fit` warns (:class:`~sk_padim.conformal.SuspectTrainingImagesWarning`)
        when there are any; refit without them, e.g. ``fit(X, y)`` with ``y`` 1 at these
        indices, which reuses the features.

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
        self._check_map_size()
        features = check_features(X)
        if y is not None:
            features = features[torch.as_tensor(normal_rows(y, len(features)))]
        device = resolve_device(self.device)
        return self._fit_passes(lambda: feature_batches(features, self.batch_size, device), device)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_batches(self, make_batches: Callable[[], Iterable]) -> PadimDetector:
        """Fit on features that come a batch at a time, holding one batch in memory.

        The model equals :meth:`fit` on all the batches' features at once (to float32
        rounding), thresholds included: ``make_batches`` is called twice, once to
        accumulate the statistics and once to score the training images for the
        thresholds, and must give the same features both times. Memory holds the
        fitted arrays (see ``max_memory``) and one batch. :func:`sk_padim.fit_streaming`
        fits a pipeline this way on image files. If the fit fails, the detector is
        unchanged.

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
        self._check_map_size()
        device = resolve_device(self.device)
        shape = []  # the first batch's (d, h, w), which every batch must have

        def batches():
            for features in make_batches():
                features = check_features(features)
                if not shape:
                    shape.append(tuple(features.shape[1:]))
                check_feature_shape_matches(features, shape[0])
                yield from feature_batches(features, self.batch_size, device)
                del features  # not held while make_batches makes the next batch

        return self._fit_passes(batches, device)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add features of more normal images to the fitted statistics.

        Any split of the training images into calls gives the model of one :meth:`fit`
        (to float32 rounding), except the thresholds, set only from ``threshold``. The
        covariances are factorised at the next scoring. If the call fails, the model is
        unchanged. To fit chunk by chunk with the thresholds of :meth:`fit`, use
        :meth:`fit_batches` (or :func:`sk_padim.fit_streaming` on image files).

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
        features = check_features(X)
        device = resolve_device(self.device)
        if hasattr(self, "n_samples_seen_"):
            check_feature_shape_matches(features, self.feature_shape_)
            previous = self._trainable_statistics("train further").to(device).copy()
        else:
            positions, d = n_positions(features.shape[1:], self.texture_tile), features.shape[1]
            if self._layout(positions, d) != "memory":
                raise ValueError(
                    f"partial_fit keeps the statistics and Gaussians of {positions} positions in "
                    f"memory, more than max_memory={self.max_memory} GiB: fit on all the "
                    "images at once (fit writes what does not fit to store), or raise max_memory."
                )
            previous = PatchStatistics.empty(positions, d, device)
        for batch in feature_batches(features, self.batch_size, device):
            accumulate(batch, previous, self.texture_tile)
        stats = previous.check_finite()
        thresholds = given_threshold(self.threshold)
        self._set_fitted(features.shape[1:], stats.count, stats, thresholds=thresholds)
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
        detector._validate_params()
        detector._check_map_size()
        check_threshold_rule(detector.threshold, detector.false_alarm_rate)
        d, h, w = (int(size) for size in feature_shape)
        positions = n_positions((d, h, w), detector.texture_tile)
        if (statistics.n_positions, statistics.n_features) != (positions, d):
            raise ValueError(
                f"Statistics of {statistics.n_positions} positions and "
                f"{statistics.n_features} features do not fit feature_shape={feature_shape}."
            )
        thresholds = given_threshold(detector.threshold)
        if held_out_distances is not None:
            device = resolve_device(detector.device)
            tiles = feature_tiles((d, h, w), detector.texture_tile)
            n_images = statistics.count // (1 if tiles is None else tiles.n_tiles)
            thresholds = detector._thresholds_of(held_out_distances, (d, h, w), n_images, device)
        detector._set_fitted((d, h, w), statistics.count, statistics, thresholds=thresholds)
        suspects, n_training = detector._suspects()
        warn_of_suspects(suspects, n_training, stacklevel=3)
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
        if isinstance(scores, torch.Tensor):
            return torch.where(scores >= self.threshold_, -1, 1)
        return np.where(scores >= self.threshold_, -1, 1)

    def to_module(self, device: str | torch.device | None = None) -> PatchScorer:
        """Give the fitted detector as a torch module: features -> (maps, scores).

        Its Gaussians are factorised once per device and ``reg`` and shared by threads;
        it pickles on its own (e.g. to Dask workers); the ONNX export serialises it.

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
        self._validate_params()  # set_params may have run since fit
        self._check_map_size()
        device = resolve_device(self.device if device is None else device)
        maps = self._map_generator(self.feature_shape_, device)
        gaussians = scoring_gaussians(
            self._gaussians(device), self.feature_shape_, self.texture_tile
        )
        return PatchScorer(gaussians, maps)

    def fitted_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Give the fitted state as NumPy arrays and a JSON-able record (for file formats).

        Returns
        -------
        arrays : dict of str to ndarray
            ``"mean"`` and ``"scatter"`` (float32 models that keep statistics) or
            ``"mean"`` and ``"packed_factor"`` (float16 models, and models that keep
            their Gaussians only, see ``max_memory``).
        record : dict
            Counts, shapes, thresholds, how they were set and the training scores.
        """
        check_is_fitted(self)
        record = {
            "n_samples_seen_": int(self.n_samples_seen_),
            "feature_shape_": [int(size) for size in self.feature_shape_],
            **threshold_record(self),
        }
        if self.covariance_dtype == "float32" and self.statistics_ is not None:
            return self.statistics_.arrays(), record
        return self._gaussians(resolve_device(self.device)).arrays(), record

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
            Fitted, scoring as the detector the state came from; a ``ValueError`` if the
            arrays and record are inconsistent (shapes, dtypes, non-finite values).
        """
        shape = tuple(int(size) for size in record["feature_shape_"])
        count = int(record["n_samples_seen_"])
        if "scatter" in arrays:
            stats = PatchStatistics.from_arrays(count, arrays["mean"], arrays["scatter"])
            detector = cls.from_statistics(stats, shape, **params)
        else:
            detector = cls(**params)
            gaussians = PatchGaussians.from_arrays(**arrays)
            if detector.covariance_dtype != gaussians.storage or (
                (len(gaussians), gaussians.n_features)
                != (n_positions(shape, detector.texture_tile), shape[0])
            ):
                raise ValueError(
                    f"the stored {gaussians.storage} factors do not fit a "
                    f"{detector.covariance_dtype} model of {shape}"
                )
            detector._set_fitted(shape, count, None, gaussians)
        for name, value in threshold_attributes(record).items():
            setattr(detector, name, value)
        return detector

    def _trainable_statistics(self, action: str) -> PatchStatistics:
        check_is_fitted(self)
        if self.statistics_ is None:
            raise ValueError(
                f"This detector keeps its Gaussians only, no statistics, so it cannot {action}: "
                "it was fitted past max_memory without a store, or saved with "
                "covariance_dtype='float16'. Refit with store=<folder> or a larger max_memory, "
                "or use a model saved with covariance_dtype='float32'."
            )
        return self.statistics_

    def _fit_passes(self, batches: Callable[[], Iterator[torch.Tensor]], device) -> PadimDetector:
        """Fit on ``batches()``, feature batches on ``device``: one pass accumulates the
        statistics, a second scores the training images for the thresholds."""
        check_threshold_rule(self.threshold, self.false_alarm_rate)
        shape, stream = first_shape(batches())
        layout = self._layout(n_positions(shape, self.texture_tile), shape[0])
        store = StoreFolder(self.store) if layout.startswith("store") else None
        # Everything is computed before any attribute changes, so that an error or an
        # interrupt leaves the detector as it was (and deletes what it wrote to a store).
        try:
            stats, n_images = fit_statistics(stream, shape, self.texture_tile, store, device)
            gaussians = fit_gaussians(stats, layout, store, self.reg, self.covariance_dtype)
            count = stats.count
            if layout == "in_place":
                stats = None  # its scatter holds the factors now; free its mean
            thresholds = self._fit_thresholds(count, gaussians, batches, shape, n_images, device)
            if store is not None:
                store.complete()
        except BaseException:
            if store is not None:
                store.discard()
            raise
        self._set_fitted(shape, count, stats, gaussians, thresholds)
        suspects, n_training = self._suspects()
        warn_of_suspects(suspects, n_training, stacklevel=5)  # past fit and _fit_context
        return self

    def _suspects(self) -> tuple:
        """The suspect training images and the number of training images (if known)."""
        return getattr(self, "suspect_indices_", ()), len(getattr(self, "training_scores_", ()))

    def _fit_thresholds(self, count: int, gaussians, batches, shape, n_images: int, device):
        """The thresholds from the training images' leave-one-out maps (their own scores
        under the model fitted on all ``count`` samples are far lower than a new normal
        image's); ``batches()`` gives the training features again."""
        if count < 2:
            message = too_few_images(self.false_alarm_rate, n_images)
            if self.false_alarm_rate is not None:
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=5)  # past sklearn's _fit_context
            return given_threshold(self.threshold)
        if self.false_alarm_rate is not None:
            conformal_rank(n_images, self.false_alarm_rate)  # too few images: before scoring
        scoring = scoring_gaussians(gaussians, shape, self.texture_tile)
        grids = held_out_grids(batches, scoring, count, n_images)
        return self._thresholds_of(grids, shape, n_images, device)

    def _layout(self, n_positions: int, n_features: int) -> str:
        """Where the fitted arrays go (:func:`sk_padim.fitting.memory_layout`)."""
        return memory_layout(n_positions, n_features, self.max_memory, self.store)

    def _thresholds_of(self, grids, shape, n_images: int, device) -> dict:
        """The fitted attributes set from the maps of held-out distance grids (an iterable
        of batches): :func:`sk_padim.fitting.thresholds_from_grids`."""
        maps = self._map_generator(shape, device)
        return thresholds_from_grids(
            grids, maps, n_images, self.threshold, self.false_alarm_rate, self.pixel_quantile
        )

    def _set_fitted(self, shape, count, stats, gaussians=None, thresholds=None):
        """Replace the fitted state at once: the statistics (with their ``gaussians``, if
        made already) or, for a model that keeps no statistics, its ``gaussians``; the
        ``thresholds`` are fitted attributes by name (``threshold_``, ...)."""
        for name in THRESHOLD_ATTRIBUTES:
            vars(self).pop(name, None)
        self.n_samples_seen_, self.n_features_in_ = int(count), int(shape[0])
        self.feature_shape_ = tuple(int(size) for size in shape)
        self.statistics_ = stats
        self._gaussians_by_device = PerDeviceCache()
        if stats is None:
            self._stored_gaussians, self._stored_reg = gaussians, float(self.reg)
        elif gaussians is not None:
            key = (gaussians.mean_high.device, self.reg, self.covariance_dtype)
            self._gaussians_by_device.put(key, gaussians)
        for name, value in (thresholds or {}).items():
            setattr(self, name, value)

    def _gaussians(self, device: torch.device) -> PatchGaussians:
        """The fitted Gaussians on ``device``, factorised or moved there once."""
        if self.statistics_ is None:
            stored = (self._stored_reg, self._stored_gaussians.storage)
            if (self.reg, self.covariance_dtype) != stored:
                raise ValueError(
                    f"This detector keeps its Gaussians only (made with reg={stored[0]!r}, "
                    f"covariance_dtype={stored[1]!r}), no statistics, so it scores only with "
                    "those; set them back, or refit."
                )

        def build() -> PatchGaussians:
            if self.statistics_ is None:
                return self._stored_gaussians.to(device)
            stats = self.statistics_
            if not isinstance(stats.scatter, torch.Tensor):  # in a store: out of core
                if self._layout(stats.n_positions, stats.n_features) == "store_all":
                    raise ValueError(
                        "Gaussians larger than max_memory are made in the store at fit "
                        "only; refit with this reg (or covariance_dtype) to score with it."
                    )
            return stats.to(device).gaussians(self.reg, self.covariance_dtype)

        return self._gaussians_by_device.get((device, self.reg, self.covariance_dtype), build)

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

    def _map_generator(self, shape, device: torch.device) -> AnomalyMapGenerator:
        size = (4 * shape[1], 4 * shape[2]) if self.map_size is None else self._check_map_size()
        return AnomalyMapGenerator(shape[1:], size, self.sigma, self.truncate).to(device)

    def _check_map_size(self) -> tuple[int, int] | None:
        return None if self.map_size is None else size_pair(self.map_size, "map_size")

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_gaussians_by_device", None)
        if self.covariance_dtype == "float16" and state.get("statistics_") is not None:
            # Saved as the rounded whitening factors, half the bytes (covariance_dtype).
            gaussians = self._gaussians(resolve_device(self.device))
            state.update(statistics_=None, _stored_gaussians=gaussians, _stored_reg=self.reg)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "n_samples_seen_" in state:
            self._gaussians_by_device = PerDeviceCache()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags
