"""The ways of fitting a :class:`~sk_padim.PadimDetector`, as functions of its parameters.

Each gives a :class:`Fit` (shape, count, statistics, Gaussians, threshold attributes)
that the detector takes at once: :func:`fit_passes` (``fit`` and ``fit_batches``: the
statistics of feature batches, their Gaussians laid out under ``max_memory`` by
:func:`memory_layout`, and the thresholds from the training images' held-out maps),
:func:`added_fit` (``partial_fit``), :func:`statistics_fit` (``from_statistics``) and
:func:`state_fit` (``from_fitted_state``). The detector's scoring uses
:func:`scoring_gaussians` (texture mode's tiles) and :func:`map_generator`; its files
record the fit with :func:`fitted_record`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from sk_padim.conformal import (
    SuspectTrainingImagesWarning,
    conformal_rank,
    conformal_threshold,
    implied_false_alarm_rate,
    suspect_indices,
)
from sk_padim.core.devices import resolve_device
from sk_padim.core.feature_checks import feature_batches
from sk_padim.core.images import size_pair
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.postprocess import AnomalyMapGenerator, image_scores_and_pixel_quantile
from sk_padim.core.statistics import PatchStatistics, held_out_distances
from sk_padim.core.store import StoreFolder
from sk_padim.core.texture import FeatureTiles, TiledGaussians

__all__ = [
    "THRESHOLD_ATTRIBUTES",
    "Fit",
    "added_fit",
    "fit_passes",
    "fitted_record",
    "map_generator",
    "memory_layout",
    "scoring_gaussians",
    "state_fit",
    "statistics_fit",
    "warn_of_suspects",
]

THRESHOLD_ATTRIBUTES = (
    "threshold_",
    "pixel_threshold_",
    "training_scores_",
    "threshold_rule_",
    "suspect_indices_",
)
"""The fitted attributes that the thresholds set (each only where it is known)."""


def _feature_tiles(shape, texture_tile) -> FeatureTiles | None:
    """The texture tiling of ``(d, h, w)`` features, or None (one Gaussian per cell)."""
    if texture_tile is None:
        return None
    return FeatureTiles(shape[1:], size_pair(texture_tile, "texture_tile"))


def _n_positions(shape, texture_tile) -> int:
    """Positions of the Gaussians of ``(d, h, w)`` features: the grid's, or a tile's."""
    tiles = _feature_tiles(shape, texture_tile)
    return shape[1] * shape[2] if tiles is None else tiles.tile[0] * tiles.tile[1]


def scoring_gaussians(gaussians: PatchGaussians, shape, texture_tile):
    """``gaussians`` as they score ``(d, h, w)`` features: tile by tile in texture mode."""
    tiles = _feature_tiles(shape, texture_tile)
    return gaussians if tiles is None else TiledGaussians(gaussians, tiles)


def map_generator(shape, params: dict, device) -> AnomalyMapGenerator:
    """The maps of ``(d, h, w)`` features, by the detector's ``params``: ``map_size``
    (four times the grid by default), ``sigma`` and ``truncate``."""
    size = params["map_size"]
    size = (4 * shape[1], 4 * shape[2]) if size is None else size_pair(size, "map_size")
    return AnomalyMapGenerator(shape[1:], size, params["sigma"], params["truncate"]).to(device)


def memory_layout(n_positions: int, n_features: int, max_memory: float, store) -> str:
    """Where the fitted arrays go under ``max_memory`` GiB: ``"memory"`` (statistics and
    Gaussians), ``"in_place"`` (the Gaussians replace the statistics),
    ``"store_statistics"`` or ``"store_all"`` (those arrays in the ``store`` folder)."""
    array_bytes = n_positions * (8 * n_features + 2 * n_features * (n_features + 1))
    limit = max_memory * 2**30
    if 2 * array_bytes <= limit:
        return "memory"
    if array_bytes <= limit:
        return "in_place" if store is None else "store_statistics"
    if store is None:
        raise ValueError(
            f"The Gaussians of {n_positions} positions x {n_features} features take "
            f"{array_bytes / 2**30:.1f} GiB, more than max_memory={max_memory} GiB: "
            f"set store=<folder> to keep them on disk ({2 * array_bytes / 1e9:.1f} GB), "
            "raise max_memory, or use fewer features or a smaller image_size."
        )
    return "store_all"


class Fit(NamedTuple):
    """What :func:`fit_passes` fitted, for the detector to take at once."""

    shape: tuple[int, int, int]
    count: int
    statistics: PatchStatistics | None  # None: the Gaussians replaced them (in place)
    gaussians: PatchGaussians
    thresholds: dict  # fitted attributes by name (THRESHOLD_ATTRIBUTES)


def fit_passes(batches: Callable[[], Iterator[torch.Tensor]], device, params: dict) -> Fit:
    """Fit on ``batches()``, feature batches on ``device``, by the detector's ``params``:
    one pass accumulates the statistics, a second scores the training images for the
    thresholds. An error or an interrupt deletes what the fit wrote to ``store``."""
    _check_threshold_rule(params["threshold"], params["false_alarm_rate"])
    texture_tile = params["texture_tile"]
    shape, stream = _first_shape(batches())
    layout = memory_layout(
        _n_positions(shape, texture_tile), shape[0], params["max_memory"], params["store"]
    )
    store = StoreFolder(params["store"]) if layout.startswith("store") else None
    try:
        stats, n_images = _fit_statistics(stream, shape, texture_tile, store, device)
        gaussians = _fit_gaussians(stats, layout, store, params["reg"], params["covariance_dtype"])
        count = stats.count
        if layout == "in_place":
            stats = None  # its scatter holds the factors now; free its mean
        thresholds = _fitted_thresholds(count, gaussians, batches, shape, n_images, params, device)
        if store is not None:
            store.complete()
    except BaseException:
        if store is not None:
            store.discard()
        raise
    return Fit(shape, count, stats, gaussians, thresholds)


def added_fit(
    previous: PatchStatistics | None, features: torch.Tensor, params: dict, device
) -> Fit:
    """``partial_fit``: the statistics of ``features`` added to a copy of ``previous``
    (None in a first call); thresholds only from an explicit ``threshold``."""
    shape, texture_tile = tuple(features.shape[1:]), params["texture_tile"]
    if previous is None:
        positions, d = _n_positions(shape, texture_tile), shape[0]
        if memory_layout(positions, d, params["max_memory"], params["store"]) != "memory":
            raise ValueError(
                f"partial_fit keeps the statistics and Gaussians of {positions} positions in "
                f"memory, more than max_memory={params['max_memory']} GiB: fit on all the "
                "images at once (fit writes what does not fit to store), or raise max_memory."
            )
        stats = PatchStatistics.empty(positions, d, device)
    else:
        stats = previous.to(device).copy()
    for batch in feature_batches(features, params["batch_size"], device):
        _accumulate(batch, stats, texture_tile)
    stats = stats.check_finite()
    return Fit(shape, stats.count, stats, None, _given_threshold(params["threshold"]))


def statistics_fit(
    statistics: PatchStatistics, feature_shape, held_out_distances, params: dict
) -> Fit:
    """``from_statistics``: given statistics of ``(d, h, w)`` features, with thresholds
    from the maps of ``held_out_distances`` (batches of grids) if given."""
    _check_threshold_rule(params["threshold"], params["false_alarm_rate"])
    shape = tuple(int(size) for size in feature_shape)
    if (statistics.n_positions, statistics.n_features) != (
        _n_positions(shape, params["texture_tile"]),
        shape[0],
    ):
        raise ValueError(
            f"Statistics of {statistics.n_positions} positions and "
            f"{statistics.n_features} features do not fit feature_shape={feature_shape}."
        )
    thresholds = _given_threshold(params["threshold"])
    if held_out_distances is not None:
        tiles = _feature_tiles(shape, params["texture_tile"])
        n_images = statistics.count // (1 if tiles is None else tiles.n_tiles)
        device = resolve_device(params["device"])
        thresholds = _thresholds_from_grids(held_out_distances, shape, n_images, params, device)
    return Fit(shape, statistics.count, statistics, None, thresholds)


def state_fit(arrays: dict, record: dict, params: dict) -> Fit:
    """``from_fitted_state``: a saved model's statistics (``mean`` and ``scatter``) or,
    for one that keeps its Gaussians only, its factors, with the thresholds of its
    :func:`fitted_record`, checked against its ``params``."""
    shape = tuple(int(size) for size in record["feature_shape_"])
    count = int(record["n_samples_seen_"])
    thresholds = _threshold_attributes(record)
    if "scatter" in arrays:
        stats = PatchStatistics.from_arrays(count, arrays["mean"], arrays["scatter"])
        return statistics_fit(stats, shape, None, params)._replace(thresholds=thresholds)
    gaussians = PatchGaussians.from_arrays(**arrays)
    if params["covariance_dtype"] != gaussians.storage or (
        (len(gaussians), gaussians.n_features)
        != (_n_positions(shape, params["texture_tile"]), shape[0])
    ):
        raise ValueError(
            f"the stored {gaussians.storage} factors do not fit a "
            f"{params['covariance_dtype']} model of {shape}"
        )
    return Fit(shape, count, None, gaussians, thresholds)


def _fitted_thresholds(count, gaussians, batches, shape, n_images: int, params, device) -> dict:
    """The thresholds from the training images' leave-one-out maps (their own scores
    under the model fitted on all ``count`` samples are far lower than a new normal
    image's); ``batches()`` gives the training features again."""
    rate = params["false_alarm_rate"]
    if count < 2:
        message = _too_few_images(rate, n_images)
        if rate is not None:
            raise ValueError(message)
        # stacklevel: past fit_passes, the detector's fit and scikit-learn's _fit_context
        warnings.warn(message, UserWarning, stacklevel=5)
        return _given_threshold(params["threshold"])
    if rate is not None:
        conformal_rank(n_images, rate)  # too few images: an error before scoring
    scoring = scoring_gaussians(gaussians, shape, params["texture_tile"])
    grids = _held_out_grids(batches, scoring, count, n_images)
    return _thresholds_from_grids(grids, shape, n_images, params, device)


