import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from sk_padim.postprocess import AnomalyMapGenerator


def anomaly_maps(grids, size, sigma, truncate):
    return AnomalyMapGenerator(tuple(grids.shape[1:]), size, sigma, truncate)(grids)


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [((40, 56), 4.0, 4.0), ((7, 5), 4.0, 4.0), ((30, 30), 1.5, 3.0), ((64, 64), 2.0, 4.0)],
)
def test_blur_matches_scipy_gaussian_filter(shape, sigma, truncate):
    maps = np.random.default_rng(0).random((3, *shape))
    expected = np.stack(
        [ndimage.gaussian_filter(m, sigma=sigma, truncate=truncate, mode="reflect") for m in maps]
    )
    result = anomaly_maps(torch.tensor(maps, dtype=torch.float32), shape, sigma, truncate)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((56, 56), (224, 224), 4.0), ((3, 3), (200, 9), 2.0), ((10, 12), (33, 40), 1.0)],
)
def test_upsampling_then_blur_matches_torch_interpolate_then_scipy(grid, size, sigma):
    grids = np.random.default_rng(1).random((2, *grid))
    upsampled = F.interpolate(
        torch.tensor(grids)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=sigma, truncate=4.0) for m in upsampled])
    result = anomaly_maps(torch.tensor(grids, dtype=torch.float32), size, sigma, 4.0)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-6)


def test_sigma_zero_and_same_size_leave_maps_unchanged():
    maps = torch.rand(2, 9, 9)
    assert torch.equal(anomaly_maps(maps, (9, 9), 0.0, 4.0), maps)


def test_upsampling_is_bilinear_half_pixel():
    # A linear ramp stays linear inside the grid under half-pixel bilinear interpolation.
    grid = torch.arange(4, dtype=torch.float32).repeat(4, 1)[None]
    maps = anomaly_maps(grid, (4, 16), sigma=0.0, truncate=4.0)[0].numpy()
    source = (np.arange(16) + 0.5) / 4 - 0.5
    np.testing.assert_allclose(maps[0], np.clip(source, 0, 3), atol=1e-6)
