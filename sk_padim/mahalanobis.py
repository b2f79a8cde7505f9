"""The batched Mahalanobis distance kernel."""

from __future__ import annotations

import torch

from sk_padim.gaussian import position_major


def mahalanobis(
    features: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, chunk_positions: int
) -> torch.Tensor:
    """Distance of each patch vector to its position's Gaussian.

    Parameters
    ----------
    features : Tensor of shape (B, d, h, w)
        Patch embeddings.
    mean : Tensor of shape (P, d), P = h * w in row-major order
        Per-position means.
    factor : Tensor of shape (P, d, d)
        Per-position whitening factor ``U`` (see :func:`sk_padim.gaussian.whitening_factor`).
    chunk_positions : int
        Positions processed per matmul, to bound the temporary memory.

    Returns
    -------
    distances : Tensor of shape (B, h, w)
        ``sqrt((x - m)^T C^{-1} (x - m))``, the square root as in PaDiM.
    """
    n_images, _, height, width = features.shape
    vectors = position_major(features)
    distances = torch.empty(height * width, n_images, device=features.device)
    for start in range(0, height * width, chunk_positions):
        stop = start + chunk_positions
        centred = vectors[start:stop] - mean[start:stop, None, :]
        whitened = torch.bmm(centred, factor[start:stop])
        distances[start:stop] = whitened.square().sum(dim=-1)
    return distances.sqrt_().T.reshape(n_images, height, width)
