"""Small synthetic images for the tests."""

import numpy as np
import torch
from scipy import ndimage

from sk_padim import make_defect_textures


def smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB texture, uint8, (size, size, 3)."""
    noise = rng.normal(size=(size, size, 3))
    texture = ndimage.gaussian_filter(noise, sigma=(3, 3, 0))
    texture = (texture - texture.min()) / (np.ptp(texture) + 1e-12)
    return (40 + 120 * texture).astype(np.uint8)


def textures_with_squares(n_normal: int, n_anomalous: int, size: int = 64, seed: int = 0):
    """Normal smooth textures, and textures with a bright square pasted in.

    Returns images (n, size, size, 3) uint8, labels (n,) and masks (n, size, size) bool.
    """
    rng = np.random.default_rng(seed)
    images = np.stack([smooth_texture(rng, size) for _ in range(n_normal + n_anomalous)])
    masks = np.zeros((len(images), size, size), dtype=bool)
    side = size // 5
    for i in range(n_normal, len(images)):
        top, left = rng.integers(side, size - 2 * side, size=2)
        masks[i, top : top + side, left : left + side] = True
    images[masks] = 255
    labels = masks.any(axis=(1, 2)).astype(int)
    return images, labels, masks


def unpack_upper(packed) -> torch.Tensor:
    """Upper-triangular factors ``U`` ``(P, d, d)`` from ``pack_lower(U.mT)``, re-derived in
    NumPy: the packed values are the lower triangle of ``U^T``, row by row."""
    packed = np.asarray(packed, dtype=np.float32)
    n_features = int((np.sqrt(8 * packed.shape[1] + 1) - 1) / 2)
    rows, cols = np.tril_indices(n_features)
    upper = np.zeros((len(packed), n_features, n_features), np.float32)
    upper[:, cols, rows] = packed
    return torch.from_numpy(upper)


def assert_labels_like(flags, scores, threshold, labels, rtol=1e-4):
    """Verdicts agree wherever float32 rounding cannot move a score across the threshold
    (a calibrated threshold is one of the scores: that image is left out)."""
    clear = np.abs(scores - threshold) > 2 * rtol * abs(threshold)
    assert clear.sum() >= len(clear) - 1
    np.testing.assert_array_equal(flags[clear], (labels == -1)[clear])


def gravel_with_defects():
    """128 px gravel: 36 good crops (``X_train``) and 4 with a hole or a patch
    (``X_test``), as ``sk_padim.make_defect_textures`` makes them."""
    return make_defect_textures(
        "gravel",
        image_size=128,
        n_train=36,
        n_test_good=0,
        n_test_defective=4,
        defect_kinds=("hole", "patch"),
        random_state=0,
    )
