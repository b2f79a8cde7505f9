"""NormalTrainSplit folds, and grid searches over the full pipeline."""

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares

from sk_padim import (
    NormalTrainSplit,
    PadimDetector,
    PatchFeatureTransformer,
    aupro_scorer,
    image_auroc,
    image_auroc_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
)


def shuffled_labels(n_normal=13, n_anomalous=5, seed=0):
    """Labels with the anomalies scattered among the normals."""
    return np.random.default_rng(seed).permutation(np.r_[np.zeros(n_normal), np.ones(n_anomalous)])


# --- NormalTrainSplit --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "splitter",
    [
        NormalTrainSplit(n_splits=2),
        NormalTrainSplit(n_splits=5),
        NormalTrainSplit(n_splits=4, shuffle=True, random_state=0),
    ],
)
def test_training_folds_hold_only_normals_and_test_folds_all_anomalies(splitter):
    y = shuffled_labels()
    anomalies = np.flatnonzero(y == 1)
    held_out = []
    for train, test in splitter.split(np.zeros(len(y)), y):
        assert not np.isin(anomalies, train).any()
        assert np.isin(anomalies, test).all()
        assert np.intersect1d(train, test).size == 0
        assert np.union1d(train, test).size == len(y)
        held_out.append(test[y[test] == 0])
    held_out = np.concatenate(held_out)  # each normal image is held out exactly once
    assert np.array_equal(np.sort(held_out), np.flatnonzero(y == 0))


def test_normals_are_split_as_kfold_splits_them():
    y = shuffled_labels()
    normals = np.flatnonzero(y == 0)
    kfold = KFold(n_splits=3, shuffle=True, random_state=7)
    expected = [normals[train] for train, _ in kfold.split(normals)]
    splitter = NormalTrainSplit(n_splits=3, shuffle=True, random_state=7)
    got = [train for train, _ in splitter.split(np.zeros(len(y)), y)]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def test_masks_split_as_their_image_labels():
    rng = np.random.default_rng(0)
    y = shuffled_labels()
    masks = np.zeros((len(y), 8, 8), dtype=bool)
    masks[y == 1, rng.integers(0, 8), rng.integers(0, 8)] = True
    splitter = NormalTrainSplit(n_splits=3)
    by_labels = list(splitter.split(np.zeros(len(y)), y))
    by_masks = list(splitter.split(np.zeros(len(y)), masks))
    for (train_l, test_l), (train_m, test_m) in zip(by_labels, by_masks, strict=True):
        assert np.array_equal(train_l, train_m) and np.array_equal(test_l, test_m)


def test_shuffling_is_seeded_by_random_state():
    y = shuffled_labels()
    X = np.zeros(len(y))

    def trains(splitter):
        return [train.tolist() for train, _ in splitter.split(X, y)]

    seeded = NormalTrainSplit(3, shuffle=True, random_state=1)
    assert trains(seeded) == trains(NormalTrainSplit(3, shuffle=True, random_state=1))
    assert trains(seeded) != trains(NormalTrainSplit(3))


def test_get_n_splits_is_n_splits():
    assert NormalTrainSplit(n_splits=4).get_n_splits() == 4


def test_y_is_required():
    with pytest.raises(ValueError, match="needs y"):
        next(NormalTrainSplit().split(np.zeros(10)))


def test_y_without_anomalies_is_refused():
    with pytest.raises(ValueError, match="no anomalous image"):
        next(NormalTrainSplit(2).split(np.zeros(6), np.zeros(6)))


def test_more_splits_than_normal_images_is_refused():
    y = np.array([0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="more than the 2 normal images"):
        next(NormalTrainSplit(3).split(np.zeros(5), y))


@pytest.mark.parametrize(
    "params", [{"n_splits": 1}, {"n_splits": 2.5}, {"shuffle": False, "random_state": 0}]
)
def test_bad_parameters_are_refused_at_construction(params):
    with pytest.raises(ValueError):
        NormalTrainSplit(**params)


# --- grid searches over the pipeline ------------------------------------------------------------

# A 32 px image has an 8 x 8 grid at layer1 (stride 4) but a 2 x 2 grid at layer3
# (stride 16): a 6 px square spans about 2 x 2 layer1 cells but only a small part of
# one 16 x 16 px layer3 cell, so layer1 alone must localise it clearly better.
GRID = {"feat__n_features": [20, 40], "feat__layers": [("layer1",), ("layer3",)]}


def pipeline(weights: str) -> Pipeline:
    feat = PatchFeatureTransformer(weights=weights, image_size=32, random_state=0)
    return Pipeline([("feat", feat), ("padim", PadimDetector())])


@pytest.fixture(scope="module")
def images_and_masks():
    images, _, masks = textures_with_squares(12, 6, size=32, seed=0)
    return images, masks


@pytest.fixture(scope="module")
def serial_search(resnet18_weights, images_and_masks):
    images, masks = images_and_masks
    search = GridSearchCV(
        pipeline(resnet18_weights),
        GRID,
        scoring={"pixel": pixel_auroc_scorer, "image": image_auroc_scorer, "pro": aupro_scorer},
        refit="pixel",
        cv=NormalTrainSplit(n_splits=2),
    )
    return search.fit(images, masks)


def test_grid_search_picks_the_layer_that_localises(serial_search):
    scores = serial_search.cv_results_["mean_test_pixel"]
    layer1 = [p["feat__layers"] == ("layer1",) for p in serial_search.cv_results_["params"]]
    layer1 = np.array(layer1)
    assert serial_search.best_params_["feat__layers"] == ("layer1",)
    assert scores[layer1].min() > scores[~layer1].max() + 0.05
    for name in ("mean_test_image", "mean_test_pro"):
        assert np.isfinite(serial_search.cv_results_[name]).all()


def test_refit_gives_a_usable_best_pipeline(serial_search):
    best, params = serial_search.best_estimator_, serial_search.best_params_
    assert best["padim"].n_samples_seen_ == 12, "refit must use the 12 normal images only"
    assert best["feat"].n_features_ == params["feat__n_features"]
    assert best["feat"].layers_ == params["feat__layers"]
    images, labels, masks = textures_with_squares(6, 6, size=32, seed=1)  # unseen images
    maps = best.score_samples(images)
    assert maps.shape == masks.shape
    assert pixel_auroc(masks, maps) > 0.9
    assert image_auroc(labels, best.decision_function(images)) > 0.9


def test_grid_search_in_two_worker_processes_scores_as_the_serial_one(
    resnet18_weights, images_and_masks, serial_search
):
    images, masks = images_and_masks
    grid = {"feat__n_features": [40], "feat__layers": [("layer1",)]}  # one fit per worker
    parallel = GridSearchCV(
        pipeline(resnet18_weights),
        grid,
        scoring=pixel_auroc_scorer,
        cv=NormalTrainSplit(n_splits=2),
        refit=False,
        n_jobs=2,
    ).fit(images, masks)
    serial = serial_search.cv_results_
    for params, score in zip(
        parallel.cv_results_["params"], parallel.cv_results_["mean_test_score"], strict=True
    ):
        index = serial["params"].index(params)
        assert score == pytest.approx(serial["mean_test_pixel"][index], abs=1e-6)
