"""Fit a PaDiM pipeline on more images than fit in memory.

A plain ``Pipeline.fit`` hands the detector every image's features at once, by
scikit-learn's design: ``n * d * h * w * 4`` bytes (1.25 MB per image for ResNet-18,
d=100 at 224 px; 6.9 MB for Wide-ResNet-50-2, d=550). :func:`fit_streaming` instead
transforms a chunk of images at a time and folds each chunk into the detector's running
statistics (:meth:`PadimDetector.partial_fit`), so memory stays flat whatever the number
of images.
"""

from __future__ import annotations

from sklearn.base import clone
from sklearn.pipeline import Pipeline
from tqdm.auto import tqdm

from sk_padim.images import check_images
from sk_padim.pipelines import padim_steps


def fit_streaming(pipeline: Pipeline, X, chunk_size: int = 256, verbose: bool = False):
    """Fit a ``[PatchFeatureTransformer, PadimDetector]`` pipeline chunk by chunk.

    The result equals ``pipeline.fit(X)`` (to float32 rounding) except for
    ``threshold_``: the training images are not scored a second time, so the detector
    sets ``threshold_`` only from an explicit ``threshold`` parameter (as
    :meth:`PadimDetector.partial_fit` does). The pipeline's two steps are replaced by
    fitted copies once every chunk is in, so if the fit fails or is interrupted, the
    pipeline keeps its previous steps.

    Parameters
    ----------
    pipeline : Pipeline
        Two steps: a :class:`PatchFeatureTransformer` then a :class:`PadimDetector`.
    X : array-like or list
        Images of normal parts: an array, or a list of file paths, PIL images or arrays.
        A list of paths is the way to fit on more images than fit in memory.
    chunk_size : int, default=256
        Images transformed at a time; memory grows with it, not with ``len(X)``.
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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
    images = check_images(X)
    # Fit copies and put them in the pipeline only at the end: a failure (an unreadable
    # image in a late chunk, an interrupt) leaves the pipeline as it was.
    new_feat = clone(feat).fit(images)
    new_detector = clone(detector)
    starts = range(0, len(images), chunk_size)
    for start in tqdm(starts, disable=not verbose, unit="chunk", desc="fit"):
        new_detector.partial_fit(new_feat.transform(images[start : start + chunk_size]))
    pipeline.steps[0] = (feat_name, new_feat)
    pipeline.steps[1] = (detector_name, new_detector)
    return pipeline
