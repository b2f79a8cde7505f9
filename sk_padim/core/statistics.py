"""Per-position Gaussian statistics of patch features: what a PaDiM fit accumulates.

:class:`PatchStatistics` holds, at each of ``P`` positions, the count ``n`` of training
vectors, their mean (float64) and their scatter matrix
``S = sum_i (x_i - mean)(x_i - mean)^T`` (float32), packed to its lower triangle. It is
the seam every way of fitting goes through: a fit folds batches in
(:meth:`PatchStatistics.update`), streaming and Dask merge the statistics of separate
shards (:meth:`PatchStatistics.merge`), positions are cut into ranges and joined back
(:meth:`PatchStatistics.positions`, :meth:`PatchStatistics.join`) so that ranges are
fitted on different machines, and :meth:`PatchStatistics.gaussians` factorises them into
the Gaussians that score. Memory is ``O(P d^2)`` whatever the number of images.

Batches are folded in with the pairwise update of Chan, Golub and LeVeque: the batch is
centred on its own mean (taken in two float32 passes: the rough mean, then the mean of
the residuals), and the shift between the two means enters as one extra rank-one term,

    S = S_a + S_b + (n_a n_b / n) (mean_b - mean_a)(mean_b - mean_a)^T,

which is numerically stable in float32 because nothing large is subtracted. Statistics
of any split of the data merge to the statistics of the whole (to float32 rounding).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sk_padim.core.devices import run_chunks
from sk_padim.core.mahalanobis import (
    PatchGaussians,
    centred_position_chunks,
    position_parts,
    positions_per_chunk,
)
from sk_padim.core.packing import lower_offsets
from sk_padim.core.store import tensor_of
from sk_padim.core.whitening import whitening_factors

__all__ = ["PatchStatistics", "held_out_distances"]

_STORAGES = ("float32", "float16")
_CHECK_CHUNK_VALUES = 2**24  # scatter values checked at a time (64 MB)


class PatchStatistics:
    """Count, per-position mean and packed scatter of patch feature vectors.

    Parameters
    ----------
    count : int
        Number of training images (vectors per position).
    mean : Tensor of shape (P, d), float64
        Per-position mean, positions in row-major order of the ``(h, w)`` grid.
    scatter : Tensor or RowFile of shape (P, d (d + 1) / 2), float32
        Per-position scatter matrix, its lower triangle packed row by row
        (``torch.tril_indices`` order, as ``sk_padim.core.packing.pack_lower`` packs it); a
        :class:`~sk_padim.core.store.RowFile` keeps it in a file, for grids larger than
        memory (such statistics update and factorise, but do not merge or move).

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.statistics import PatchStatistics
    >>> features = torch.randn(6, 3, 2, 2)
    >>> stats = PatchStatistics.empty(4, 3).update(features[:4]).update(features[4:])
    >>> whole = PatchStatistics.empty(4, 3).update(features)
    >>> stats.count, bool(torch.allclose(stats.scatter, whole.scatter, atol=1e-5))
    (6, True)
    """

    def __init__(self, count: int, mean: torch.Tensor, scatter: torch.Tensor):
        n_positions, n_features = mean.shape
        if tuple(scatter.shape) != (n_positions, n_features * (n_features + 1) // 2):
            raise ValueError(
                f"A packed scatter of shape {tuple(scatter.shape)} does not fit means of "
                f"shape {tuple(mean.shape)} (positions, features)."
            )
        self.count = int(count)
        self.mean = mean
        self.scatter = scatter

    @classmethod
    def empty(
        cls,
        n_positions: int,
        n_features: int,
        device: str | torch.device = "cpu",
        scatter=None,
    ) -> PatchStatistics:
        """Make the statistics of no samples.

        Parameters
        ----------
        n_positions : int
            Positions ``P`` of the feature grid (``h * w``).
        n_features : int
            Features ``d`` per position.
        device : str or torch.device, default="cpu"
            Where the tensors are.
        scatter : Tensor or RowFile of shape (P, d (d + 1) / 2), default=None
            Zeros to accumulate the scatter into (e.g. a file, out of core); None makes
            a tensor on ``device``.

        Returns
        -------
        stats : PatchStatistics
            A count of 0, zero means and scatter.
        """
        if scatter is None:
            width = n_features * (n_features + 1) // 2
            scatter = torch.zeros(n_positions, width, device=device)
        mean = torch.zeros(n_positions, n_features, dtype=torch.float64, device=device)
        return cls(0, mean, scatter)

    @property
    def n_positions(self) -> int:
        """Positions ``P`` of the feature grid."""
        return self.mean.shape[0]

    @property
    def n_features(self) -> int:
        """Features ``d`` per position."""
        return self.mean.shape[1]

    @property
    def device(self) -> torch.device:
        """The device of the tensors."""
        return self.mean.device

    def update(self, features: torch.Tensor) -> PatchStatistics:
        """Fold a batch of feature maps into these statistics, in place.

        Parameters
        ----------
        features : Tensor of shape (B, d, h, w), float32
            On the statistics' device, ``h * w`` equal to ``n_positions``.

        Returns
        -------
        self : PatchStatistics
            These statistics, updated.
        """
        n_batch, n_features = features.shape[:2]
        flat = features.reshape(n_batch, n_features, -1)
        if tuple(flat.shape[1:]) != (self.n_features, self.n_positions):
            raise ValueError(
                f"Features of shape {tuple(features.shape[1:])} do not fit statistics of "
                f"{self.n_positions} positions and {self.n_features} features."
            )
        total = self.count + n_batch
        chunk = positions_per_chunk(features.device, n_batch + 1, n_features)
        # The batch mean in two float32 passes (a float64 reduction is 20x slower): the
        # rough mean, then the mean of the residuals, which are small and exact.
        rough_mean = flat.mean(dim=0).T

        def update_range(rows: slice) -> None:
            self._update_positions(flat, rough_mean, rows, chunk, total)

        parts = position_parts(self.n_positions, chunk, features.device)
        run_chunks(update_range, parts, features.device)
        self.count = total
        return self

    def _update_positions(self, flat, rough_mean, rows: slice, chunk: int, total: int):
        """Fold the positions ``rows`` of a batch ``(B, d, P)`` in, a chunk at a time."""
        n_batch, n_features = flat.shape[:2]
        shift_weight = math.sqrt(self.count * n_batch / total)
        offsets = lower_offsets(n_features, flat.device)
        gram = None
        chunks = centred_position_chunks(flat[:, :, rows], rough_mean[rows], chunk, extra_rows=1)
        for local, centred in chunks:
            positions = slice(rows.start + local.start, rows.start + local.stop)
            residual = centred[:, :n_batch].mean(dim=1)
            centred[:, :n_batch] -= residual[:, None, :]
            delta = (rough_mean[positions].double() + residual.double()) - self.mean[positions]
            # The last row is the mean-shift correction, so one Gram matrix per position
            # adds the batch scatter and the correction at once.
            centred[:, n_batch] = shift_weight * delta
            if gram is None:
                gram = centred.new_empty(len(centred), n_features, n_features)
            products = torch.bmm(centred.transpose(1, 2), centred, out=gram[: len(centred)])
            packed = products.view(len(centred), -1).index_select(1, offsets)
            _add_rows(self.scatter, positions, packed)
            self.mean[positions] += delta * (n_batch / total)

    def check_finite(self) -> PatchStatistics:
        """Raise ``FloatingPointError`` if the scatter overflowed float32.

        Returns
        -------
        self : PatchStatistics
            These statistics, when finite.
        """
        rows = max(1, _CHECK_CHUNK_VALUES // self.scatter.shape[1])
        chunks = (slice(s, s + rows) for s in range(0, self.n_positions, rows))
        if not all(all_finite(self.scatter[chunk]) for chunk in chunks):
            raise FloatingPointError(
                "The features are too large for float32 statistics (their squares "
                "overflow); scale them down, e.g. by a constant factor."
            )
        return self

    def merge(self, other: PatchStatistics) -> PatchStatistics:
        """Combine with the statistics of other samples; both operands are left unchanged.

        Parameters
        ----------
        other : PatchStatistics
            Statistics of the same positions and features (of other images).

        Returns
        -------
        merged : PatchStatistics
            The statistics of the union of both operands' samples.
        """
        if (other.n_positions, other.n_features) != (self.n_positions, self.n_features):
            raise ValueError(
                f"Cannot merge statistics of {self.n_positions} positions x "
                f"{self.n_features} features with {other.n_positions} x {other.n_features}."
            )
        self._check_in_memory("merge")
        other._check_in_memory("merge")
        total = self.count + other.count
        shift = other.mean - self.mean
        delta = shift.to(torch.float32)
        rows, cols = torch.tril_indices(self.n_features, self.n_features, device=self.device)
        weight = self.count * other.count / total
        scatter = self.scatter + other.scatter
        scatter += weight * delta.index_select(1, rows) * delta.index_select(1, cols)
        return PatchStatistics(total, self.mean + shift * (other.count / total), scatter)

    def positions(self, rows: slice) -> PatchStatistics:
        """Take a range of positions.

        Parameters
        ----------
        rows : slice
            The positions, in row-major order of the grid.

        Returns
        -------
        part : PatchStatistics
            The statistics of those positions, views of these (copies for a scatter in
            a file).
        """
        return PatchStatistics(self.count, self.mean[rows], self.scatter[rows])

    def split(self, n_parts: int) -> list[PatchStatistics]:
        """Cut the positions into contiguous ranges of near-equal size.

        Parameters
        ----------
        n_parts : int
            From 1 to ``n_positions``; the ranges are those of ``np.array_split``.

        Returns
        -------
        parts : list of PatchStatistics
            Views of these statistics; :meth:`join` puts them back together.
        """
        if not 1 <= n_parts <= self.n_positions:
            raise ValueError(f"n_parts must be from 1 to {self.n_positions}; got {n_parts!r}.")
        return [self.positions(rows) for rows in position_ranges(self.n_positions, n_parts)]

    @classmethod
    def join(cls, parts: list[PatchStatistics]) -> PatchStatistics:
        """Put ranges of positions of the same samples back together.

        Parameters
        ----------
        parts : list of PatchStatistics
            Ranges of positions, in order, all of the same count and features.

        Returns
        -------
        stats : PatchStatistics
            The statistics of all their positions.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("join needs at least one part.")
        if len({(part.count, part.n_features) for part in parts}) != 1:
            raise ValueError(
                "Cannot join statistics of different counts or features: join the parts of one fit."
            )
        mean = torch.cat([part.mean for part in parts])
        return cls(parts[0].count, mean, torch.cat([part.scatter for part in parts]))

    def covariance(self, rows: slice) -> torch.Tensor:
        """Compute the packed covariances ``S / (n - 1)`` of a range of positions.

        With a single sample the unbiased estimate does not exist; the scatter is then
        zero, and so is this covariance.

        Parameters
        ----------
        rows : slice
            The positions.

        Returns
        -------
        covariance : Tensor of shape (len(rows), d (d + 1) / 2), float32
            Packed as the scatter is, without any regularisation.
        """
        return self.scatter[rows] / max(self.count - 1, 1)

    def gaussians(self, reg: float, storage: str = "float32", out=None) -> PatchGaussians:
        """The Gaussians ``N(mean, S / (n - 1) + reg I)`` that score, on this device.

        Parameters
        ----------
        reg : float
            Added to every covariance's diagonal.
        storage : {"float32", "float16"}, default="float32"
            The precision the whitening factors are kept in. ``"float16"`` rounds them
            (scores move by about 1e-3 relative), so that they score exactly as after
            a round trip through a half-precision file.
        out : Tensor or RowFile of shape (P, d (d + 1) / 2), default=None
            Where the packed factors are written (a new tensor if None). It may be this
            statistics' own ``scatter``: the factors then replace the scatter chunk by
            chunk, with no second array as large, and these statistics are no longer
            valid.

        Returns
        -------
        gaussians : PatchGaussians
            The Gaussians' means and whitening factors, on this device.
        """
        if storage not in _STORAGES:
            raise ValueError(f"storage must be one of {_STORAGES}; got {storage!r}.")
        if out is None:
            out = torch.empty(self.scatter.shape, device=self.device)
        whitening_factors(self.covariance, self.n_positions, self.n_features, reg, out, storage)
        return PatchGaussians(self.mean, out, storage)

    def held_out_distances(self, gaussians: PatchGaussians, features: torch.Tensor) -> torch.Tensor:
        """Compute training features' distances to the Gaussians fitted without each.

        Parameters
        ----------
        gaussians : PatchGaussians
            These statistics' Gaussians (:meth:`gaussians`).
        features : Tensor of shape (B, d, h, w)
            Training features these statistics were accumulated from.

        Returns
        -------
        distances : Tensor of shape (B, h, w)
            Leave-one-out distances, see :func:`held_out_distances`.
        """
        return held_out_distances(gaussians(features), self.count)

    def _check_in_memory(self, action: str) -> None:
        if not isinstance(self.scatter, torch.Tensor):
            raise ValueError(
                f"Statistics whose scatter is in a file ({self.scatter.path}) cannot {action}; "
                "they were fitted out of core (PadimDetector's store): fit on all the "
                "images at once, or with a larger max_memory."
            )

    def to(self, device: str | torch.device) -> PatchStatistics:
        """Move to a device.

        Parameters
        ----------
        device : str or torch.device
            The target device.

        Returns
        -------
        stats : PatchStatistics
            These statistics on ``device`` (themselves if already there).
        """
        if torch.device(device) == self.device:
            return self
        self._check_in_memory("move to another device")
        return PatchStatistics(self.count, self.mean.to(device), self.scatter.to(device))

    def copy(self) -> PatchStatistics:
        """Copy the statistics.

        Returns
        -------
        copy : PatchStatistics
            A copy that updates independently of this one.
        """
        self._check_in_memory("be copied")
        return PatchStatistics(self.count, self.mean.clone(), self.scatter.clone())

    def arrays(self) -> dict[str, np.ndarray]:
        """Give the tensors as NumPy arrays in host memory.

        Returns
        -------
        arrays : dict of str to ndarray
            ``"mean"`` ``(P, d)`` float64 and ``"scatter"`` ``(P, d (d + 1) / 2)``
            float32 (memory-mapped read-only for a scatter in a file).
        """
        scatter = self.scatter
        scatter = scatter.cpu().numpy() if isinstance(scatter, torch.Tensor) else scatter.array()
        return {"mean": self.mean.cpu().numpy(), "scatter": scatter}

    @classmethod
    def from_arrays(cls, count: int, mean: np.ndarray, scatter: np.ndarray) -> PatchStatistics:
        """Make statistics from :meth:`arrays` and the count, checked.

        Parameters
        ----------
        count : int
            Number of samples, at least 1.
        mean : ndarray of shape (P, d), float64
            Per-position means.
        scatter : ndarray of shape (P, d (d + 1) / 2), float32
            Packed scatter matrices.

        Returns
        -------
        stats : PatchStatistics
            On the CPU, sharing the arrays' memory where they are writable.
        """
        mean, scatter = np.asarray(mean), np.asarray(scatter)
        if mean.dtype != np.float64 or scatter.dtype != np.float32:
            raise ValueError(
                f"Statistics need a float64 mean and a float32 scatter; got {mean.dtype} and "
                f"{scatter.dtype}."
            )
        if int(count) < 1 or not (np.isfinite(mean).all() and np.isfinite(scatter).all()):
            raise ValueError("The statistics hold no samples or non-finite values.")
        return cls(int(count), tensor_of(mean), tensor_of(scatter))

    def __reduce__(self):
        # NumPy arrays, so that statistics made on a GPU unpickle on any machine.
        return (type(self).from_arrays, (self.count, *self.arrays().values()))

    def __repr__(self) -> str:
        return (
            f"PatchStatistics(count={self.count}, n_positions={self.n_positions}, "
            f"n_features={self.n_features}, device={self.device})"
        )