def _first_shape(batches: Iterator[torch.Tensor]) -> tuple[tuple[int, ...], Iterator[torch.Tensor]]:
    """The ``(d, h, w)`` of the first of feature ``batches``, and all the batches."""
    first = next(batches, None)
    if first is None:
        raise ValueError("There are no features to fit on: give features of one image or more.")
    return tuple(first.shape[1:]), itertools.chain([first], batches)


def _accumulate(batch: torch.Tensor, stats: PatchStatistics, texture_tile) -> None:
    """Add a batch of features (or of their tiles, in texture mode) to ``stats``."""
    tiles = _feature_tiles(batch.shape[1:], texture_tile)
    stats.update(batch if tiles is None else tiles.samples(batch))


def _fit_statistics(
    batches: Iterable[torch.Tensor], shape, texture_tile, store: StoreFolder | None, device
) -> tuple[PatchStatistics, int]:
    """The statistics of the feature ``batches`` (scatter in ``store`` if given) and the
    number of images."""
    positions, d = _n_positions(shape, texture_tile), shape[0]
    scatter = None
    if store is not None:
        scatter = store.create("scatter", (positions, d * (d + 1) // 2), torch.float32)
    stats = PatchStatistics.empty(positions, d, device, scatter=scatter)
    n_images = 0
    for batch in batches:
        n_images += len(batch)
        _accumulate(batch, stats, texture_tile)
        del batch  # not held while the next batch is made (streamed fits)
    return stats.check_finite(), n_images


def _fit_gaussians(
    stats: PatchStatistics, layout: str, store: StoreFolder | None, reg: float, storage: str
) -> PatchGaussians:
    """The Gaussians of ``stats``, laid out as ``layout`` (:func:`memory_layout`)."""
    factor_out = None  # a new tensor
    if layout == "in_place":
        factor_out = stats.scatter
    elif layout == "store_all":
        factor_out = store.create("factor", tuple(stats.scatter.shape), torch.float32)
    return stats.gaussians(reg, storage, factor_out)


def _held_out_grids(
    batches: Callable[[], Iterable[torch.Tensor]], scoring, count: int, n_images: int
) -> Iterator[torch.Tensor]:
    """The leave-one-out distance grids of the training features that ``batches()`` gives
    again, a batch at a time, under the Gaussians ``scoring`` fitted on ``count`` samples
    of ``n_images`` images."""
    scored = 0
    for batch in batches():
        scored += len(batch)
        distances = held_out_distances(scoring(batch), count)
        del batch  # not held while the next batch is made (streamed fits)
        yield distances
    if scored != n_images:
        raise ValueError(
            f"The feature batches held {n_images} images when the statistics were "
            f"accumulated and {scored} when they were scored; make_batches must give "
            "the same features each time it is called."
        )


def _check_threshold_rule(threshold, false_alarm_rate) -> None:
    if threshold is not None and false_alarm_rate is not None:
        raise ValueError(
            f"threshold={threshold!r} and false_alarm_rate={false_alarm_rate!r} "
            "both set the image threshold; give one of them (set the other to None)."
        )


def _too_few_images(false_alarm_rate, n_images: int) -> str:
    """Why one training sample sets no thresholds: an error message with
    ``false_alarm_rate``, else the warning's."""
    if false_alarm_rate is not None:
        return (
            f"false_alarm_rate={false_alarm_rate!r} needs at least "
            f"{max(2, math.ceil(round(1 / false_alarm_rate - 1, 9)))} training "
            f"images; got {n_images}. Fit on more images of good parts."
        )
    return (
        "Fitting on one image: covariances are reg * I, and the thresholds need two "
        "images or more. Fit on more images of good parts."
    )


def _given_threshold(threshold) -> dict:
    """The fitted attributes of an explicit ``threshold`` (none without one)."""
    if threshold is None:
        return {}
    rule = _threshold_rule("given", None, None, None, None)
    return {"threshold_": float(threshold), "threshold_rule_": rule}


def _thresholds_from_grids(
    grids: Iterable[torch.Tensor], shape, n_images: int, params: dict, device
) -> dict:
    """The fitted attributes set from the maps of held-out distance ``grids`` of
    ``(d, h, w)`` features (an iterable of batches), by the detector's ``params``: their
    image scores (``training_scores_``), the image threshold (``threshold``, or by
    ``false_alarm_rate``), how it was set, the ``pixel_quantile`` of their pixels and the
    suspect training images."""
    threshold, rate = params["threshold"], params["false_alarm_rate"]
    maps = map_generator(shape, params, device)
    with torch.inference_mode():
        scores, pixel = image_scores_and_pixel_quantile(
            grids, maps, n_images, params["pixel_quantile"]
        )
    if threshold is not None:
        threshold, rule = float(threshold), "given"
    elif rate is not None:
        threshold, rule = conformal_threshold(scores, rate), "false_alarm_rate"
    else:
        threshold, rule = float(scores.max()), "highest_training_score"
    implied = implied_false_alarm_rate(scores, threshold)
    return {
        "threshold_": threshold,
        "pixel_threshold_": pixel,
        "training_scores_": scores,
        "threshold_rule_": _threshold_rule(
            rule, rate, implied, len(scores), params["pixel_quantile"]
        ),
        "suspect_indices_": suspect_indices(scores),
    }


def _threshold_rule(rule, rate, implied, n_images, pixel_quantile) -> dict:
    """``threshold_rule_``: how the image threshold was set."""
    return {
        "rule": rule,
        "false_alarm_rate": None if rate is None else float(rate),
        "implied_false_alarm_rate": implied,
        "n_training_images": n_images,
        "pixel_quantile": None if pixel_quantile is None else float(pixel_quantile),
    }


def fitted_record(detector) -> dict:
    """A fitted detector's counts, shape and threshold attributes as JSON-able values
    (the thresholds it has), which :func:`state_fit` reads back."""
    record = {
        "n_samples_seen_": int(detector.n_samples_seen_),
        "feature_shape_": [int(size) for size in detector.feature_shape_],
    }
    for name in ("threshold_", "pixel_threshold_"):
        if hasattr(detector, name):
            record[name] = float(getattr(detector, name))
    for name in ("training_scores_", "suspect_indices_"):
        if hasattr(detector, name):
            record[name] = getattr(detector, name).tolist()
    if hasattr(detector, "threshold_rule_"):
        record["threshold_rule_"] = dict(detector.threshold_rule_)
    return record


def _threshold_attributes(record: dict) -> dict:
    """The threshold attributes of a :func:`fitted_record`, as fitted values."""
    attributes = {
        name: float(record[name]) for name in ("threshold_", "pixel_threshold_") if name in record
    }
    if "training_scores_" in record:
        attributes["training_scores_"] = np.asarray(record["training_scores_"], np.float32)
    if "suspect_indices_" in record:
        attributes["suspect_indices_"] = np.asarray(record["suspect_indices_"], np.intp)
    if "threshold_rule_" in record:
        attributes["threshold_rule_"] = dict(record["threshold_rule_"])
    return attributes


def warn_of_suspects(detector, stacklevel: int) -> None:
    """Warn when a fitted ``detector`` names suspect training images (``stacklevel`` as
    for ``warnings.warn`` called in this function). The detector warns once it holds
    the fit, so that a warning turned into an error leaves it consistent with its store."""
    suspects = getattr(detector, "suspect_indices_", ())
    if len(suspects):
        listed = ", ".join(map(str, suspects[:20])) + (", ..." if len(suspects) > 20 else "")
        warnings.warn(
            f"{len(suspects)} of {len(detector.training_scores_)} training images score "
            f"as outliers among the training images (indices {listed}): perhaps defective "
            "parts among the good ones. Look at them (suspect_indices_), and refit without "
            "those that are defective.",
            SuspectTrainingImagesWarning,
            stacklevel=stacklevel,
        )
