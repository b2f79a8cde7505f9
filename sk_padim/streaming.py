"""Fit and score a PaDiM pipeline on more images than fit in memory.

A plain ``Pipeline.fit`` hands the detector every image's features at once, by
scikit-learn's design: ``n * d * h * w * 4`` bytes (1.25 MB per image for ResNet-18,
d=100 at 224 px; 6.9 MB for Wide-ResNet-50-2, d=550). :func:`fit_streaming` instead
transforms a chunk of images at a time and folds each chunk into the detector's running
statistics (:meth:`PadimDetector.fit_batches`), so memory stays flat whatever the number
of images.

Scoring has the same shape: ``score_samples`` returns every image's map at once
(``4 * H * W`` bytes each: 64 MB for a 16-megapixel image), and a Pipeline's
``decision_function`` holds every image's features. :func:`iter_scores` scores a batch
at a time and yields each image's map and score, so that a caller writes them as they
come.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from sk_padim._checks import check_int
from sk_padim.core.images import check_images
from sk_padim.core.tiling import images_per_pass
from sk_padim.pipelines import padim_steps

__all__ = ["ScoredImage", "fit_streaming", "iter_scores"]


def fit_streaming(
    pipeline: Pipeline, X, chunk_size: int | None = None, verbose: bool = False
) -> Pipeline:
    """Fit a ``[PatchFeatureTransformer, PadimDetector]`` pipeline a chunk of images at a time.

    The result equals ``pipeline.fit(X)`` (to float32 rounding), thresholds included,
    but memory holds one chunk's features instead of every image's: the detector fits
    with :meth:`PadimDetector.fit_batches`, which transforms the images twice, once to
    accumulate the statistics and once to score the training images for the thresholds
    (so the backbone runs twice per image). This is the route for high-resolution
    images, where a Pipeline's ``fit`` holds ``4 d h w`` bytes per image (105 MB at
    2048 x 2048, ``d=100``). The pipeline's two steps are replaced by fitted copies
    once the fit is done, so if it fails or is interrupted, the pipeline keeps its
    previous steps.

    Parameters
    ----------
    pipeline : Pipeline
        Two steps: a :class:`PatchFeatureTransformer` then a :class:`PadimDetector`.
    X : array-like or list
        Images of normal parts: an array, or a list of file paths, PIL images or arrays.
        A list of paths is the way to fit on more images than fit in memory.
    chunk_size : int or None, default=None
        Images transformed at a time; memory grows with it, not with ``len(X)``.
        ``None``: the images of one backbone pass (``sk_padim.core.tiling.images_per_pass``:
        32 images of 224 x 224, one of 1024 x 1024 or more).
    verbose : bool, default=False
        Show a progress bar over chunks.

    Returns
    -------
    pipeline : Pipeline
        The same pipeline object, its two steps replaced by fitted copies.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import Pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming
    >>> X = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    >>> pipe = Pipeline([
    ...     ("feat", PatchFeatureTransformer(weights=None, image_size=32, n_features=8)),
    ...     ("padim", PadimDetector()),
    ... ])
    >>> fit_streaming(pipe, X, chunk_size=4).named_steps["padim"].n_samples_seen_
    6
    """
    (feat_name, feat), (detector_name, detector) = padim_steps(pipeline, "fit_streaming")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    images = check_images(X)
    # Fit copies and put them in the pipeline only at the end: a failure (an unreadable
    # image in a late chunk, an interrupt) leaves the pipeline as it was.
    new_feat = clone(feat).fit(images)
    if chunk_size is None:
        chunk_size = images_per_pass(new_feat.image_size_, new_feat.batch_size)
    starts = range(0, len(images), chunk_size)

    def chunks():
        for start in tqdm(starts, disable=not verbose, unit="chunk", desc="fit"):
            yield new_feat.transform(images[start : start + chunk_size])

    new_detector = clone(detector).fit_batches(chunks)
    pipeline.steps[0] = (feat_name, new_feat)
    pipeline.steps[1] = (detector_name, new_detector)
    return pipeline


class ScoredImage(NamedTuple):
    """One image's result from :func:`iter_scores`."""

    index: int
    """The image's position in ``X`` (for a folder, in its sorted list of files)."""
    map: np.ndarray
    """Its anomaly map ``(H, W)``, float32, its own array (not a view of the batch's)."""
    score: float
    """Its image score, the maximum of the map (as ``decision_function``)."""


def iter_scores(estimator, X, batch_size: int = 32) -> Iterator[ScoredImage]:
    """Score images a batch at a time, yielding each image's map and score.

    Only one batch of images is read, and one batch of features and maps held, at a
    time, whatever the number of images: ``batch_size`` bounds the memory, ``len(X)``
    does not. The maps and scores equal ``estimator.score_samples(X)`` and
    ``estimator.decision_function(X)``. Images given as file paths or a folder are read
    when their batch is scored, so an unreadable file raises (a ``ValueError`` naming
    it) once the images before its batch have been yielded.

    Parameters
    ----------
    estimator : fitted estimator
        A fitted ``Pipeline([PatchFeatureTransformer, PadimDetector])``, a calibrator
        around one, or any estimator whose ``score_samples(images)`` gives anomaly maps
        ``(n, H, W)`` whose maximum is the image score.
    X : array-like, list or folder
        Images, as ``score_samples`` takes them: an array, a list of arrays, PIL images
        or file paths, or a folder of image files.
    batch_size : int, default=32
        Images scored at a time. Memory holds this many images' features
        (``4 * d * h * w`` bytes each) and maps (``4 * H * W`` bytes each); for
        16-megapixel images, use 1 to 4.

    Yields
    ------
    scored : ScoredImage
        ``(index, map, score)`` for each image, in the order of ``X``.

    See Also
    --------
    fit_streaming : The fit, a chunk of images at a time.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import Pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer
    >>> from sk_padim.streaming import iter_scores
    >>> X = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    >>> pipe = Pipeline([
    ...     ("feat", PatchFeatureTransformer(weights=None, image_size=32, n_features=8)),
    ...     ("padim", PadimDetector()),
    ... ]).fit(X[:4])
    >>> for index, anomaly_map, score in iter_scores(pipe, X[4:], batch_size=2):
    ...     print(index, anomaly_map.shape, score == anomaly_map.max())
    0 (32, 32) True
    1 (32, 32) True
    2 (32, 32) True
    """
    check_int(batch_size, "batch_size", 1)
    if not hasattr(estimator, "score_samples"):
        raise TypeError(
            "iter_scores needs a fitted estimator with score_samples, such as "
            f"Pipeline([PatchFeatureTransformer(), PadimDetector()]); got "
            f"{type(estimator).__name__}."
        )
    images = check_images(X)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        # Only the loop holds the batch's maps: they are freed before the next batch.
        for offset, image_map in enumerate(_host(estimator.score_samples(batch))):
            image_map = image_map.copy()  # not a view, which would keep the whole batch
            yield ScoredImage(start + offset, image_map, float(image_map.max()))


def _host(maps) -> np.ndarray:
    """Maps as a NumPy array (tensors, on any device, copied to the host)."""
    return maps.cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
