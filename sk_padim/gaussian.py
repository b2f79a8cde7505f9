"""Streaming, mergeable Gaussian statistics per patch position.

While fitting, the state is the count ``n``, the mean (float64) and the scatter matrix
``S = sum_i (x_i - mean)(x_i - mean)^T`` (float32) at each of ``P`` positions; a fitted
model keeps the covariance ``S / (n - 1)`` packed to its lower triangle. Batches are
folded in with the pairwise update of Chan, Golub and LeVeque: the batch is centred on its
own mean (taken in two float32 passes: the rough mean, then the mean of the residuals),
and the shift between the two means enters as one extra rank-one term,

    S = S_a + S_b + (n_a n_b / n) (mean_b - mean_a)(mean_b - mean_a)^T,

which is numerically stable in float32 because nothing large is subtracted. Memory is
``O(P d^2)`` whatever the number of images, and statistics of any split of the data merge
to the statistics of the whole.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
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

    def update(self, features: torch.Tensor, chunk_positions: int = 128) -> None:
        """Fold in a batch of feature maps ``(B, d, h, w)`` (float32).

        ``chunk_positions`` positions are updated per ``baddbmm``; the result does not
        depend on it.
        """
        n_batch, n_features = features.shape[:2]
        flat = features.reshape(n_batch, n_features, -1)
        total = self.count + n_batch
        shift_weight = math.sqrt(self.count * n_batch / total)
        # The batch mean in two float32 passes (a float64 reduction is 20x slower): the
        # rough mean, then the mean of the residuals, which are small and exact.
        rough_mean = flat.mean(dim=0).T
        for positions, rows in centred_position_chunks(flat, rough_mean, chunk_positions, 1):
            residual = rows[:, :n_batch].mean(dim=1)
            rows[:, :n_batch] -= residual[:, None, :]
            delta = (rough_mean[positions].double() + residual.double()) - self.mean[positions]
            # The last row is the mean-shift correction, so one Gram matrix per position
            # adds the batch scatter and the correction at once.
            rows[:, n_batch] = shift_weight * delta
            self.scatter[positions].baddbmm_(rows.transpose(1, 2), rows)
            self.mean[positions] += delta * (n_batch / total)
        self.count = total

    def merge(self, other: GaussianStatistics) -> GaussianStatistics:
        """Statistics of the union of both operands' samples (operands unchanged)."""
        total = self.count + other.count
        delta = (other.mean - self.mean).to(torch.float32)
        weight = self.count * other.count / total
        scatter = self.scatter + other.scatter + weight * delta[:, :, None] * delta[:, None, :]
        mean = self.mean + (other.mean - self.mean) * (other.count / total)
        return GaussianStatistics(total, mean, scatter)

    def consume_packed(self) -> torch.Tensor:
        """Covariance ``scatter / (N - 1)``, packed as ``(P, d (d + 1) / 2)`` float32.

        The full scatter matrices are released (they are the bulk of the memory), so the
        statistics cannot be updated afterwards. With a single sample the unbiased
        estimate does not exist; the scatter is then zero, and so is this covariance.
        """
        packed = pack_lower(self.scatter).div_(max(self.count - 1, 1))
        self.scatter = None
        return packed

    @classmethod
    def from_packed(
        cls, count: int, mean: torch.Tensor, packed_covariance: torch.Tensor
    ) -> GaussianStatistics:
        """Rebuild the statistics from a count, mean and packed covariance."""
        n_features = mean.shape[-1]
        scatter = unpack_symmetric(packed_covariance.to(torch.float32), n_features)
        return cls(count, mean.to(torch.float64), scatter.mul_(max(count - 1, 1)))


def pack_lower(matrices: torch.Tensor) -> torch.Tensor:
    """Lower triangles of symmetric ``(P, d, d)`` matrices as ``(P, d (d + 1) / 2)``.

    Entries are in ``torch.tril_indices`` order (row by row).
    """
    rows, cols = torch.tril_indices(*matrices.shape[-2:], device=matrices.device)
    return matrices[:, rows, cols]


