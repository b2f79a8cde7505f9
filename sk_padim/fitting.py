"""The steps of a :class:`~sk_padim.PadimDetector` fit, as functions of its parameters.

The detector composes them: texture mode's tiling of a feature grid
(:func:`feature_tiles`, :func:`n_positions`, :func:`scoring_gaussians`), where the fitted
arrays go under ``max_memory`` (:func:`memory_layout`), the statistics of feature batches
(:func:`accumulate`, :func:`fit_statistics`) and their Gaussians (:func:`fit_gaussians`),
the training images' held-out distance grids (:func:`held_out_grids`), and the
thresholds set from their maps (:func:`thresholds_from_grids`, recorded as
:func:`threshold_rule` says).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from sk_padim.conformal import (
    SuspectTrainingImagesWarning,
    conformal_threshold,
    implied_false_alarm_rate,
    suspect_indices,
)
from sk_padim.core.images import size_pair
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.postprocess import AnomalyMapGenerator, image_scores_and_pixel_quantile
from sk_padim.core.statistics import PatchStatistics, held_out_distances
from sk_padim.core.store import StoreFolder
from sk_padim.core.texture import FeatureTiles, TiledGaussians

__all__ = [
    "THRESHOLD_ATTRIBUTES",
    "accumulate",
    "check_threshold_rule",
    "feature_tiles",
    "first_shape",
    "fit_gaussians",
    "fit_statistics",
    "given_threshold",
    "held_out_grids",
    "memory_layout",
    "n_positions",
    "scoring_gaussians",
    "threshold_attributes",
    "threshold_record",
    "threshold_rule",
    "thresholds_from_grids",
    "too_few_images",
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


def feature_tiles(shape, texture_tile) -> FeatureTiles | None:
    """The texture tiling of ``(d, h, w)`` features, or None (one Gaussian per cell)."""
    if texture_tile is None:
        return None
    return FeatureTiles(shape[1:], size_pair(texture_tile, "texture_tile"))


def n_positions(shape, texture_tile) -> int:
    """Positions of the Gaussians of ``(d, h, w)`` features: the grid's, or a tile's."""
    tiles = feature_tiles(shape, texture_tile)
    return shape[1] * shape[2] if tiles is None else tiles.tile[0] * tiles.tile[1]


def scoring_gaussians(gaussians: PatchGaussians, shape, texture_tile):
    """``gaussians`` as they score ``(d, h, w)`` features: tile by tile in texture mode."""
    tiles = feature_tiles(shape, texture_tile)
    return gaussians if tiles is None else TiledGaussians(gaussians, tiles)


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


def first_shape(batches: Iterator[torch.Tensor]) -> tuple[tuple[int, ...], Iterator[torch.Tensor]]:
    """The ``(d, h, w)`` of the first of feature ``batches``, and all the batches."""
    first = next(batches, None)
    if first is None:
        raise ValueError("There are no features to fit on: give features of one image or more.")
    return tuple(first.shape[1:]), itertools.chain([first], batches)


def accumulate(batch: torch.Tensor, stats: PatchStatistics, texture_tile) -> None:
    """Add a batch of features (or of their tiles, in texture mode) to ``stats``."""
    tiles = feature_tiles(batch.shape[1:], texture_tile)
    stats.update(batch if tiles is None else tiles.samples(batch))


def fit_statistics(
    batches: Iterable[torch.Tensor], shape, texture_tile, store: StoreFolder | None, device
) -> tuple[PatchStatistics, int]:
    """The statistics of the feature ``batches`` (scatter in ``store`` if given) and the
    number of images."""
    positions, d = n_positions(shape, texture_tile), shape[0]
    scatter = None
    if store is not None:
        scatter = store.create("scatter", (positions, d * (d + 1) // 2), torch.float32)
    stats = PatchStatistics.empty(positions, d, device, scatter=scatter)
    n_images = 0
    for batch in batches:
        n_images += len(batch)
        accumulate(batch, stats, texture_tile)
        del batch  # not held while the next batch is made (streamed fits)
    return stats.check_finite(), n_images


def fit_gaussians(
    stats: PatchStatistics, layout: str, store: StoreFolder | None, reg: float, storage: str
) -> PatchGaussians:
    """The Gaussians of ``stats``, laid out as ``layout`` (:func:`memory_layout`)."""
    factor_out = None  # a new tensor
    if layout == "in_place":
        factor_out = stats.scatter
    elif layout == "store_all":
        factor_out = store.create("factor", tuple(stats.scatter.shape), torch.float32)
    return stats.gaussians(reg, storage, factor_out)


def held_out_grids(
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


def check_threshold_rule(threshold, false_alarm_rate) -> None:
    if threshold is not None and false_alarm_rate is not None:
        raise ValueError(
            f"threshold={threshold!r} and false_alarm_rate={false_alarm_rate!r} "
            "both set the image threshold; give one of them (set the other to None)."
        )


def too_few_images(false_alarm_rate, n_images: int) -> str:
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


def given_threshold(threshold) -> dict:
    """The fitted attributes of an explicit ``threshold`` (none without one)."""
    if threshold is None:
        return {}
    rule = threshold_rule("given", None, None, None, None)
    return {"threshold_": float(threshold), "threshold_rule_": rule}


def thresholds_from_grids(
    grids: Iterable[torch.Tensor],
    maps: AnomalyMapGenerator,
    n_images: int,
    threshold,
    false_alarm_rate,
    pixel_quantile: float,
) -> dict:
    """The fitted attributes set from the ``maps`` of held-out distance ``grids`` (an
    iterable of batches): their image scores (``training_scores_``), the image threshold
    (``threshold``, or by ``false_alarm_rate``), how it was set, the ``pixel_quantile``
    of their pixels and the suspect training images."""
    with torch.inference_mode():
        scores, pixel = image_scores_and_pixel_quantile(grids, maps, n_images, pixel_quantile)
    if threshold is not None:
        threshold, rule = float(threshold), "given"
    elif false_alarm_rate is not None:
        threshold, rule = conformal_threshold(scores, false_alarm_rate), "false_alarm_rate"
    else:
        threshold, rule = float(scores.max()), "highest_training_score"
    implied = implied_false_alarm_rate(scores, threshold)
    return {
        "threshold_": threshold,
        "pixel_threshold_": pixel,
        "training_scores_": scores,
        "threshold_rule_": threshold_rule(
            rule, false_alarm_rate, implied, len(scores), pixel_quantile
        ),
        "suspect_indices_": suspect_indices(scores),
    }


def threshold_rule(rule, rate, implied, n_images, pixel_quantile) -> dict:
    """``threshold_rule_``: how the image threshold was set."""
    return {
        "rule": rule,
        "false_alarm_rate": None if rate is None else float(rate),
        "implied_false_alarm_rate": implied,
        "n_training_images": n_images,
        "pixel_quantile": None if pixel_quantile is None else float(pixel_quantile),
    }


def threshold_record(detector) -> dict:
    """A fitted detector's threshold attributes as JSON-able values (those it has)."""
    record = {}
    for name in ("threshold_", "pixel_threshold_"):
        if hasattr(detector, name):
            record[name] = float(getattr(detector, name))
    for name in ("training_scores_", "suspect_indices_"):
        if hasattr(detector, name):
            record[name] = getattr(detector, name).tolist()
    if hasattr(detector, "threshold_rule_"):
        record["threshold_rule_"] = dict(detector.threshold_rule_)
    return record


def threshold_attributes(record: dict) -> dict:
    """The threshold attributes of a :func:`threshold_record`, as fitted values."""
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


def warn_of_suspects(suspects, n_training: int, stacklevel: int) -> None:
    """Warn when a fit found ``suspects`` among its ``n_training`` images (``stacklevel``
    as for ``warnings.warn`` called in this function)."""
    if len(suspects):
        listed = ", ".join(map(str, suspects[:20])) + (", ..." if len(suspects) > 20 else "")
        warnings.warn(
            f"{len(suspects)} of {n_training} training images score as "
            f"outliers among the training images (indices {listed}): perhaps defective "
            "parts among the good ones. Look at them (suspect_indices_), and refit without "
            "those that are defective.",
            SuspectTrainingImagesWarning,
            stacklevel=stacklevel,
        )
