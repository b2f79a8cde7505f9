"""The batched Mahalanobis distance kernel."""

from __future__ import annotations

import torch

from sk_padim.gaussian import centred_position_chunks


def mahalanobis(
    features: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, chunk_positions: int
) -> torch.Tensor:
    """Distance of each patch vector to its position's Gaussian.

    Parameters
    ----------
    features : Tensor of shape (B, d, h, w)
        Patch embeddings.
    mean : Tensor of shape (P, d), P = h * w in row-major order, float64
        Per-position means (subtracted as a float32 hi + lo pair, so exactly enough
        even for features with a large common offset).
    factor : Tensor of shape (P, d, d)
        Per-position whitening factor ``U`` (see :func:`sk_padim.gaussian.whitening_factor`).
    chunk_positions : int
        Positions processed per matmul, to keep the temporaries small.

    Returns
    -------
    distances : Tensor of shape (B, h, w)
        ``sqrt((x - m)^T C^{-1} (x - m))``, the square root as in PaDiM.
    """
    n_images, n_features, height, width = features.shape
    flat = features.reshape(n_images, n_features, height * width)
    distances = features.new_empty(height * width, n_images)
    whitened = None
    for positions, centred in centred_position_chunks(flat, mean, chunk_positions):
        if whitened is None:
            whitened = torch.empty_like(centred)
        out = whitened[: len(centred)]
        torch.bmm(centred, factor[positions], out=out)
        torch.linalg.vector_norm(out, dim=-1, out=distances[positions])
    return distances.T.reshape(n_images, height, width)