def unpack_symmetric(packed: torch.Tensor, n_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower`: full symmetric ``(P, d, d)`` matrices."""
    rows, cols = torch.tril_indices(n_features, n_features, device=packed.device)
    full = packed.new_empty(len(packed), n_features, n_features)
    full[:, rows, cols] = packed
    full[:, cols, rows] = packed
    return full


def unpack_lower(packed: torch.Tensor, n_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower` for lower-triangular ``(P, d, d)`` matrices."""
    rows, cols = torch.tril_indices(n_features, n_features, device=packed.device)
    full = packed.new_zeros(len(packed), n_features, n_features)
    full[:, rows, cols] = packed
    return full


def centred_position_chunks(
    flat: torch.Tensor, center: torch.Tensor, chunk_positions: int, extra_rows: int = 0
):
    """Yield ``(positions, rows)``: vectors of ``flat`` minus ``center``, position-major.

    ``flat`` is ``(B, d, P)`` float32, ``center`` is ``(P, d)`` float32 or float64 (then
    subtracted as a float32 hi + lo pair: ``x - hi`` is exact for ``x`` near ``hi``, so
    features with a large common offset keep their small spread). For each slice
    ``positions`` of at most ``chunk_positions`` positions, ``rows`` is a contiguous
    ``(len, B + extra_rows, d)`` float32 buffer whose first ``B`` rows per position hold
    ``flat[b, :, p] - center[p]``; the extra rows are left for the caller to fill.
    Buffers are reused from one chunk to the next, so consume each before the next.

    Batched matmuls over positions need contiguous position-major operands (on a permuted
    view they are many times slower). Building them a cache-sized chunk at a time, with
    per-image transposes (fast) rather than one ``(B, d, P) -> (P, B, d)`` permutation
    (strided), in buffers allocated once (fresh large tensors cost page faults on every
    batch) made the distance kernel 2.5x faster on the CPU.
    """
    n_images, n_features, n_positions = flat.shape
    size = min(chunk_positions, n_positions)
    staged = flat.new_empty(n_images, size, n_features)
    rows = flat.new_empty(size, n_images + extra_rows, n_features)
    for start in range(0, n_positions, size):
        positions = slice(start, min(start + size, n_positions))
        count = positions.stop - start
        staged[:, :count].copy_(flat[:, :, positions].transpose(1, 2))
        high = center[positions].to(torch.float32)
        centred = rows[:count, :n_images]
        torch.sub(staged[:, :count].transpose(0, 1), high[:, None, :], out=centred)
        if center.dtype == torch.float64:
            centred.sub_((center[positions] - high).to(torch.float32)[:, None, :])
        yield positions, rows[:count]


def whitening_factor(
    packed_covariance: torch.Tensor, reg: float, chunk_positions: int | None = None
) -> torch.Tensor:
    """Upper-triangular ``U`` (float32, ``(P, d, d)``) with ``|(x - mean) @ U|`` the distance.

    ``U = L^{-T}`` for the Cholesky factor ``L`` of each covariance plus ``reg * I``, so the
    squared Mahalanobis distance ``(x - m)^T C^{-1} (x - m)`` equals ``|(x - m) @ U|^2``:
    scoring is one batched matmul and a sum of squares, never negative. Factorisation
    runs in float64, a chunk of positions at a time to bound memory (by default 64 on the
    CPU, 256 on a GPU, fewer for large ``d``). Where it fails (never for finite statistics
    and ``reg > 0`` in exact arithmetic), ``reg`` is raised tenfold for the failing
    positions with a warning.

    On the CPU, chunks are shared among as many Python threads as torch has threads, each
    running its LAPACK calls on one thread (its own setting; the caller's is untouched).
    Batched Cholesky and triangular solves of small matrices gain nothing from torch's
    intra-op threads, and when another process competes for the cores their thread
    synchronisation made them 5-10x slower (measured on 2 cores: 15.8 s with 2 threads
    vs 1.5 s with one for 3,136 matrices of 100 x 100). Independent chunks in separate
    threads use the cores without that synchronisation: 0.9 s on the idle machine, and
    1.1 s (vs 2.2 s on one thread) with a busy loop on one of the two cores.
    """
    n_positions = len(packed_covariance)
    n_features = int((math.isqrt(8 * packed_covariance.shape[1] + 1) - 1) // 2)
    device = packed_covariance.device
    if chunk_positions is None:
        # At most 32 MiB per float64 chunk of matrices (a few live at once per thread).
        chunk_positions = max(1, min(64 if device.type == "cpu" else 256, 2**22 // n_features**2))
    factor = torch.empty(n_positions, n_features, n_features, device=device)
    eye = torch.eye(n_features, dtype=torch.float64, device=device)

    inference = torch.is_inference_mode_enabled()  # a per-thread state: pass it on

    def factorise(start: int) -> None:
        positions = slice(start, start + chunk_positions)
        with torch.inference_mode(inference):
            covariance = unpack_symmetric(packed_covariance[positions].double(), n_features)
            covariance.diagonal(dim1=1, dim2=2).add_(reg)
            lower = _robust_cholesky(covariance, reg, start)
            inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
            factor[positions] = inverse.transpose(1, 2)

    starts = range(0, n_positions, chunk_positions)
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    if workers == 1:
        for start in starts:
            factorise(start)
    else:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(factorise, starts))
    return factor


def _robust_cholesky(covariance: torch.Tensor, reg: float, offset: int) -> torch.Tensor:
    if not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive finite float; got {reg!r}.")
    if not bool(torch.isfinite(covariance).all()):
        raise FloatingPointError(
            "The covariances hold NaN or infinite values: check the features for huge "
            "values, scale them down and refit."
        )
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
