import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from sk_padim.core import postprocess
from sk_padim.core.postprocess import AnomalyMapGenerator, image_scores_and_pixel_quantile


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


def scipy_maps(grids, size, sigma, truncate=4.0):
    """The reference: torch's bilinear resize, then scipy's Gaussian filter, in float64."""
    upsampled = F.interpolate(
        torch.tensor(grids)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    return np.stack([ndimage.gaussian_filter(m, sigma, truncate=truncate) for m in upsampled])


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [
        ((64, 3), (257, 20), 4.0),  # a block of 256 rows and a block of one
        ((75, 100), (600, 300), 4.0),  # several blocks on both axes, the last ones partial
        ((37, 5), (513, 5), 1.0),  # a scale that is not an integer
        ((300, 7), (300, 7), 2.0),  # blur alone on a blocked axis
        ((40, 6), (700, 6), 0.0),  # resize alone on a blocked axis
    ],
)
def test_blocked_axes_match_torch_interpolate_then_scipy(grid, size, sigma):
    assert max(size) > postprocess._BLOCK
    grids = np.random.default_rng(2).random((2, *grid))
    result = anomaly_maps(torch.tensor(grids, dtype=torch.float32), size, sigma, 4.0)
    np.testing.assert_allclose(result.numpy(), scipy_maps(grids, size, sigma), atol=1e-5)


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((12, 9), (100, 37), 4.0), ((5, 40), (17, 40), 2.0), ((3, 3), (50, 50), 8.0)],
)
def test_blocks_equal_one_dense_matmul_per_axis(grid, size, sigma):
    grids = torch.rand(3, *grid, generator=torch.Generator().manual_seed(3))
    dense = anomaly_maps(grids, size, sigma, 4.0)
    postprocess._axis_blocks.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(postprocess, "_BLOCK", 16)
        blocked = AnomalyMapGenerator(grid, size, sigma, 4.0)
    postprocess._axis_blocks.cache_clear()
    assert blocked.rows_index is not None  # the rule took the blocked form
    np.testing.assert_allclose(blocked(grids).numpy(), dense.numpy(), atol=1e-6)


def test_operators_stay_small_at_2048_pixels():
    # Blocks of 256 rows reading 256 / 4 + 10 cells: 2 * 2048 * 74 * 4 bytes (1.2 MB). A
    # dense operator per axis, the composed blur and resize, weighed 2048 * 512 * 4 bytes,
    # and the blur alone 2048 * 2048 * 4 bytes when built.
    generator = AnomalyMapGenerator((512, 512), (2048, 2048), 4.0, 4.0)
    assert sum(buffer.nbytes for buffer in generator.buffers()) < 1.5 * 2**20


def test_buffers_move_with_the_module():
    generator = AnomalyMapGenerator((80, 6), (320, 24), 4.0, 4.0).to("meta")
    assert {buffer.device.type for buffer in generator.buffers()} == {"meta"}
    assert generator(torch.empty(2, 80, 6, device="meta")).shape == (2, 320, 24)


def test_blocked_maps_export_to_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    generator = AnomalyMapGenerator((70, 20), (280, 300), 4.0, 4.0)
    path = tmp_path / "maps.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            generator,
            (torch.rand(1, 70, 20),),
            str(path),
            input_names=["grids"],
            output_names=["maps"],
            dynamic_axes={"grids": {0: "batch"}, "maps": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    grids = torch.rand(3, 70, 20)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (maps,) = session.run(None, {"grids": grids.numpy()})
    np.testing.assert_allclose(maps, generator(grids).numpy(), atol=1e-6)


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.97, 1.0])
def test_thresholds_equal_numpy_over_all_pixels_with_ties(quantile):
    # Few distinct values: many pixels tie with the running cut of the top-k.
    grids = torch.randint(0, 4, (7, 5, 6), generator=torch.Generator().manual_seed(4)).float()
    maps = AnomalyMapGenerator((5, 6), (10, 12), sigma=0.0, truncate=4.0)
    scores, pixel = image_scores_and_pixel_quantile(grids.split(3), maps, 7, quantile)
    expected = maps(grids).numpy()
    np.testing.assert_array_equal(scores, expected.max(axis=(1, 2)))
    assert pixel == pytest.approx(np.quantile(expected, quantile), abs=1e-6)
