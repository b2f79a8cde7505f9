"""PadimDetector(texture_tile=...): one tile's Gaussians, every tile of every image a sample."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from sk_padim import PadimDetector
from sk_padim.core.statistics import held_out_distances

D = 4


def numpy_tile_distances(train, test, tile, reg):
    """Distance grids of ``test`` under Gaussians fitted per tile cell on every tile of
    ``train`` (regular tiles, then tiles aligned to the far edges), re-derived in NumPy."""
    (th, tw), (h, w) = tile, train.shape[2:]
    # The tile origins as the tiling makes them: regular ones, then the edge-aligned one.
    rows = [*range(0, (h // th) * th, th)] + ([h - th] if h % th else [])
    cols = [*range(0, (w // tw) * tw, tw)] + ([w - tw] if w % tw else [])
    samples = np.stack([train[:, :, r : r + th, c : c + tw] for r in rows for c in cols], 1)
    samples = samples.reshape(-1, D, th, tw).astype(np.float64)
    origins = [(r, c) for r in rows for c in cols]
    tile_distances = np.empty((len(test), len(origins), th, tw))
    for i in range(th):
        for j in range(tw):
            vectors = samples[:, :, i, j]
            mean = vectors.mean(0)
            inverse = np.linalg.inv(np.cov(vectors, rowvar=False) + reg * np.eye(D))
            for k, (r, c) in enumerate(origins):
                diff = test[:, :, r + i, c + j] - mean
                squared = np.einsum("nd,de,ne->n", diff, inverse, diff)
                tile_distances[:, k, i, j] = np.sqrt(squared)
    distances = np.empty((len(test), h, w))
    for k, (r, c) in enumerate(origins):  # later tiles overwrite the overlap
        distances[:, r : r + th, c : c + tw] = tile_distances[:, k]
    return distances


@pytest.fixture(scope="module")
def texture():
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(D, 3, 4))
    periodic = np.tile(pattern, (1, 4, 4))[:, :11, :14]  # an 11 x 14 grid, period 3 x 4
    train = periodic + 0.3 * rng.normal(size=(6, D, 11, 14))
    test = periodic + 0.3 * rng.normal(size=(3, D, 11, 14))
    test[1, :, 9, 2] += 3.0  # a defect near an edge tile
    return train.astype(np.float32), test.astype(np.float32)


@pytest.mark.parametrize("tile", [(3, 4), (4, 5)])
def test_texture_distances_equal_a_numpy_fit_on_all_tiles(texture, tile):
    train, test = texture
    detector = PadimDetector(texture_tile=tile, sigma=0, map_size=(11, 14)).fit(train)
    assert detector.statistics_.n_positions == tile[0] * tile[1]
    expected = numpy_tile_distances(train, test, tile, reg=0.01)
    np.testing.assert_allclose(detector.score_samples(test), expected, rtol=1e-4)


def test_a_defect_anywhere_scores_highest(texture):
    train, test = texture
    detector = PadimDetector(texture_tile=(3, 4), sigma=0, map_size=(11, 14)).fit(train)
    maps = detector.score_samples(test)
    assert np.unravel_index(maps[1].argmax(), maps[1].shape) == (9, 2)
    scores = detector.decision_function(test)
    assert scores[1] > max(scores[0], scores[2])
    assert detector.predict(test)[1] == -1


def test_a_texture_model_saves_and_clones(texture):
    train, test = texture
    detector = PadimDetector(texture_tile=3).fit(train)
    expected = detector.score_samples(test)
    loaded = pickle.loads(pickle.dumps(detector))
    np.testing.assert_allclose(loaded.score_samples(test), expected, rtol=1e-6)
    rebuilt = PadimDetector.from_fitted_state(detector.get_params(), *detector.fitted_state())
    np.testing.assert_allclose(rebuilt.score_samples(test), expected, rtol=1e-6)
    assert clone(detector).get_params()["texture_tile"] == 3
    # Streaming gives the statistics of one fit (to float32 rounding).
    streamed = PadimDetector(texture_tile=3).partial_fit(train[:2]).partial_fit(train[2:])
    np.testing.assert_allclose(streamed.score_samples(test), expected, rtol=1e-4)


def test_a_tile_larger_than_the_grid_is_refused(texture):
    with pytest.raises(ValueError, match="does not fit in the feature grid of 11 x 14"):
        PadimDetector(texture_tile=(12, 2)).fit(texture[0])


def test_thresholds_come_from_every_image_s_held_out_map(texture):
    # The pixel quantile is over the training images' maps (not over tile samples).
    train, _ = texture
    tile = (3, 4)
    detector = PadimDetector(texture_tile=tile, sigma=0, map_size=(11, 14), pixel_quantile=0.5)
    detector.fit(train)
    n_samples = detector.statistics_.count
    assert n_samples == len(train) * 4 * 4  # 4 x 4 tiles per image, edge ones included
    fitted = torch.from_numpy(numpy_tile_distances(train, train, tile, reg=0.01))
    held_out = held_out_distances(fitted, n_samples).numpy()
    assert detector.pixel_threshold_ == pytest.approx(np.quantile(held_out, 0.5), rel=1e-4)
    assert detector.threshold_ == pytest.approx(held_out.max(), rel=1e-4)
