"""Where a fitted :class:`~sk_padim.PadimDetector`'s Gaussians come from when it scores."""

from __future__ import annotations

import torch

from sk_padim.core.devices import PerDeviceCache
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.statistics import PatchStatistics
from sk_padim.fitting import memory_layout

__all__ = ["FittedGaussians"]


class FittedGaussians:
    """A fitted detector's Gaussians on any device, made once and shared by threads.

    From statistics, the Gaussians of a ``(device, reg, covariance_dtype)`` are
    factorised at their first use and kept (the few most recent settings), so a
    detector rescores with another ``reg`` without refitting. A model that keeps no
    statistics (fitted in place past ``max_memory``, or saved as float16 factors) holds
    the Gaussians made with one ``reg`` and dtype, and scores only with those. Pickles
    hold the statistics or the stored Gaussians, not the ones made since.

    Parameters
    ----------
    statistics : PatchStatistics or None
        The fitted statistics; None for a model that keeps its Gaussians only.
    gaussians : PatchGaussians, default=None
        Gaussians made already: kept beside the statistics (a fit's by-product), or the
        only ones of a model without statistics.
    reg : float, default=None
        The ``reg`` that ``gaussians`` were made with.

    Examples
    --------
    >>> import torch
    >>> from sk_padim.core.statistics import PatchStatistics
    >>> from sk_padim.fitted_gaussians import FittedGaussians
    >>> stats = PatchStatistics.empty(4, 3, "cpu")
    >>> _ = stats.update(torch.randn(10, 3, 2, 2))
    >>> fitted = FittedGaussians(stats)
    >>> first = fitted.get(torch.device("cpu"), 0.01, "float32", 6.0, None)
    >>> first is fitted.get(torch.device("cpu"), 0.01, "float32", 6.0, None), len(first)
    (True, 4)
    """

    def __init__(
        self,
        statistics: PatchStatistics | None,
        gaussians: PatchGaussians | None = None,
        reg: float | None = None,
    ):
        if statistics is None and (gaussians is None or reg is None):
            raise ValueError("Without statistics, give the Gaussians and the reg they have.")
        self.statistics = statistics
        self.stored = None if statistics is not None else gaussians
        self.stored_reg = None if statistics is not None else float(reg)
        self._made = PerDeviceCache()
        if statistics is not None and gaussians is not None:
            self._made.put((gaussians.mean_high.device, float(reg), gaussians.storage), gaussians)

    def get(
        self,
        device: torch.device,
        reg: float,
        covariance_dtype: str,
        max_memory: float,
        store,
    ) -> PatchGaussians:
        """The Gaussians with ``reg`` and ``covariance_dtype`` on ``device``; from
        statistics in a ``store`` only if they fit in ``max_memory`` (else they are made
        at fit only)."""
        if self.statistics is None and (reg, covariance_dtype) != (
            self.stored_reg,
            self.stored.storage,
        ):
            raise ValueError(
                f"This detector keeps its Gaussians only (made with reg={self.stored_reg!r}, "
                f"covariance_dtype={self.stored.storage!r}), no statistics, so it scores only "
                "with those; set them back, or refit."
            )

        def make() -> PatchGaussians:
            if self.statistics is None:
                return self.stored.to(device)
            stats = self.statistics
            if not isinstance(stats.scatter, torch.Tensor) and (
                memory_layout(stats.n_positions, stats.n_features, max_memory, store) == "store_all"
            ):
                raise ValueError(
                    "Gaussians larger than max_memory are made in the store at fit "
                    "only; refit with this reg (or covariance_dtype) to score with it."
                )
            return stats.to(device).gaussians(reg, covariance_dtype)

        return self._made.get((device, reg, covariance_dtype), make)

    def trainable_statistics(self, action: str) -> PatchStatistics:
        """The statistics, or a ``ValueError`` saying why ``action`` needs them."""
        if self.statistics is None:
            raise ValueError(
                f"This detector keeps its Gaussians only, no statistics, so it cannot {action}: "
                "it was fitted past max_memory without a store, or saved with "
                "covariance_dtype='float16'. Refit with store=<folder> or a larger max_memory, "
                "or use a model saved with covariance_dtype='float32'."
            )
        return self.statistics
