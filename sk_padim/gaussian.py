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
import threading
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
        """No samples yet. The scatter matrices are left unset (not zeroed, which cost
        as much as a fit's first batch): the first :meth:`update` writes them."""
        return cls(
            0,
            torch.zeros(n_positions, n_features, dtype=torch.float64, device=device),
            torch.empty(n_positions, n_features, n_features, dtype=torch.float32, device=device),
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
            if self.count:
                self.scatter[positions].baddbmm_(rows.transpose(1, 2), rows)
            else:
                torch.bmm(rows.transpose(1, 2), rows, out=self.scatter[positions])
            self.mean[positions] += delta * (n_batch / total)
        self.count = total

    def positions(self, rows: slice) -> GaussianStatistics:
        """The statistics of a range of positions (views of these)."""
        return GaussianStatistics(self.count, self.mean[rows], self.scatter[rows])

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


def merge_packed_covariances(
    first: tuple[int, torch.Tensor, torch.Tensor], second: tuple[int, torch.Tensor, torch.Tensor]
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, packed covariance)`` of the union of two samples, from theirs.

    Each operand is a count, a mean ``(P, d)`` float64 and a packed covariance
    ``(P, d (d + 1) / 2)`` float32 (the scatter over ``max(count - 1, 1)``, as fitted
    models keep it). The arithmetic is that of :meth:`GaussianStatistics.merge` on the
    unpacked scatter matrices, entry by entry, so the values are the same; working on
    the packed triangles halves the memory and skips the unpacking and repacking.
    """
    (count_a, mean_a, packed_a), (count_b, mean_b, packed_b) = first, second
    total = count_a + count_b
    shift = mean_b - mean_a
    delta = shift.to(torch.float32)
    rows, cols = torch.tril_indices(delta.shape[1], delta.shape[1], device=delta.device)
    weight = count_a * count_b / total
    scatter = packed_a * max(count_a - 1, 1) + packed_b * max(count_b - 1, 1)
    scatter += weight * delta.index_select(1, rows) * delta.index_select(1, cols)
    return total, mean_a + shift * (count_b / total), scatter.div_(max(total - 1, 1))


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite.

    A finite sum proves every value finite without a mask as large as the tensor (30x
    faster on the CPU); an infinite sum may be an overflow of finite values, so then the
    values are checked one by one.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def pack_lower(matrices: torch.Tensor) -> torch.Tensor:
    """Lower triangles of symmetric ``(P, d, d)`` matrices as ``(P, d (d + 1) / 2)``.

    Entries are in ``torch.tril_indices`` order (row by row).
    """
    n_features = matrices.shape[-1]
    flat = matrices.reshape(len(matrices), n_features * n_features)
    # index_select on the flattened matrices: 8x faster than indexing rows and columns.
    return torch.index_select(flat, 1, _lower_offsets(n_features, matrices.device))


def unpack_symmetric(packed: torch.Tensor, n_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower`: full symmetric ``(P, d, d)`` matrices."""
    full = packed.new_empty(len(packed), n_features, n_features)
    flat = full.view(len(packed), -1)
    flat.index_copy_(1, _lower_offsets(n_features, packed.device, transposed=True), packed)
    flat.index_copy_(1, _lower_offsets(n_features, packed.device), packed)
    return full


def unpack_upper(packed: torch.Tensor, n_features: int) -> torch.Tensor:
    """Upper-triangular ``(P, d, d)`` matrices ``U`` from ``pack_lower(U.transpose(1, 2))``
    (packed whitening factors), written in place: no transposed copy."""
    full = packed.new_zeros(len(packed), n_features, n_features)
    offsets = _lower_offsets(n_features, packed.device, transposed=True)
    full.view(len(packed), -1).index_copy_(1, offsets, packed)
    return full


def _lower_offsets(n_features: int, device, transposed: bool = False) -> torch.Tensor:
    """Offsets of the lower triangle's entries in a flattened ``(d, d)`` matrix, in
    ``torch.tril_indices`` order (of the upper triangle's mirror entries if ``transposed``)."""
    rows, cols = torch.tril_indices(n_features, n_features, device=device)
    return cols * n_features + rows if transposed else rows * n_features + cols


def centred_position_chunks(
    flat: torch.Tensor,
    center: torch.Tensor,
    chunk_positions: int,
    extra_rows: int = 0,
    center_low: torch.Tensor | None = None,
):
    """Yield ``(positions, rows)``: vectors of ``flat`` minus ``center``, position-major.

    ``flat`` is ``(B, d, P)`` float32, ``center`` is ``(P, d)`` float32, and
    ``center_low`` (optional, ``(P, d)`` float32) the low part of a float64 center
    ``center + center_low``: ``x - center`` is exact for ``x`` near ``center``, so features
    with a large common offset keep their small spread. For each slice ``positions`` of
    at most ``chunk_positions`` positions, ``rows`` is a contiguous
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
        centred = rows[:count, :n_images]
        torch.sub(staged[:, :count].transpose(0, 1), center[positions][:, None, :], out=centred)
        if center_low is not None:
            centred.sub_(center_low[positions][:, None, :])
        yield positions, rows[:count]


def held_out_distances(distances: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Distances of training vectors to the Gaussian fitted without each of them.

    ``distances`` are the training vectors' own distances to the Gaussian fitted on all
    ``n`` of them (covariance ``C = S / (n - 1) + reg I``). Leaving vector ``x`` out
    moves the mean by ``-(x - m) / (n - 1)`` and removes ``n / (n - 1) (x - m)(x - m)^T``
    from the scatter ``S``; with the held-out scatter also divided by ``n - 1``, the
    held-out covariance is the rank-one downdate ``C - c r r^T`` (``r = x - m``,
    ``c = n / (n - 1)^2``), and by Sherman-Morrison the squared held-out distance is

        (n / (n - 1))^2 q / (1 - c q),    q = r^T C^{-1} r,

    an elementwise function of the fitted distance: no refit, no factorisation. (The
    N - 2 normalisation of a model refitted on n - 1 vectors would divide the scatter by
    one less; the difference shrinks as 1/n and makes these distances slightly larger.
    With n = 2 both give the other vector's ``reg * I`` Gaussian.) ``1 - c q`` is the
    determinant ratio of the two covariances, positive in exact arithmetic; it is floored
    at 1e-12 against rounding.
    """
    if n_samples < 2:
        raise ValueError("Held-out distances need at least two training samples.")
    c = n_samples / (n_samples - 1) ** 2
    squared = distances.to(torch.float64) ** 2
    held_out = (n_samples / (n_samples - 1)) ** 2 * squared / (1 - c * squared).clamp_min(1e-12)
    return held_out.sqrt().to(distances.dtype)


def whitening_factor(packed_covariance: torch.Tensor, reg: float) -> torch.Tensor:
    """Upper-triangular ``U`` (float32, ``(P, d, d)``) with ``|(x - mean) @ U|`` the distance.

    ``U = L^{-T}`` for the Cholesky factor ``L`` of each covariance plus ``reg * I``, so the
    squared Mahalanobis distance ``(x - m)^T C^{-1} (x - m)`` equals ``|(x - m) @ U|^2``:
    scoring is one batched matmul and a sum of squares, never negative. Factorisation
    runs in float64, a chunk of positions at a time to bound memory. Where it fails
    (never for finite statistics and ``reg > 0`` in exact arithmetic), ``reg`` is raised
    tenfold for the failing positions with a warning.

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
    factor = torch.empty(n_positions, n_features, n_features, device=packed_covariance.device)

    def factorise(positions: slice, workspace: _Workspace) -> None:
        covariance = unpack_symmetric(packed_covariance[positions], n_features)
        _factor_chunk(covariance, reg, positions.start, workspace, out=factor[positions])

    _for_position_chunks(n_positions, n_features, packed_covariance.device, factorise)
    return factor


def factorise_statistics(
    stats: GaussianStatistics, reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed covariances (on the CPU) and whitening factors of statistics (consumed).

    Equal to ``consume_packed`` followed by :func:`whitening_factor`, but the factors are
    written over the scatter matrices, chunk by chunk, and the packed covariances go to
    the CPU as they are made: peak memory is the scatter matrices' (on a GPU, 5 GB instead
    of 12.5 GB for Wide-ResNet-50-2 with d=550 at 256 px).

    Returns
    -------
    packed_covariance : Tensor of shape (P, d (d + 1) / 2), float32, on the CPU
    factor : Tensor of shape (P, d, d), float32, on the statistics' device
    """
    scatter, divisor = stats.scatter, max(stats.count - 1, 1)
    stats.scatter = None
    n_positions, n_features = scatter.shape[:2]
    packed = torch.empty(n_positions, n_features * (n_features + 1) // 2)
    to_host = _HostCopies(packed, scatter.device)

    def factorise(positions: slice, workspace: _Workspace) -> None:
        # The covariance's float32 values are those stored, so that a reloaded model,
        # factorised from them, scores exactly as this one.
        covariance = torch.div(scatter[positions], divisor, out=workspace.like(scatter, positions))
        to_host.copy(positions, pack_lower(covariance))
        _factor_chunk(covariance, reg, positions.start, workspace, out=scatter[positions])

    try:
        _for_position_chunks(n_positions, n_features, scatter.device, factorise)
    finally:
        to_host.finish()
    return packed, scatter


class _HostCopies:
    """Copy device chunks into rows of a CPU tensor, overlapped with the device's work.

    From a GPU, a copy into pageable memory runs at about 1 GB/s and stalls the device
    (2 s of the 2.6 s factorisation of Wide-ResNet-50-2, d=550, 256 px, on an H200). So
    each chunk goes by DMA into one of two pinned staging buffers, and a background
    thread moves it on into ``out`` while the device computes the next chunk.
    """

    def __init__(self, out: torch.Tensor, device: torch.device):
        self.out = out
        self.device = device
        self.staging: list[torch.Tensor | None] = [None, None]
        self.pending: list = [None, None]
        self.slot = 0
        self.pool = ThreadPoolExecutor(1) if device.type == "cuda" else None

    def copy(self, rows: slice, chunk: torch.Tensor) -> None:
        if self.pool is None:
            self.out[rows] = chunk
            return
        slot, self.slot = self.slot, 1 - self.slot
        if self.pending[slot] is not None:
            self.pending[slot].result()  # the slot's previous chunk has left it
        staging = self.staging[slot]
        if staging is None or staging.numel() < chunk.numel():
            staging = self.staging[slot] = torch.empty(chunk.numel(), pin_memory=True)
        view = staging[: chunk.numel()].view(chunk.shape)
        view.copy_(chunk, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def move() -> None:
            done.synchronize()
            self.out[rows] = view

        self.pending[slot] = self.pool.submit(move)

    def finish(self) -> None:
        """Wait for every copy (errors re-raised)."""
        if self.pool is None:
            return
        try:
            for future in self.pending:
                if future is not None:
                    future.result()
        finally:
            self.pool.shutdown()


def _factor_chunk(
    covariance: torch.Tensor, reg: float, offset: int, workspace: _Workspace, out: torch.Tensor
) -> None:
    """Whitening factors ``L^{-T}`` of float32 covariances ``(k, d, d)`` (lower triangles read)
    written into ``out``.

    The Cholesky factor is computed in float64 (the covariance plus ``reg * I`` may be
    ill-conditioned), then inverted in float32: a triangular solve's error grows with the
    condition number of ``L``, the square root of the covariance's, and the factor is
    stored in float32 anyway. It halves the solve's cost.

    LAPACK works on column-major matrices: the upper factor ``R = L^T`` of the
    transposed view (the same symmetric matrix) and ``U = R^{-1}`` from ``U R = I`` need
    no transposing copies (on the CPU, 1.5x faster than ``L`` and ``L^{-1}`` transposed).
    """
    covariance64 = workspace.get("covariance", covariance.shape, torch.float64, out.device)
    covariance64.copy_(covariance).diagonal(dim1=1, dim2=2).add_(reg)
    upper64 = workspace.get("cholesky", covariance.shape, torch.float64, out.device).mT
    _robust_cholesky(covariance64.mT, reg, offset, out=upper64)
    upper = workspace.get("upper", covariance.shape, torch.float32, out.device).mT
    upper.copy_(upper64)
    eye = torch.eye(upper.shape[-1], device=upper.device)
    # Solved into a column-major buffer (LAPACK's layout), then copied: 1.5x faster
    # than solving into ``out`` itself.
    solved = workspace.get("factor", covariance.shape, torch.float32, out.device).mT
    torch.linalg.solve_triangular(upper, eye.expand_as(upper), upper=True, left=False, out=solved)
    out.copy_(solved)


class _Workspace:
    """Buffers one thread reuses for every chunk of a factorisation.

    Where large blocks go back to the system as soon as they are freed (glibc does with
    the ``MALLOC_TRIM_THRESHOLD_`` that Dask's nannies set), each new temporary is
    page-faulted in afresh: the factorisation ran 1.8x slower in Dask workers.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        """A tensor of ``shape`` (first dimension up to the first call's), contents undefined."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:]:
            buffer = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer[: shape[0]]

    def like(self, tensor: torch.Tensor, rows: slice) -> torch.Tensor:
        """A buffer for ``tensor[rows]``."""
        shape = (len(range(*rows.indices(len(tensor)))), *tensor.shape[1:])
        return self.get("like", shape, tensor.dtype, tensor.device)


CPU_CHUNK_POSITIONS = 64  # positions per factorisation step on the CPU, at most


def _for_position_chunks(n_positions: int, n_features: int, device, work) -> None:
    """Call ``work(positions, workspace)`` on slices covering ``range(n_positions)``.

    A float64 chunk of matrices takes at most 32 MiB (64 positions) on the CPU, 128 MiB
    on a GPU (fewer, larger launches; a chunk's temporaries take about five times that).
    On the CPU the chunks are shared among threads, each with one torch thread (see
    :func:`whitening_factor`).
    """
    budget = 2**22 if device.type == "cpu" else 2**24  # float64 values per chunk
    chunk = max(1, budget // n_features**2)
    if device.type == "cpu":
        chunk = min(chunk, CPU_CHUNK_POSITIONS)
    slices = [slice(s, min(s + chunk, n_positions)) for s in range(0, n_positions, chunk)]
    inference = torch.is_inference_mode_enabled()  # a per-thread state: pass it on
    per_thread = threading.local()

    def run(positions: slice) -> None:
        workspace = vars(per_thread).setdefault("workspace", _Workspace())
        with torch.inference_mode(inference):
            work(positions, workspace)

    workers = min(torch.get_num_threads(), len(slices)) if device.type == "cpu" else 1
    if workers == 1:
        for positions in slices:
            run(positions)
    else:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(run, slices))


def _robust_cholesky(
    covariance: torch.Tensor, reg: float, offset: int, out: torch.Tensor
) -> torch.Tensor:
    """Upper Cholesky factors ``R`` (``R^T R = covariance``) into ``out``, ``reg`` raised
    where needed."""
    if not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive finite float; got {reg!r}.")
    if not all_finite(covariance):
        raise FloatingPointError(
            "The covariances hold NaN or infinite values: check the features for huge "
            "values, scale them down and refit."
        )
    info = torch.empty(len(covariance), dtype=torch.int32, device=covariance.device)
    upper, info = torch.linalg.cholesky_ex(covariance, upper=True, out=(out, info))
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
        retry, retry_info = torch.linalg.cholesky_ex(covariance[failed] + extra * eye, upper=True)
        upper[failed] = retry
        info[failed] = retry_info
    return upper
