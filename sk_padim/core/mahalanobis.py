"""The batched Mahalanobis distance stage: features -> distance grids ``(B, h, w)``."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import nn

from sk_padim.core.devices import run_chunks
from sk_padim.core.packing import lower_offsets, n_features_of_packed
from sk_padim.core.store import tensor_of

__all__ = [
    "PatchGaussians",
    "block_lower_pattern",
    "centred_position_chunks",
    "position_parts",
    "positions_per_chunk",
]

# Temporary bytes per step of the batched kernels: cache-sized on the CPU (the copy,
# the matmul and the reduction then stay in cache), large on a GPU (fewer launches).
_CPU_CHUNK_BYTES = 4 * 2**20
_GPU_CHUNK_BYTES = 2**30
_MEAN_CHUNK_VALUES = 2**22  # means split into float32 hi + lo a chunk of values at a time


def positions_per_chunk(device: torch.device, n_rows: int, n_features: int) -> int:
    """Positions per step of the batched kernels (``3 * n_rows * d + d * d`` floats each)."""
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(1, budget // (4 * n_features * (3 * n_rows + n_features)))


class PatchGaussians(nn.Module):
    """Mahalanobis distance of each patch vector to its position's Gaussian.

    The whitening factors are kept packed (their ``d (d + 1) / 2`` nonzero values per
    position, half the memory of whole matrices), in memory or in a file
    (:class:`~sk_padim.core.store.RowFile`, for models larger than memory), and scored as
    they are, a cache-sized chunk of positions at a time (a block-diagonal sparse
    matmul, see :meth:`_whiten`). An ONNX export traces the whole-grid form instead
    (one ``Gather`` unpacks every factor).

    Parameters
    ----------
    mean : Tensor of shape (P, d), float64
        Per-position means, P = h * w in row-major order. Kept as a float32 hi + lo
        pair, so that features with a large common offset keep their small spread.
    packed_factor : Tensor or RowFile of shape (P, d (d + 1) / 2), float32
        Per-position whitening factors ``U`` (see :mod:`sk_padim.core.whitening`), the
        distance being ``|(x - mean) @ U|``, packed as ``pack_lower(U.mT)``.
    storage : {"float32", "float16"}, default="float32"
        The precision the factors are stored in: ``"float16"`` factors hold values
        rounded to half precision (kept as float32 for computing).

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.mahalanobis import PatchGaussians
    >>> from sk_padim.core.packing import pack_lower
    >>> factor = torch.eye(2).expand(4, 2, 2) * 0.5
    >>> gaussians = PatchGaussians(torch.zeros(4, 2, dtype=torch.float64), pack_lower(factor))
    >>> gaussians(torch.ones(1, 2, 2, 2))[0]
    tensor([[0.7071, 0.7071],
            [0.7071, 0.7071]])
    """

    def __init__(self, mean: torch.Tensor, packed_factor, storage: str = "float32"):
        super().__init__()
        if storage not in ("float32", "float16"):
            raise ValueError(f"storage must be 'float32' or 'float16'; got {storage!r}.")
        high = mean.to(torch.float32)
        low = torch.empty_like(high)
        step = max(1, _MEAN_CHUNK_VALUES // max(1, mean.shape[1]))
        for start in range(0, len(mean), step):  # no float64 temporary as large as mean
            rows = slice(start, start + step)
            low[rows] = mean[rows] - high[rows].to(mean.dtype)
        self.register_buffer("mean_high", high)
        self.register_buffer("mean_low", low)
        if isinstance(packed_factor, torch.Tensor):
            self.register_buffer("packed_factor", packed_factor)
        else:  # a RowFile: read a chunk of positions at a time
            self.packed_factor = packed_factor
        self.register_buffer("unpack_index", _unpack_index(mean.shape[1], mean.device))
        self.storage = storage

    @property
    def n_features(self) -> int:
        return self.mean_high.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Distances ``(B, h, w)`` of features ``(B, d, h, w)``: ``sqrt((x-m)^T C^-1 (x-m))``."""
        n_images, n_features, height, width = features.shape
        flat = features.reshape(n_images, n_features, height * width)
        if torch.jit.is_tracing():  # the ONNX export: one graph over every position
            distances = self._all_positions(flat)
        else:
            chunk = positions_per_chunk(features.device, n_images, n_features)
            distances = self._position_chunks(flat, chunk)
        return distances.T.reshape(n_images, height, width)

    def whole_factor(self) -> torch.Tensor:
        """The factors ``U`` ``(P, d, d)``, all unpacked (one ``Gather`` in ONNX)."""
        packed = self.packed_factor[:]
        padded = torch.cat([packed, packed.new_zeros(len(self), 1)], 1)
        lower = padded[:, self.unpack_index].reshape(len(self), self.n_features, self.n_features)
        return lower.transpose(1, 2)

    def __len__(self) -> int:
        return self.mean_high.shape[0]

    def mean64(self) -> torch.Tensor:
        """The means ``(P, d)`` in float64."""
        return self.mean_high.double() + self.mean_low.double()

    def packed_factor_values(self) -> torch.Tensor | np.ndarray:
        """The packed factors in ``storage``: a tensor, or a read-only mapped array for
        factors in a file."""
        if isinstance(self.packed_factor, torch.Tensor):
            packed = self.packed_factor
            return packed.half() if self.storage == "float16" else packed
        packed = self.packed_factor.array()
        return packed.astype(np.float16) if self.storage == "float16" else packed

    @classmethod
    def from_arrays(
        cls, mean: torch.Tensor | np.ndarray, packed_factor: torch.Tensor | np.ndarray
    ) -> PatchGaussians:
        """Make Gaussians from means and packed factors, as :meth:`arrays` gives them.

        Parameters
        ----------
        mean : ndarray or Tensor of shape (P, d), float64
            Per-position means.
        packed_factor : ndarray or Tensor of shape (P, d (d + 1) / 2)
            Packed whitening factors (:meth:`packed_factor_values`); float16 ones give
            Gaussians whose ``storage`` is ``"float16"``.

        Returns
        -------
        gaussians : PatchGaussians
            On the arrays' device (the CPU for NumPy arrays).
        """
        mean, packed = tensor_of(mean), tensor_of(packed_factor)
        if mean.dtype != torch.float64 or packed.dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"Gaussians need a float64 mean and float32 or float16 factors; got "
                f"{mean.dtype} and {packed.dtype}."
            )
        if len(packed) != len(mean) or n_features_of_packed(packed.shape[1]) != mean.shape[1]:
            raise ValueError(
                f"Packed factors of shape {tuple(packed.shape)} do not fit means of shape "
                f"{tuple(mean.shape)}."
            )
        storage = "float16" if packed.dtype == torch.float16 else "float32"
        return cls(mean, packed.float(), storage)

    def arrays(self) -> dict[str, np.ndarray]:
        """Give the means and the stored factors as NumPy arrays in host memory.

        Returns
        -------
        arrays : dict of str to ndarray
            ``"mean"`` ``(P, d)`` float64 and ``"packed_factor"`` (see
            :meth:`packed_factor_values`), the arguments of :meth:`from_arrays`.
        """
        packed = self.packed_factor_values()
        if isinstance(packed, torch.Tensor):
            packed = packed.cpu().numpy()
        return {"mean": self.mean64().cpu().numpy(), "packed_factor": packed}

    def in_memory(self) -> PatchGaussians:
        """These Gaussians with their factors in memory (read from their file if needed)."""
        if isinstance(self.packed_factor, torch.Tensor):
            return self
        return PatchGaussians(self.mean64(), self.packed_factor[:], self.storage)

    def __reduce__(self):
        # Means and packed factors as NumPy arrays, loadable on a machine without the
        # device (or the file) they were made on.
        return (type(self).from_arrays, tuple(self.arrays().values()))

    def __deepcopy__(self, memo) -> PatchGaussians:
        return type(self).from_arrays(*self.arrays().values()).to(self.mean_high.device)

    def _all_positions(self, flat: torch.Tensor) -> torch.Tensor:
        """One batched matmul over every position (the export)."""
        centred = flat.permute(2, 0, 1) - self.mean_high[:, None, :] - self.mean_low[:, None, :]
        return torch.linalg.vector_norm(torch.bmm(centred, self.whole_factor()), dim=-1)

    def _position_chunks(self, flat: torch.Tensor, chunk: int) -> torch.Tensor:
        """Distances ``(P, B)``, the positions shared among threads of one torch thread
        each on the CPU (:func:`~sk_padim.core.devices.run_chunks`)."""
        distances = flat.new_empty(flat.shape[2], flat.shape[0])
        parts = position_parts(flat.shape[2], chunk, flat.device)
        _make_first_sparse_tensor_quietly()
        run_chunks(lambda rows: self._whiten(flat, rows, chunk, distances), parts, flat.device)
        return distances

    def _whiten(self, flat: torch.Tensor, rows: slice, chunk: int, distances: torch.Tensor):
        """Write the distances of the positions ``rows`` into ``distances[rows]``, a chunk
        at a time: centre the vectors, whiten them, take their norms.

        A chunk's packed factors, as they lie in memory, are the values of a
        block-diagonal sparse matrix in CSR form whose blocks are the factors ``U^T``
        (packed row ``j`` holds row ``j`` of ``U^T`` up to its diagonal), and the CSR
        indices are the same for every chunk. So one sparse-dense matmul whitens the
        chunk's vectors of every image with no unpacking: on 2 CPU threads at 2048 px,
        2.1x faster with 8 images per call and 4.1x with one than unpacking each chunk
        into ``(d, d)`` matrices for a batched matmul (``d`` slice copies per chunk,
        whose per-call overhead dominated; ``benchmarks/distance_kernel.py``).
        """
        n_images, n_features = flat.shape[:2]
        size = min(chunk, rows.stop - rows.start)
        crow, col = block_lower_pattern(n_features, size, flat.device)
        width = n_features * (n_features + 1) // 2
        staged = flat.new_empty(size, n_features, n_images)  # position, feature, image
        for start in range(rows.start, rows.stop, size):
            positions = slice(start, min(start + size, rows.stop))
            count = positions.stop - start
            centred = staged[:count]
            centred.copy_(flat[:, :, positions].permute(2, 1, 0))
            centred.sub_(self.mean_high[positions, :, None]).sub_(self.mean_low[positions, :, None])
            values = self.packed_factor[positions].to(flat.device).reshape(-1)
            factors = torch.sparse_csr_tensor(
                crow[: count * n_features + 1],
                col[: count * width],
                values,
                (count * n_features, count * n_features),
                check_invariants=False,
            )
            whitened = (factors @ centred.view(count * n_features, n_images)).view(centred.shape)
            torch.linalg.vector_norm(whitened, dim=1, out=distances[positions])


