import numpy as np
import pytest
import torch
from scipy import ndimage

from sk_padim.postprocess import anomaly_maps, gaussian_blur


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [((40, 56), 4.0, 4.0), ((7, 5), 4.0, 4.0), ((30, 30), 1.5, 3.0), ((64, 64), 2.0, 4.0)],
)
def test_blur_matches_scipy_gaussian_filter(shape, sigma, truncate):
    maps = np.random.default_rng(0).random((3, *shape))
    expected = np.stack(
        [ndimage.gaussian_filter(m, sigma=sigma, truncate=truncate, mode="reflect") for m in maps]
    )
    result = gaussian_blur(torch.tensor(maps, dtype=torch.float32), sigma, truncate).numpy()
    np.testing.assert_allclose(result, expected, atol=1e-6)


def test_sigma_zero_leaves_maps_unchanged():
    maps = torch.rand(2, 9, 9)
    assert torch.equal(gaussian_blur(maps, 0.0, 4.0), maps)


def test_upsampling_is_bilinear_half_pixel():
    # A linear ramp stays linear inside the grid under half-pixel bilinear interpolation.
    grid = torch.arange(4, dtype=torch.float32).repeat(4, 1)[None]
    maps = anomaly_maps(grid, (4, 16), sigma=0.0, truncate=4.0)[0].numpy()
    source = (np.arange(16) + 0.5) / 4 - 0.5
    np.testing.assert_allclose(maps[0], np.clip(source, 0, 3), atol=1e-6)
