"""PatchFeatureTransformer(memory=...): one backbone pass per image, equal results."""

from collections import Counter

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares
from torch import nn

from sk_padim import (
    F1ThresholdCalibrator,
    NormalTrainSplit,
    PadimDetector,
    PatchFeatureTransformer,
    pixel_auroc_scorer,
)
from sk_padim.feature_cache import LayerCache, clear_feature_cache

SIZE = 32
FIRST_MARKER = 200  # pixel value marking image i: FIRST_MARKER + i; blank probes read 124
SEEN: list[int] = []  # the marker of every image that went through a CountingNet


class CountingNet(nn.Module):
    """Two convolutional layers that record the marker of each image they see.

    Outside the known families, its own forward runs on every call (the transformer's
    hook route).
    """

    def __init__(self, widths=(8, 16)):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.layer1 = nn.Conv2d(3, widths[0], 3, stride=4, padding=1)
        self.layer2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        for parameter in self.parameters():
            parameter.data = torch.rand(parameter.shape, generator=generator) - 0.5

    def forward(self, x):
        # Undo the ImageNet normalisation of the red channel of the top-left pixel.
        red = (x[:, 0, 0, 0] * 0.229 + 0.485) * 255
        SEEN.extend(round(value) for value in red.tolist())
        return self.layer2(torch.relu(self.layer1(x)))


def seen_images() -> Counter:
    """How often each marked image went through a CountingNet (blank probes left out)."""
    return Counter(value - FIRST_MARKER for value in SEEN if value >= FIRST_MARKER)


@pytest.fixture(autouse=True)
def forget_seen():
    SEEN.clear()


@pytest.fixture(scope="module")
def data():
    """12 normal and 4 anomalous textures, each with its marker in an 8x8 corner block."""
    X, labels, masks = textures_with_squares(12, 4, size=SIZE, seed=0)
    X[:, :8, :8, 0] = FIRST_MARKER + np.arange(len(X))[:, None, None]
    return X, labels, masks


def counting_pipeline(memory, **params):
    feat = PatchFeatureTransformer(
        backbone=CountingNet(),
        layers=("layer1", "layer2"),
        image_size=SIZE,
        batch_size=5,
        random_state=0,
        memory=memory,
        **{"n_features": 8, **params},
    )
    return Pipeline([("feat", feat), ("padim", PadimDetector())])


# Largest layer set first: the candidates of the first one store every layer.
GRID = {
    "feat__layers": [("layer1", "layer2"), ("layer1",)],
    "feat__n_features": [4, 8],
    "feat__random_state": [0, 1],
}


def grid_search(pipe, **params):
    cv = NormalTrainSplit(n_splits=3)
    return GridSearchCV(pipe, GRID, scoring=pixel_auroc_scorer, cv=cv, **params)


def test_each_image_goes_through_the_backbone_once_per_grid_search(data, tmp_path):
    X, _, masks = data
    grid_search(counting_pipeline(tmp_path)).fit(X, masks)
    assert seen_images() == Counter(range(len(X)))


@pytest.fixture(scope="module")
def plain_search(data):
    """The grid search without memory, and how often it ran each image."""
    X, _, masks = data
    SEEN.clear()
    search = grid_search(counting_pipeline(None)).fit(X, masks)
    return search, seen_images()


def test_without_memory_the_grid_search_reruns_the_backbone(plain_search):
    # 8 candidates x 3 folds: each image is in every test fold or 2 of 3 training folds.
    assert min(plain_search[1].values()) >= 8 * 3


def test_grid_search_results_are_equal_with_and_without_memory(data, plain_search, tmp_path):
    X, _, masks = data
    plain = plain_search[0]
    cached = grid_search(counting_pipeline(tmp_path)).fit(X, masks)
    # The cache returns the layer outputs the backbone computed; scores agree to rounding.
    for key in plain.cv_results_:
        if "test_score" in key:
            np.testing.assert_allclose(cached.cv_results_[key], plain.cv_results_[key], rtol=1e-5)


@pytest.mark.parametrize(
    "params",
    [{}, {"projection": "semi_orthogonal"}, {"n_features": 1}],
    ids=["channels", "projection", "a layer keeps no channel"],
)
def test_features_are_equal_with_and_without_memory(data, tmp_path, params):
    X = data[0]
    plain = counting_pipeline(None, **params).named_steps["feat"].fit_transform(X)
    written = counting_pipeline(tmp_path, **params).named_steps["feat"].fit_transform(X)
    read = counting_pipeline(tmp_path, **params).named_steps["feat"].fit_transform(X)
    assert seen_images() == Counter({i: 2 for i in range(len(X))})  # plain, then written
    np.testing.assert_array_equal(written, plain)
    np.testing.assert_array_equal(read, plain)


