"""Whitening factors of per-position covariances: what turns a distance into one matmul.

For a covariance ``C`` plus ``reg * I`` with Cholesky factor ``L``, the upper-triangular
``U = L^{-T}`` gives the squared Mahalanobis distance ``(x - m)^T C^{-1} (x - m)`` as
``|(x - m) @ U|^2``: scoring is one batched matmul and a sum of squares, never negative.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from sk_padim.core.devices import run_chunks
from sk_padim.core.packing import lower_offsets, unpack_symmetric

__all__ = ["whitening_factors"]

_CPU_CHUNK_POSITIONS = 64  # positions per factorisation step on the CPU, at most


def whitening_factors(
    packed_covariance: Callable[[slice], torch.Tensor],
    n_positions: int,
    n_features: int,
    reg: float,
    out,
    storage: str = "float32",
) -> None:
    """Write the packed whitening factors of covariances into ``out``.

    ``packed_covariance(rows)`` gives the packed float32 covariances of a range of
    positions (without ``reg``); they are factorised in float64 a chunk of positions at
    a time, to bound memory, on the covariances' device, and each chunk's upper
    triangular factors ``U`` are written to ``out[rows]`` as ``pack_lower(U.mT)``
    (float32; rounded to float16 values with ``storage="float16"``). ``out`` is a
    ``(P, d (d + 1) / 2)`` tensor or :class:`~sk_padim.core.store.RowFile`, and may be where
    the covariances are read from: each chunk is read before it is written, so the
    factors then replace the covariances in place. Where a factorisation fails (never
    for finite statistics and ``reg > 0`` in exact arithmetic), ``reg`` is raised
    tenfold for the failing positions, with a warning.

    On the CPU, chunks run in threads of one torch thread each
    (:func:`sk_padim.core.devices.run_chunks`): batched Cholesky and triangular solves of
    small matrices gain nothing from torch's intra-op threads, and when another process
    competes for the cores their thread synchronisation made them 5-10x slower (measured
    on 2 cores: 15.8 s with 2 threads vs 1.5 s with one for 3,136 matrices of 100 x 100).
    """
    if not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive finite float; got {reg!r}.")
    device = packed_covariance(slice(0, 1)).device
    offsets = lower_offsets(n_features, device)

    def factorise(rows: slice) -> None:
        covariance = unpack_symmetric(packed_covariance(rows))
        factor_t = _factor_chunk(covariance, reg, rows.start).mT  # U^T, row-major
        packed = torch.index_select(factor_t.reshape(len(factor_t), -1), 1, offsets)
        out[rows] = packed.half().float() if storage == "float16" else packed

    budget = 2**22 if device.type == "cpu" else 2**24  # float64 values per chunk
    chunk = max(1, budget // n_features**2)
    if device.type == "cpu":
        chunk = min(chunk, _CPU_CHUNK_POSITIONS)
    chunks = [slice(s, min(s + chunk, n_positions)) for s in range(0, n_positions, chunk)]
    run_chunks(factorise, chunks, device)


def _factor_chunk(covariance: torch.Tensor, reg: float, offset: int) -> torch.Tensor:
    """Whitening factors ``U = L^{-T}`` of float32 covariances ``(k, d, d)``, column-major.

    The Cholesky factor is computed in float64 (the covariance plus ``reg * I`` may be
    ill-conditioned), then inverted in float32: a triangular solve's error grows with the
    condition number of ``L``, the square root of the covariance's, and the factor is
    stored in float32 anyway. LAPACK works on column-major matrices: the upper factor
    ``R = L^T`` of the transposed view (the same symmetric matrix) and ``U = R^{-1}``
    from ``U R = I`` need no transposing copies (1.5x faster on the CPU).
    """
    covariance64 = covariance.to(torch.float64).mT.contiguous().mT
    covariance64.diagonal(dim1=1, dim2=2).add_(reg)
    upper = _robust_cholesky(covariance64, reg, offset).to(torch.float32)
    upper = upper.mT.contiguous().mT  # column-major, LAPACK's layout
    eye = torch.eye(upper.shape[-1], device=upper.device)
    solved = torch.empty_like(upper.mT).mT
    torch.linalg.solve_triangular(upper, eye.expand_as(upper), upper=True, left=False, out=solved)
    return solved


def _robust_cholesky(covariance: torch.Tensor, reg: float, offset: int) -> torch.Tensor:
    """Upper Cholesky factors ``R`` (``R^T R = covariance``), ``reg`` raised where needed."""
    if not bool(torch.isfinite(covariance).all()):
        raise FloatingPointError(
            "The covariances hold NaN or infinite values: check the features for huge "
            "values, scale them down and refit."
        )
    upper, info = torch.linalg.cholesky_ex(covariance, upper=True)
    extra = reg
    while bool((info > 0).any()):
        failed = torch.nonzero(info > 0).flatten()
        extra *= 10
        if extra > 1e6 * reg:
            raise FloatingPointError(
                f"Cholesky factorisation failed at positions {(failed + offset).tolist()[:10]} "
                "even with much more regularisation; check the features for huge values."
            )
        warnings.warn(
            f"Covariance not positive definite at {len(failed)} positions; adding {extra:g} "
            "to their diagonal. Increase reg to silence this.",
            RuntimeWarning,
            stacklevel=5,
        )
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        retry, retry_info = torch.linalg.cholesky_ex(covariance[failed] + extra * eye, upper=True)
        upper[failed] = retry
        info[failed] = retry_info
    return upper