def position_parts(n_positions: int, chunk: int, device: torch.device) -> list[slice]:
    """Contiguous ranges of positions, one per CPU thread (at least a chunk each), or the
    whole range elsewhere: the parts :func:`~sk_padim.core.devices.run_chunks` shares out."""
    n_parts = 1
    if device.type == "cpu":
        n_parts = max(1, min(torch.get_num_threads(), n_positions // chunk))
    bounds = [n_positions * part // n_parts for part in range(n_parts + 1)]
    return [slice(low, high) for low, high in zip(bounds[:-1], bounds[1:], strict=True)]


def block_lower_pattern(
    n_features: int, n_blocks: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR indices of ``n_blocks`` packed lower-triangular ``(d, d)`` diagonal blocks.

    Returns ``(crow_indices, col_indices)`` of the ``(n_blocks d, n_blocks d)`` matrix whose
    values are the blocks' packed rows one after another (``pack_lower`` order): row ``j``
    of block ``b`` holds columns ``b d .. b d + j``. int32 where the values' count allows.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.mahalanobis import block_lower_pattern
    >>> crow, col = block_lower_pattern(2, 2, torch.device("cpu"))
    >>> crow.tolist(), col.tolist()
    ([0, 1, 3, 4, 6], [0, 0, 1, 2, 2, 3])
    """
    width = n_features * (n_features + 1) // 2
    dtype = torch.int32 if n_blocks * width < 2**31 else torch.int64
    blocks = torch.arange(n_blocks, device=device)
    rows = torch.arange(n_features, device=device)
    starts = (blocks[:, None] * width + rows * (rows + 1) // 2).flatten()
    crow = torch.cat([starts, starts.new_tensor([n_blocks * width])])
    _, cols = torch.tril_indices(n_features, n_features, device=device)
    col = (blocks[:, None] * n_features + cols).flatten()
    return crow.to(dtype), col.to(dtype)


@functools.cache
def _make_first_sparse_tensor_quietly() -> None:
    """Make the process's first CSR tensor with torch's "beta" notice filtered out.

    torch warns when the first CSR tensor of a process is made (on any device) that CSR
    support is "in beta": a notice about torch's API, not about this computation, and
    only the first tensor triggers it. Making that tensor here once, under a filter
    scoped to this call (as scikit-learn scopes its own ``catch_warnings``), keeps the
    notice from the user without changing their filters; cached, so that scoring threads
    do not enter ``catch_warnings`` (process-wide, not thread-safe) call after call.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        index = torch.zeros(2, dtype=torch.int32)
        torch.sparse_csr_tensor(index, index[:0], torch.zeros(0), (1, 1), check_invariants=False)


def _unpack_index(n_features: int, device) -> torch.Tensor:
    """For each entry of a ``(d, d)`` lower-triangular matrix, its packed index.

    Entries above the diagonal point one past the packed values, at the zero appended
    in :meth:`PatchGaussians.whole_factor`. int32: half the bytes of int64 in a file.
    """
    offsets = lower_offsets(n_features)
    index = torch.full((n_features * n_features,), len(offsets), dtype=torch.int32)
    index[offsets] = torch.arange(len(offsets), dtype=torch.int32)
    return index.to(device)


def centred_position_chunks(
    flat: torch.Tensor,
    center: torch.Tensor,
    chunk_positions: int,
    extra_rows: int = 0,
):
    """Yield ``(positions, rows)``: vectors of ``flat`` minus ``center``, position-major.

    ``flat`` is ``(B, d, P)`` float32 and ``center`` is ``(P, d)`` float32 (the
    statistics' update uses it). For each slice ``positions`` of at most ``chunk_positions``
    positions, ``rows`` is a contiguous ``(len, B + extra_rows, d)`` float32 buffer whose
    first ``B`` rows per position hold ``flat[b, :, p] - center[p]``; the extra rows are
    left for the caller to fill. Buffers are reused from one chunk to the next, so
    consume each before the next.

    Batched matmuls over positions need contiguous position-major operands (on a permuted
    view they are many times slower). Building them a cache-sized chunk at a time, with
    per-image transposes (fast) rather than one ``(B, d, P) -> (P, B, d)`` permutation
    (strided), made the distance kernel of the time 2.5x faster on the CPU.
    """
    n_images, n_features, n_positions = flat.shape
    size = min(chunk_positions, n_positions)
    staged = flat.new_empty(n_images, size, n_features)
    rows = flat.new_empty(size, n_images + extra_rows, n_features)
    for start in range(0, n_positions, size):
        positions = slice(start, min(start + size, n_positions))
        count = positions.stop - start
        staged[:, :count].copy_(flat[:, :, positions].transpose(1, 2))
        centred = rows[:count, :n_images]
        torch.sub(staged[:, :count].transpose(0, 1), center[positions][:, None, :], out=centred)
        yield positions, rows[:count]