@pytest.mark.parametrize("pixels", [np.float32, "grey"], ids=["float pixels", "grey images"])
def test_other_pixel_forms_are_equal_with_and_without_memory(data, tmp_path, pixels):
    X = data[0][:4]
    X = X[..., 0] if pixels == "grey" else X.astype(np.float32) / 255
    feat = counting_pipeline(None).named_steps["feat"]
    expected = clone(feat).fit_transform(X)
    for _ in range(2):  # writes, then reads
        features = clone(feat).set_params(memory=tmp_path).fit_transform(X)
        np.testing.assert_array_equal(features, expected)


def test_a_changed_pixel_recomputes_only_that_image(data, tmp_path):
    X = data[0]
    feat = counting_pipeline(tmp_path).named_steps["feat"]
    clone(feat).fit_transform(X)
    changed = X.copy()
    changed[3, 20, 20, 1] ^= 1
    SEEN.clear()
    features = clone(feat).fit_transform(changed)
    assert seen_images() == Counter([3])
    # Image 3 now went through the backbone alone: oneDNN may round it otherwise.
    expected = clone(feat).set_params(memory=None).fit_transform(changed)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_another_image_size_misses_the_cache(data, tmp_path):
    X = data[0]
    feat = counting_pipeline(tmp_path).named_steps["feat"]
    clone(feat).fit_transform(X)
    SEEN.clear()
    clone(feat).set_params(image_size=40).fit_transform(X)
    assert seen_images() == Counter(range(len(X)))


def test_other_weights_miss_the_cache(data, tmp_path):
    X = data[0]
    net = CountingNet()
    state = net.state_dict()
    state["layer2.bias"][0] += 1.0
    weights = tmp_path / "changed.pt"
    torch.save(state, weights)
    feat = counting_pipeline(tmp_path / "cache").named_steps["feat"]
    clone(feat).fit_transform(X)
    SEEN.clear()
    changed = clone(feat).set_params(weights=str(weights)).fit_transform(X)
    assert seen_images() == Counter(range(len(X)))
    expected = clone(feat).set_params(weights=str(weights), memory=None).fit_transform(X)
    np.testing.assert_array_equal(changed, expected)


def test_random_weights_are_known_by_their_seed_and_files_by_their_identity(data, tmp_path):
    from sk_padim.core.backbones import weights_key

    # Random weights are fixed by the seed and files by their identity: nothing to hash.
    assert weights_key("resnet18", None, 3) != weights_key("resnet18", None, 4)
    path = tmp_path / "w.pt"
    torch.save(CountingNet().state_dict(), path)
    key = weights_key("resnet18", str(path), 3)
    assert key == weights_key("resnet18", str(path), 4)  # a file's weights: not the seed's
    torch.save(CountingNet().state_dict(), path)  # saved again: new weights
    assert weights_key("resnet18", str(path), 3) != key
    assert weights_key(CountingNet(), None, 3) is None
    X = data[0][:2]
    feat = PatchFeatureTransformer(
        weights=None, image_size=32, n_features=8, memory=tmp_path / "cache"
    )
    first = clone(feat).set_params(random_state=1).fit_transform(X)
    other_seed = clone(feat).set_params(random_state=2).fit_transform(X)
    again = clone(feat).set_params(random_state=1).fit_transform(X)
    no_memory = clone(feat).set_params(random_state=2, memory=None).fit_transform(X)
    np.testing.assert_array_equal(other_seed, no_memory)  # not the first seed's outputs
    np.testing.assert_array_equal(again, first)


def test_cleared_cache_recomputes(data, tmp_path):
    X = data[0]
    memory = joblib.Memory(tmp_path, verbose=0)
    feat = counting_pipeline(memory).named_steps["feat"]
    clone(feat).fit_transform(X)
    clear_feature_cache(memory)
    SEEN.clear()
    clone(feat).fit_transform(X)
    assert seen_images() == Counter(range(len(X)))


def test_memory_without_location_caches_nothing(data):
    X = data[0][:3]
    feat = counting_pipeline(joblib.Memory(None)).named_steps["feat"]
    first, second = clone(feat).fit_transform(X), clone(feat).fit_transform(X)
    assert seen_images() == Counter({0: 2, 1: 2, 2: 2})
    np.testing.assert_array_equal(first, second)


