"""Deterministic synthetic images shared by the benchmarks."""

from __future__ import annotations

import numpy as np


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Blocky random RGB textures, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