def position_ranges(n_positions: int, n_parts: int) -> list[slice]:
    """``n_parts`` contiguous slices covering ``range(n_positions)``, as ``np.array_split``."""
    return [
        slice(int(part[0]), int(part[-1]) + 1)
        for part in np.array_split(np.arange(n_positions), n_parts)
    ]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite.

    A finite sum proves every value finite without a mask as large as the tensor (30x
    faster on the CPU); an infinite sum may be an overflow of finite values, so then the
    values are checked one by one.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def held_out_distances(distances: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Compute training vectors' distances to the Gaussian fitted without each of them.

    ``distances`` are the training vectors' own distances to the Gaussian fitted on all
    ``n`` of them (covariance ``C = S / (n - 1) + reg I``). Leaving vector ``x`` out
    moves the mean by ``-(x - m) / (n - 1)`` and removes ``n / (n - 1) (x - m)(x - m)^T``
    from the scatter ``S``; with the held-out scatter also divided by ``n - 1``, the
    held-out covariance is the rank-one downdate ``C - c r r^T`` (``r = x - m``,
    ``c = n / (n - 1)^2``), and by Sherman-Morrison the squared held-out distance is

        (n / (n - 1))^2 q / (1 - c q),    q = r^T C^{-1} r,

    an elementwise function of the fitted distance: no refit, no factorisation. (The
    N - 2 normalisation of a model refitted on n - 1 vectors would divide the scatter by
    one less; the difference shrinks as 1/n and makes these distances slightly larger.)
    ``1 - c q`` is the determinant ratio of the two covariances, positive in exact
    arithmetic; it is floored at 1e-12 against rounding.

    Parameters
    ----------
    distances : Tensor
        Training vectors' distances to the Gaussians fitted on all of them.
    n_samples : int
        Number of training vectors ``n``, at least 2.

    Returns
    -------
    held_out : Tensor
        The distances under the Gaussians fitted without each vector, same shape.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.statistics import held_out_distances
    >>> held_out_distances(torch.tensor([0.0, 1.0]), n_samples=5)
    tensor([0.0000, 1.5076])
    """
    if n_samples < 2:
        raise ValueError("Held-out distances need at least two training samples.")
    c = n_samples / (n_samples - 1) ** 2
    squared = distances.to(torch.float64) ** 2
    held_out = (n_samples / (n_samples - 1)) ** 2 * squared / (1 - c * squared).clamp_min(1e-12)
    return held_out.sqrt().to(distances.dtype)


def _add_rows(array, rows: slice, values: torch.Tensor) -> None:
    """``array[rows] += values`` for a tensor (in place) or a RowFile (read, add, write)."""
    if isinstance(array, torch.Tensor):
        array[rows] += values
    else:
        array[rows] = array[rows] + values.cpu()