def test_memory_set_after_fit_asks_for_a_refit(data, tmp_path):
    feat = counting_pipeline(None).named_steps["feat"].fit()
    feat.set_params(memory=tmp_path)
    with pytest.raises(ValueError, match="memory was set after fit"):
        feat.transform(data[0][:1])


def test_calibrator_reads_the_features_of_its_fit(data, tmp_path):
    X, labels, _ = data
    plain = F1ThresholdCalibrator(counting_pipeline(None)).fit(X, labels)
    SEEN.clear()
    cached = F1ThresholdCalibrator(counting_pipeline(tmp_path)).fit(X, labels)
    assert seen_images() == Counter(range(len(X)))  # fit on the normals, then scored
    assert cached.threshold_ == plain.threshold_


def test_two_worker_processes_share_the_cache(data, plain_search, tmp_path):
    X, _, masks = data
    plain = plain_search[0]
    cached = grid_search(counting_pipeline(tmp_path), n_jobs=2).fit(X, masks)
    assert cached.best_params_ == plain.best_params_
    np.testing.assert_array_equal(
        cached.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"]
    )
    # One entry per image and layer, written by either worker, read by both.
    assert len(list(tmp_path.rglob("*.npy"))) == 2 * len(X)


def test_dask_backend_grid_search_uses_the_cache(data, plain_search, tmp_path):
    distributed = pytest.importorskip("distributed")
    X, _, masks = data
    # Two threads of one process fit and transform at once, sharing the folder.
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    )
    with distributed.Client(cluster), joblib.parallel_backend("dask"):
        cached = grid_search(counting_pipeline(tmp_path), n_jobs=2).fit(X, masks)
    cluster.close()
    assert cached.best_params_ == plain_search[0].best_params_
    np.testing.assert_array_equal(
        cached.cv_results_["mean_test_score"], plain_search[0].cv_results_["mean_test_score"]
    )
    assert len(list(tmp_path.rglob("*.npy"))) == 2 * len(X)


@pytest.mark.parametrize("layers", [("layer1", "layer2"), ("layer2",)])
@pytest.mark.parametrize("random_state", [0, 1, 2])
def test_channel_draws_are_nested(layers, random_state):
    net = CountingNet(widths=(64, 128))
    n_available = 64 * ("layer1" in layers) + 128
    feat = PatchFeatureTransformer(net, layers=layers, image_size=SIZE, random_state=random_state)
    drawn = {
        d: set(clone(feat).set_params(n_features=d).fit().channel_indices_)
        for d in (1, 25, 50, 100, n_available)
    }
    assert drawn[1] < drawn[25] < drawn[50] < drawn[100] < drawn[n_available]
    assert drawn[n_available] == set(range(n_available))


def test_clearing_deletes_the_stored_outputs(tmp_path):
    cache = LayerCache(tmp_path, context=("test",))
    output = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    cache.store("image", "layer1", output)
    np.testing.assert_array_equal(cache.load("image", "layer1"), output)
    files = sorted(path.name for path in tmp_path.rglob("*") if path.is_file())
    assert files == [".gitignore", "image.npy"]  # joblib's, and no temporary file left
    clear_feature_cache(tmp_path)
    assert cache.load("image", "layer1") is None
    assert not list(tmp_path.rglob("*.npy"))


def test_memory_without_a_folder_is_a_clear_error(data):
    class CacheOnly:  # has joblib.Memory's cache method, but nowhere to store files
        def cache(self, function, **options):
            return function

    feat = counting_pipeline(CacheOnly()).named_steps["feat"].fit()
    with pytest.raises(TypeError, match="folder path or a joblib.Memory"):
        feat.transform(data[0][:1])


def test_a_damaged_entry_is_computed_again(data, tmp_path):
    X = data[0][:3]
    feat = counting_pipeline(tmp_path).named_steps["feat"]
    expected = clone(feat).fit_transform(X)
    entry = sorted(tmp_path.rglob("*.npy"))[0]
    entry.write_bytes(b"not an array")
    SEEN.clear()
    # Alone in its batch, the image may round differently (see the memory docstring).
    np.testing.assert_allclose(clone(feat).fit_transform(X), expected, rtol=1e-5, atol=1e-6)
    assert sum(seen_images().values()) == 1  # the damaged image only
    np.load(entry)  # stored again
