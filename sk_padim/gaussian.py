"""Streaming, mergeable Gaussian statistics per patch position.

The state is the count ``n``, the mean (float64) and the scatter matrix
``S = sum_i (x_i - mean)(x_i - mean)^T`` (float32) at each of ``P`` positions. Batches are
folded in with the pairwise update of Chan, Golub and LeVeque: the batch is centred on its
own mean, and the shift between the two means enters as one extra rank-one term,

    S = S_a + S_b + (n_a n_b / n) (mean_b - mean_a)(mean_b - mean_a)^T,

which is numerically stable in float32 because nothing large is subtracted. Memory is
``O(P d^2)`` whatever the number of images, and statistics of any split of the data merge
to the statistics of the whole.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch


@dataclass
class GaussianStatistics:
    """Count, per-position mean ``(P, d)`` float64 and scatter ``(P, d, d)`` float32."""

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def empty(cls, n_positions: int, n_features: int, device) -> GaussianStatistics:
        return cls(
            0,
            torch.zeros(n_positions, n_features, dtype=torch.float64, device=device),
            torch.zeros(n_positions, n_features, n_features, dtype=torch.float32, device=device),
        )

    def update(self, batch: torch.Tensor) -> None:
        """Fold a batch of position-major vectors ``(B, P, d)`` into the statistics."""
        n_batch = len(batch)
        total = self.count + n_batch
        batch = batch.to(torch.float64)
        batch_mean = batch.mean(dim=0)
        delta = batch_mean - self.mean
        # Rows whose Gram matrix is the batch scatter plus the mean-shift correction.
        rows = torch.cat(
            [batch - batch_mean, math.sqrt(self.count * n_batch / total) * delta[None]]
        )
        rows = rows.to(torch.float32).transpose(0, 1).contiguous()  # (P, B + 1, d)
        self.scatter.baddbmm_(rows.transpose(1, 2), rows)
        self.mean += delta * (n_batch / total)
        self.count = total

    def merge(self, other: GaussianStatistics) -> GaussianStatistics:
        """Statistics of the union of both operands' samples (operands unchanged)."""
        total = self.count + other.count
        delta = (other.mean - self.mean).to(torch.float32)
        weight = self.count * other.count / total
        scatter = self.scatter + other.scatter + weight * delta[:, :, None] * delta[:, None, :]
        mean = self.mean + (other.mean - self.mean) * (other.count / total)
        return GaussianStatistics(total, mean, scatter)

    def covariance(self, reg: float, positions: slice = slice(None)) -> torch.Tensor:
        """Float64 covariance with N - 1 normalisation plus ``reg * I``.

        With a single sample the unbiased estimate does not exist; the scatter is then
        zero and the covariance is ``reg * I``.
        """
        scatter = self.scatter[positions].to(torch.float64)
        eye = torch.eye(scatter.shape[-1], dtype=torch.float64, device=scatter.device)
        return scatter / max(self.count - 1, 1) + reg * eye


def whitening_factor(
    stats: GaussianStatistics, reg: float, chunk_positions: int = 256
) -> torch.Tensor:
    """Upper-triangular ``U`` (float32, ``(P, d, d)``) with ``|(x - mean) @ U|`` the distance.

    ``U = L^{-T}`` for the Cholesky factor ``L`` of each regularised covariance, so the
    squared Mahalanobis distance ``(x - m)^T C^{-1} (x - m)`` equals ``|(x - m) @ U|^2``:
    scoring is one batched matmul and a sum of squares, never negative. Factorisation
    runs in float64, a chunk of positions at a time to bound memory. Where it fails
    (never for finite statistics and ``reg > 0`` in exact arithmetic), ``reg`` is raised
    tenfold for the failing positions with a warning.
    """
    n_positions, n_features = stats.mean.shape
    factor = torch.empty(
        n_positions, n_features, n_features, dtype=torch.float32, device=stats.mean.device
    )
    eye = torch.eye(n_features, dtype=torch.float64, device=stats.mean.device)
    for start in range(0, n_positions, chunk_positions):
        positions = slice(start, start + chunk_positions)
        lower = _robust_cholesky(stats.covariance(reg, positions), reg, start)
        inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
        factor[positions] = inverse.transpose(1, 2)
    return factor


def _robust_cholesky(covariance: torch.Tensor, reg: float, offset: int) -> torch.Tensor:
    lower, info = torch.linalg.cholesky_ex(covariance)
    extra = reg
    while bool((info > 0).any()):
        failed = torch.nonzero(info > 0).flatten()
        extra *= 10
        if extra > 1e6 * max(reg, 1e-12):
            raise FloatingPointError(
                f"Cholesky factorisation failed at positions {(failed + offset).tolist()[:10]} "
                "even with much more regularisation; check the features for huge values."
            )
        warnings.warn(
            f"Covariance not positive definite at {len(failed)} positions; adding {extra:g} "
            "to their diagonal. Increase reg to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        retry, retry_info = torch.linalg.cholesky_ex(covariance[failed] + extra * eye)
        lower[failed] = retry
        info[failed] = retry_info
    return lower
