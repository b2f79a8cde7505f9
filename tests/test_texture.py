import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

from sk_padim.core.model import PatchScorer
from sk_padim.core.postprocess import AnomalyMapGenerator
from sk_padim.core.statistics import PatchStatistics
from sk_padim.core.texture import FeatureTiles, TiledGaussians

# (grid, tile): dividing, non-dividing along one or both axes, one tile, thin tiles.
TILINGS = [
    ((6, 9), (3, 3)),
    ((7, 10), (3, 4)),
    ((8, 5), (3, 5)),
    ((5, 5), (5, 5)),
    ((4, 7), (1, 7)),
    ((9, 2), (4, 1)),
]


def starts(length, size):
    """NumPy-side tile starts: every ``size`` cells, then one aligned to the far edge."""
    regular = list(range(0, length - size + 1, size))
    return regular + ([length - size] if length % size else [])


def corners(grid, tile):
    return [(r, c) for r in starts(grid[0], tile[0]) for c in starts(grid[1], tile[1])]


def numpy_samples(features, grid, tile):
    (th, tw), tiles = tile, corners(grid, tile)
    return np.stack([f[:, r : r + th, c : c + tw] for f in features for r, c in tiles])


def numpy_stitch(values, grid, tile):
    (th, tw), tiles = tile, corners(grid, tile)
    grids = np.full((len(values) // len(tiles), *grid), np.nan, dtype=values.dtype)
    for i, value in enumerate(values):  # in order: later tiles overwrite earlier ones
        r, c = tiles[i % len(tiles)]
        grids[i // len(tiles), r : r + th, c : c + tw] = value
    return grids


@pytest.mark.parametrize(("grid", "tile"), TILINGS)
def test_samples_are_the_tiles_of_a_numpy_tiling(grid, tile):
    features = torch.randn(3, 4, *grid, generator=torch.Generator().manual_seed(0))
    tiles = FeatureTiles(grid, tile)
    samples = tiles.samples(features)
    assert tiles.n_tiles == len(corners(grid, tile))
    assert samples.is_contiguous()
    np.testing.assert_array_equal(samples.numpy(), numpy_samples(features.numpy(), grid, tile))


@pytest.mark.parametrize(("grid", "tile"), TILINGS)
def test_stitch_puts_tiles_back_the_edge_tiles_last(grid, tile):
    tiles = FeatureTiles(grid, tile)
    # A different value in every tile, so that the overwriting order shows.
    values = torch.randn(2 * tiles.n_tiles, *tile, generator=torch.Generator().manual_seed(1))
    stitched = tiles.stitch(values).numpy()
    np.testing.assert_array_equal(stitched, numpy_stitch(values.numpy(), grid, tile))
    assert not np.isnan(stitched).any()  # every cell covered


@pytest.mark.parametrize(("grid", "tile"), TILINGS)
def test_samples_then_stitch_round_trips_every_channel(grid, tile):
    features = torch.randn(2, 3, *grid, generator=torch.Generator().manual_seed(2))
    tiles = FeatureTiles(grid, tile)
    samples = tiles.samples(features)
    for channel in range(3):
        assert torch.equal(tiles.stitch(samples[:, channel]), features[:, channel])


@pytest.mark.parametrize(("grid", "tile"), [((1, 5), (2, 2)), ((4, 4), (4, 5)), ((3, 3), (0, 1))])
def test_a_tile_that_does_not_fit_the_grid_is_refused(grid, tile):
    with pytest.raises(ValueError, match="does not fit in the feature grid"):
        FeatureTiles(grid, tile)


def test_features_or_values_of_another_shape_are_refused():
    tiles = FeatureTiles((6, 6), (3, 3))
    with pytest.raises(ValueError, match="make the tiles of the features' grid"):
        tiles.samples(torch.zeros(1, 2, 6, 7))
    with pytest.raises(ValueError, match="4 tiles of 3 x 3"):
        tiles.stitch(torch.zeros(6, 3, 3))


def texture_fit(features, tiles, reg=0.01):
    stats = PatchStatistics.empty(tiles.tile[0] * tiles.tile[1], features.shape[1])
    return stats.update(tiles.samples(features)).gaussians(reg)


@pytest.mark.parametrize(("grid", "tile"), [((7, 10), (3, 4)), ((6, 9), (3, 3))])
def test_texture_distances_equal_a_numpy_mahalanobis_fit_over_all_tiles(grid, tile):
    generator = torch.Generator().manual_seed(3)
    train, test = torch.randn(8, 5, *grid, generator=generator).split([6, 2])
    tiles = FeatureTiles(grid, tile)
    distances = TiledGaussians(texture_fit(train, tiles), tiles)(test).numpy()

    samples = numpy_samples(train.double().numpy(), grid, tile)  # (n, d, th, tw)
    per_cell = samples.reshape(len(samples), 5, -1).transpose(2, 0, 1)  # (th * tw, n, d)
    test_cells = numpy_samples(test.double().numpy(), grid, tile).reshape(-1, 5, per_cell.shape[0])
    expected_tiles = np.empty((len(test_cells), per_cell.shape[0]))
    for position, cell_samples in enumerate(per_cell):
        inverse = np.linalg.inv(np.cov(cell_samples, rowvar=False) + 0.01 * np.eye(5))
        centred = test_cells[:, :, position] - cell_samples.mean(axis=0)
        expected_tiles[:, position] = np.sqrt(np.einsum("nd,de,ne->n", centred, inverse, centred))
    expected = numpy_stitch(expected_tiles.reshape(-1, *tile), grid, tile)
    np.testing.assert_allclose(distances, expected, rtol=1e-4)


def test_scoring_a_tile_equals_patch_gaussians_on_that_tile():
    grid, tile = (7, 10), (3, 4)
    generator = torch.Generator().manual_seed(4)
    train, test = torch.randn(8, 6, *grid, generator=generator).split([5, 3])
    tiles = FeatureTiles(grid, tile)
    gaussians = texture_fit(train, tiles)
    distances = TiledGaussians(gaussians, tiles)(test)
    # The first tile and the corner tile aligned to both far edges, which nothing overwrites.
    for rows, cols in [(slice(0, 3), slice(0, 4)), (slice(4, 7), slice(6, 10))]:
        expected = gaussians(test[:, :, rows, cols].contiguous())
        torch.testing.assert_close(distances[:, rows, cols], expected, rtol=1e-6, atol=1e-6)


def periodic_texture(n_images, grid, generator):
    """Stripes and checks of period 2 and 3 cells in 4 channels, plus a little noise."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    angle_rows, angle_cols = 2 * torch.pi * rows / 3, 2 * torch.pi * cols / 2
    pattern = torch.stack([angle_rows.cos(), angle_rows.sin(), angle_cols.cos(), rows % 2])
    noise = torch.randn(n_images, 4, *grid, generator=generator)
    return pattern + 0.1 * noise


@pytest.mark.parametrize("cell", [(0, 0), (7, 8), (11, 17), (6, 6), (5, 11)])
def test_a_defect_anywhere_in_a_periodic_texture_gets_the_highest_distance(cell):
    grid, tile = (12, 18), (6, 6)  # period 3 and 2 both divide the tile
    generator = torch.Generator().manual_seed(5)
    train, test = periodic_texture(8, grid, generator), periodic_texture(1, grid, generator)
    test[0, :, cell[0], cell[1]] += torch.tensor([0.0, 0.0, 0.0, 1.0])  # one stripe flipped
    tiles = FeatureTiles(grid, tile)
    distances = TiledGaussians(texture_fit(train, tiles), tiles)(test)[0]
    assert np.unravel_index(int(distances.argmax()), grid) == cell


def test_tiled_gaussians_score_in_a_patch_scorer_and_pickle():
    grid, tile = (7, 10), (3, 4)
    train = torch.randn(4, 3, *grid, generator=torch.Generator().manual_seed(6))
    tiles = FeatureTiles(grid, tile)
    tiled = TiledGaussians(texture_fit(train, tiles), tiles)
    maps = AnomalyMapGenerator(grid, (28, 40), sigma=2.0, truncate=4.0)
    scorer = PatchScorer(tiled, maps)
    expected = maps(tiled(train))
    torch.testing.assert_close(scorer(train)[0], expected, rtol=0, atol=0)
    for twin in (pickle.loads(pickle.dumps(scorer)), copy.deepcopy(scorer)):
        torch.testing.assert_close(twin(train)[0], expected, rtol=1e-6, atol=1e-6)
    moved = tiled.to("meta")
    assert {buffer.device.type for buffer in moved.buffers()} == {"meta"}


def test_gaussians_of_another_tile_are_refused():
    tiles = FeatureTiles((6, 6), (3, 3))
    gaussians = texture_fit(torch.randn(3, 2, 6, 6), FeatureTiles((6, 6), (2, 3)))
    with pytest.raises(ValueError, match="do not fit tiles of 3 x 3"):
        TiledGaussians(gaussians, tiles)


def test_a_texture_scorer_exports_to_onnx_for_any_batch_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    grid, tile = (7, 10), (3, 4)
    features = torch.randn(5, 3, *grid, generator=torch.Generator().manual_seed(7))
    tiles = FeatureTiles(grid, tile)
    scorer = PatchScorer(
        TiledGaussians(texture_fit(features, tiles), tiles),
        AnomalyMapGenerator(grid, (28, 40), sigma=2.0, truncate=4.0),
    ).eval()
    path = tmp_path / "texture.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            scorer,
            (features[:1],),
            str(path),
            input_names=["features"],
            output_names=["maps", "scores"],
            dynamic_axes={name: {0: "batch"} for name in ("features", "maps", "scores")},
            opset_version=17,
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"features": features.numpy()})
    expected_maps, expected_scores = scorer(features)
    np.testing.assert_allclose(maps, expected_maps.numpy(), atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
