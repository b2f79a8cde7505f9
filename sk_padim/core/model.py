"""The torch core: pixels -> ``(maps, scores)`` in one module, on any device.

``PatchScorer`` is the fitted detector as a module (features -> maps and image
scores); :class:`PadimModel` puts the patch embedding in front of it. Both are plain
tensor programs with no per-image Python control flow, so they run batched on a GPU,
are shared by any number of threads, and export (``torch.onnx``) as they are. The
scikit-learn estimators build them (``PatchFeatureTransformer.to_module``,
``PadimDetector.to_module``) and run them; this module holds no estimator logic.
"""

from __future__ import annotations

import torch
from torch import nn

from sk_padim.core.embedding import PatchEmbedding
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.postprocess import AnomalyMapGenerator

__all__ = ["PadimModel"]


class PatchScorer(nn.Module):
    """Features ``(B, d, h, w)`` -> anomaly maps ``(B, H, W)`` and image scores ``(B,)``.

    Parameters
    ----------
    gaussians : PatchGaussians
        The per-position Gaussians: features -> distance grids.
    maps : AnomalyMapGenerator
        Distance grids -> upsampled, smoothed maps.

    Examples
    --------
    >>> import numpy as np
    >>> from sk_padim import PadimDetector
    >>> X = np.random.default_rng(0).normal(size=(8, 4, 3, 3)).astype(np.float32)
    >>> scorer = PadimDetector().fit(X).to_module("cpu")
    >>> maps, scores = scorer(torch.from_numpy(X))
    >>> maps.shape, scores.shape
    (torch.Size([8, 12, 12]), torch.Size([8]))
    """

    def __init__(self, gaussians: PatchGaussians, maps: AnomalyMapGenerator):
        super().__init__()
        self.gaussians = gaussians
        self.maps = maps

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maps_of_distances(self.gaussians(features))

    def maps_of_distances(self, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and image scores (the maximum of each map) of distance grids ``(B, h, w)``."""
        return self.maps.maps_and_scores(distances)

    def score_batches(
        self, batches, n_images: int, device: torch.device, keep_maps: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Score feature batches, gathering the results on ``device``.

        Parameters
        ----------
        batches : iterable of Tensor of shape (B, d, h, w)
            ``n_images`` feature maps in all, on the module's device.
        n_images : int
            Number of images in all the batches.
        device : torch.device
            Where the results are gathered.
        keep_maps : bool, default=True
            Gather the maps too; otherwise each batch's maps are dropped once scored.

        Returns
        -------
        maps : Tensor of shape (n_images, H, W) or None
            The anomaly maps (None unless ``keep_maps``).
        scores : Tensor of shape (n_images,)
            The image scores.
        """
        scores = torch.empty(n_images, device=device)
        maps = torch.empty((n_images, *self.maps.size), device=device) if keep_maps else None
        start = 0
        for batch in batches:
            with torch.inference_mode():
                batch_maps, batch_scores = self(batch)
            if keep_maps:
                maps[start : start + len(batch)] = batch_maps
            scores[start : start + len(batch)] = batch_scores
            start += len(batch)
        return maps, scores


class PadimModel(nn.Module):
    """A fitted PaDiM pipeline as one module: pixels -> ``(maps, scores)``.

    :func:`sk_padim.pipelines.padim_model` makes it from a fitted pipeline.

    Parameters
    ----------
    embedding : PatchEmbedding
        Pixels -> features.
    scorer : PatchScorer
        Features -> maps and scores.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sklearn.pipeline import Pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer
    >>> from sk_padim.core.model import PadimModel
    >>> X = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> pipe = Pipeline([
    ...     ("feat", PatchFeatureTransformer(weights=None, image_size=32, n_features=8)),
    ...     ("padim", PadimDetector()),
    ... ]).fit(X)
    >>> model = PadimModel(pipe[0].to_module("cpu"), pipe[1].to_module("cpu")).eval()
    >>> with torch.inference_mode():
    ...     maps, scores = model(torch.from_numpy(X).permute(0, 3, 1, 2))
    >>> bool(np.allclose(scores.numpy(), pipe.decision_function(X), atol=1e-4))
    True
    """

    def __init__(self, embedding: PatchEmbedding, scorer: PatchScorer):
        super().__init__()
        self.embedding = embedding
        self.scorer = scorer

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score images.

        Parameters
        ----------
        pixels : Tensor of shape (B, 3, H, W)
            Pixels, uint8 0-255 or float 0-1, already at the transformer's ``image_size``.

        Returns
        -------
        maps : Tensor of shape (B, H_map, W_map)
            Pixel anomaly maps.
        scores : Tensor of shape (B,)
            Image anomaly scores, the maximum of each map.
        """
        return self.scorer(self.embedding(pixels))
