"""The batched Mahalanobis distance stage: features -> distance grids ``(B, h, w)``."""

from __future__ import annotations

import torch
from sklearn import get_config

from sk_padim.gaussian import centred_position_chunks
from sk_padim.tracing import TraceSafeModule


def positions_per_chunk(device: torch.device, n_rows: int, n_features: int) -> int:
    """Positions per step of the batched kernels.

    Each position needs ``3 * n_rows * n_features`` temporary floats. On the CPU a chunk
    is kept near 4 MiB so that it stays in cache between the copy, the matmul and the
    reduction; on a GPU larger steps mean fewer kernel launches. Both stay within
    scikit-learn's ``working_memory``.
    """
    per_position = 3 * 4 * n_rows * n_features
    budget = get_config()["working_memory"] * 2**20
    if device.type == "cpu":
        budget = min(budget, 4 * 2**20)
    return max(1, int(budget // per_position))


class PatchGaussians(TraceSafeModule):
    """Mahalanobis distance of each patch vector to its position's Gaussian.

    Parameters
    ----------
    mean : Tensor of shape (P, d), float64
        Per-position means, P = h * w in row-major order. Kept as a float32 hi + lo
        pair, so that features with a large common offset keep their small spread.
    factor : Tensor of shape (P, d, d), float32
        Per-position whitening factor ``U`` (see :func:`sk_padim.gaussian.whitening_factor`):
        the distance is ``|(x - mean) @ U|``.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.mahalanobis import PatchGaussians
    >>> gaussians = PatchGaussians(torch.zeros(4, 2, dtype=torch.float64),
    ...                            torch.eye(2).expand(4, 2, 2) * 0.5)
    >>> gaussians(torch.ones(1, 2, 2, 2))[0]
    tensor([[0.7071, 0.7071],
            [0.7071, 0.7071]])
    """

    def __init__(self, mean: torch.Tensor, factor: torch.Tensor):
        super().__init__()
        high = mean.to(torch.float32)
        self.register_buffer("mean_high", high)
        self.register_buffer("mean_low", (mean - high.to(mean.dtype)).to(torch.float32))
        self.register_buffer("factor", factor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Distances ``(B, h, w)`` of features ``(B, d, h, w)``: ``sqrt((x-m)^T C^-1 (x-m))``."""
        n_images, n_features, height, width = features.shape
        flat = features.reshape(n_images, n_features, height * width)
        chunk = positions_per_chunk(features.device, n_images, n_features)
        if chunk >= height * width:
            distances = self._all_positions(flat)
        else:
            distances = self._position_chunks(flat, chunk)
        return distances.T.reshape(n_images, height, width)

    def _all_positions(self, flat: torch.Tensor) -> torch.Tensor:
        """One batched matmul over every position (GPUs, small grids, export)."""
        centred = flat.permute(2, 0, 1) - self.mean_high[:, None, :] - self.mean_low[:, None, :]
        return torch.linalg.vector_norm(torch.bmm(centred, self.factor), dim=-1)

    def _position_chunks(self, flat: torch.Tensor, chunk: int) -> torch.Tensor:
        """Cache-sized chunks of positions in reused buffers (CPUs)."""
        distances = flat.new_empty(flat.shape[2], flat.shape[0])
        whitened = None
        chunks = centred_position_chunks(flat, self.mean_high, chunk, center_low=self.mean_low)
        for positions, centred in chunks:
            if whitened is None:
                whitened = torch.empty_like(centred)
            out = whitened[: len(centred)]
            torch.bmm(centred, self.factor[positions], out=out)
            torch.linalg.vector_norm(out, dim=-1, out=distances[positions])
        return distances
