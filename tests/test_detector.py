import json
import pickle

import numpy as np
import pytest
import sklearn
import torch
from scipy import ndimage
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from sk_padim import PadimDetector
from sk_padim.core import statistics as statistics_module


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Half-pixel (align_corners=False) linear interpolation as an (n_out, n_in) matrix."""
    source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    low = np.minimum(np.floor(source).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def reference_maps(train, test, map_size, reg=0.01, sigma=4.0, cov_scale=1.0):
    """PaDiM, section 2 of DESIGN.md, position by position in NumPy/SciPy float64.

    ``cov_scale`` multiplies the sample covariances before ``reg`` is added.
    """
    _, d, h, w = train.shape
    distances = np.empty((len(test), h, w))
    for i in range(h):
        for j in range(w):
            cov = np.cov(train[:, :, i, j].astype(np.float64), rowvar=False) * cov_scale
            cov += reg * np.eye(d)
            precision = np.linalg.inv(cov)
            diff = test[:, :, i, j] - train[:, :, i, j].mean(axis=0)
            distances[:, i, j] = np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))
    rows, cols = bilinear_matrix(map_size[0], h), bilinear_matrix(map_size[1], w)
    maps = np.einsum("Hh,nhw,Ww->nHW", rows, distances, cols)
    if sigma:
        maps = np.stack([ndimage.gaussian_filter(m, sigma=sigma, truncate=4.0) for m in maps])
    return maps


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    train = np.einsum("nkhw,kd->ndhw", rng.normal(size=(40, 6, 5, 7)), mixing)
    test = np.einsum("nkhw,kd->ndhw", rng.normal(size=(4, 6, 5, 7)), mixing) * 1.5
    return train.astype(np.float32), test.astype(np.float32)


def test_maps_equal_numpy_scipy_rederivation(features):
    train, test = features
    maps = PadimDetector().fit(train).score_samples(test)
    expected = reference_maps(train, test, (20, 28))
    assert maps.shape == (4, 20, 28)
    np.testing.assert_allclose(maps, expected, atol=1e-4 * np.ptp(expected))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("working_memory_mb", [1e-5, 1e-3, 1024])
@pytest.mark.parametrize("feature_dtype", [np.float32, np.float64, np.float16])
def test_optimised_paths_equal_the_rederivation_for_any_chunking(
    features, batch_size, working_memory_mb, feature_dtype
):
    # working_memory sets the positions per kernel step: 1, a few, or all of them.
    train, test = (X.astype(feature_dtype) for X in features)
    with sklearn.config_context(working_memory=working_memory_mb):
        maps = PadimDetector(batch_size=batch_size).fit(train).score_samples(test)
    expected = reference_maps(train.astype(np.float64), test.astype(np.float64), (20, 28))
    np.testing.assert_allclose(maps, expected, atol=1e-4 * np.ptp(expected))


@pytest.mark.parametrize(("map_size", "sigma"), [((13, 9), 0.0), (11, 1.5)])
def test_map_size_and_sigma_parameters(features, map_size, sigma):
    train, test = features
    detector = PadimDetector(map_size=map_size, sigma=sigma).fit(train)
    size = map_size if isinstance(map_size, tuple) else (map_size, map_size)
    expected = reference_maps(train, test, size, sigma=sigma)
    np.testing.assert_allclose(detector.score_samples(test), expected, atol=1e-4 * np.ptp(expected))


def test_image_score_is_map_maximum(features):
    train, test = features
    detector = PadimDetector().fit(train)
    np.testing.assert_array_equal(
        detector.decision_function(test), detector.score_samples(test).max(axis=(1, 2))
    )


def test_partial_fit_in_chunks_equals_fit(features):
    train, test = features
    full = PadimDetector().fit(train)
    streamed = PadimDetector(batch_size=7)
    for chunk in np.array_split(train, [1, 4, 19, 30]):
        streamed.partial_fit(chunk)
    assert streamed.n_samples_seen_ == full.n_samples_seen_ == 40
    streamed_stats, full_stats = streamed.statistics_, full.statistics_
    np.testing.assert_allclose(streamed_stats.mean, full_stats.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(streamed_stats.scatter, full_stats.scatter, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed.score_samples(test), full.score_samples(test), rtol=1e-5)


def test_scores_do_not_depend_on_batch_size(features):
    train, test = features
    a = PadimDetector(batch_size=1).fit(train)
    b = PadimDetector(batch_size=64).fit(train)
    np.testing.assert_allclose(a.score_samples(test), b.score_samples(test), rtol=1e-5)


def test_channel_order_does_not_change_scores(features):
    train, test = features
    order = np.random.default_rng(1).permutation(train.shape[1])
    a = PadimDetector().fit(train).score_samples(test)
    b = PadimDetector().fit(train[:, order]).score_samples(test[:, order])
    np.testing.assert_allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("n_train", [1, 3])
def test_fewer_images_than_features_give_finite_scores(n_train):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(n_train, 30, 3, 3)).astype(np.float32)
    maps = PadimDetector().fit(train).score_samples(rng.normal(size=(2, 30, 3, 3)))
    assert np.isfinite(maps).all() and (maps >= 0).all()


def test_single_training_image_uses_regularised_identity():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(1, 4, 2, 2)).astype(np.float32)
    test = rng.normal(size=(1, 4, 2, 2)).astype(np.float32)
    grid = PadimDetector(sigma=0, map_size=(2, 2)).fit(train).score_samples(test)
    expected = np.linalg.norm(test - train, axis=1) / np.sqrt(0.01)
    np.testing.assert_allclose(grid, expected, rtol=1e-5)


def test_default_threshold_is_the_highest_leave_one_out_training_score(features):
    # Independent expectation: refit without each image in turn. The held-out Gaussian
    # keeps the full model's normalisation (scatter / (n - 1)), so the refitted sample
    # covariances (scatter / (n - 2)) are rescaled by (n - 2) / (n - 1).
    train, _ = features
    n = len(train)
    detector = PadimDetector().fit(train)
    held_out = [
        reference_maps(
            np.delete(train, i, axis=0), train[i : i + 1], (20, 28), cov_scale=(n - 2) / (n - 1)
        ).max()
        for i in range(n)
    ]
    assert detector.threshold_ == pytest.approx(max(held_out), rel=1e-4)
    assert (detector.predict(train) == 1).all()
    assert (detector.predict(train + 100) == -1).all()


@pytest.mark.parametrize("n", [2, 3])
def test_leave_one_out_threshold_holds_for_the_smallest_training_sets(features, n):
    # n = 2: each image's held-out model is the other image's reg * I Gaussian.
    train = features[0][:n]
    detector = PadimDetector().fit(train)
    held_out = [
        reference_maps(np.delete(train, i, axis=0)[[0, 0]], train[i : i + 1], (20, 28)).max()
        if n == 2
        else reference_maps(
            np.delete(train, i, axis=0), train[i : i + 1], (20, 28), cov_scale=(n - 2) / (n - 1)
        ).max()
        for i in range(n)
    ]
    # The downdate divides by 1 - c q, small when an image dominates its own Gaussian:
    # the float32 distance's rounding is amplified about reg-to-spread-fold here.
    assert detector.threshold_ == pytest.approx(max(held_out), rel=1e-3)


def test_default_threshold_does_not_flag_new_normal_images_when_n_is_below_d():
    rng = np.random.default_rng(0)
    train, new = (rng.normal(size=(n, 30, 3, 3)).astype(np.float32) for n in (20, 20))
    detector = PadimDetector().fit(train)
    assert (detector.predict(new) == 1).mean() > 0.8
    assert (detector.predict(new + 3) == -1).all()


def test_explicit_threshold_is_used(features):
    train, test = features
    scores = PadimDetector().fit(train).decision_function(test)
    cut = float(np.median(scores))
    labels = PadimDetector(threshold=cut).fit(train).predict(test)
    np.testing.assert_array_equal(labels, np.where(scores >= cut, -1, 1))
    assert (labels == -1).sum() == (scores >= cut).sum() >= 1  # the median itself is flagged


def test_partial_fit_without_threshold_cannot_predict(features):
    train, _ = features
    detector = PadimDetector().partial_fit(train)
    with pytest.raises(NotFittedError, match="threshold"):
        detector.predict(train)


def test_wrong_feature_shape_is_a_clear_error(features):
    train, test = features
    detector = PadimDetector().fit(train)
    with pytest.raises(ValueError, match=r"fitted on \(6, 5, 7\)"):
        detector.score_samples(test[:, :5])
    with pytest.raises(ValueError, match=r"fitted on \(6, 5, 7\)"):
        detector.partial_fit(test[:, :, :4])


def test_failed_partial_fit_leaves_model_unchanged(features):
    train, test = features
    detector = PadimDetector().fit(train)
    before = detector.score_samples(test)
    bad = test.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector.partial_fit(bad)
    assert detector.n_samples_seen_ == 40
    np.testing.assert_array_equal(detector.score_samples(test), before)


def test_scoring_before_fit_raises():
    with pytest.raises(NotFittedError):
        PadimDetector().score_samples(np.zeros((1, 2, 2, 2)))


@pytest.mark.parametrize(
    ("params", "message"),
    [({"reg": 0}, "reg"), ({"sigma": -1}, "sigma"), ({"batch_size": 0}, "batch_size")],
)
def test_invalid_parameters_are_rejected_in_fit(features, params, message):
    with pytest.raises(ValueError, match=message):
        PadimDetector(**params).fit(features[0])


def test_clone_and_params_round_trip():
    detector = PadimDetector(reg=0.1, sigma=2.0, map_size=(8, 8))
    copy = clone(detector)
    assert copy.get_params() == detector.get_params()
    copy.set_params(reg=0.5)
    assert copy.reg == 0.5 and detector.reg == 0.1


def test_changing_reg_after_fit_rescores_with_new_reg(features):
    train, test = features
    detector = PadimDetector().fit(train)
    detector.set_params(reg=1.0)
    expected = reference_maps(train, test, (20, 28), reg=1.0)
    np.testing.assert_allclose(detector.score_samples(test), expected, atol=1e-4 * np.ptp(expected))


def test_merge_equals_fit_on_the_union(features):
    train, test = features
    left, right = PadimDetector().fit(train[:15]), PadimDetector(reg=0.5).fit(train[15:])
    before = left.statistics_.mean.clone()
    merged = left.merge(right)
    full = PadimDetector().fit(train)
    assert merged.n_samples_seen_ == 40 and merged.reg == 0.01  # the left operand's
    np.testing.assert_allclose(merged.statistics_.mean, full.statistics_.mean, atol=1e-7)
    np.testing.assert_allclose(merged.score_samples(test), full.score_samples(test), rtol=1e-5)
    np.testing.assert_array_equal(left.statistics_.mean, before)
    assert left.n_samples_seen_ == 15 and right.n_samples_seen_ == 25
    assert not hasattr(merged, "threshold_")


def test_merge_refuses_mismatched_detectors(features):
    train, _ = features
    detector = PadimDetector().fit(train)
    with pytest.raises(ValueError, match="shape"):
        detector.merge(PadimDetector().fit(train[:, :4]))
    with pytest.raises(TypeError, match="PadimDetector"):
        detector.merge("a detector")
    with pytest.raises(NotFittedError):
        detector.merge(PadimDetector())


def test_from_statistics_with_held_out_distances_equals_fit(features):
    train, test = features
    full = PadimDetector().fit(train)
    stats = full.statistics_
    gaussians = stats.gaussians(0.01)
    distances = [
        stats.held_out_distances(gaussians, torch.from_numpy(train[i : i + 7]))
        for i in range(0, 40, 7)
    ]
    rebuilt = PadimDetector.from_statistics(
        stats, full.feature_shape_, held_out_distances=distances
    )
    assert rebuilt.threshold_ == pytest.approx(full.threshold_, rel=1e-6)
    np.testing.assert_allclose(rebuilt.score_samples(test), full.score_samples(test), rtol=1e-6)
    explicit = PadimDetector.from_statistics(stats, full.feature_shape_, threshold=3.0)
    assert explicit.threshold_ == 3.0
    with pytest.raises(ValueError, match="do not fit feature_shape"):
        PadimDetector.from_statistics(stats, (6, 5, 6))


def test_fitted_state_round_trips_and_is_plain_arrays(features):
    train, test = features
    for dtype in ("float32", "float16"):
        detector = PadimDetector(covariance_dtype=dtype).fit(train)
        arrays, record = detector.fitted_state()
        assert all(isinstance(value, np.ndarray) for value in arrays.values())
        json.dumps(record)
        copy = PadimDetector.from_fitted_state(detector.get_params(), arrays, record)
        np.testing.assert_array_equal(copy.score_samples(test), detector.score_samples(test))
        assert copy.threshold_ == detector.threshold_


def test_scatter_is_stored_packed_and_unpacks_to_numpy_cov(features):
    train, _ = features
    detector = PadimDetector().fit(train)
    d, h, w = detector.feature_shape_
    rows, cols = np.tril_indices(d)
    position = 7
    expected = np.cov(train.reshape(len(train), d, h * w)[:, :, position], rowvar=False)
    np.testing.assert_allclose(
        detector.statistics_.covariance(slice(position, position + 1))[0],
        expected[rows, cols],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("n_train", [40, 4])  # 4 < d = 6: singular covariances
def test_float16_storage_halves_size_and_keeps_scores_close(features, n_train):
    train, test = features
    full = PadimDetector().fit(train[:n_train])
    half = PadimDetector(covariance_dtype="float16").fit(train[:n_train])
    half_arrays, full_arrays = half.fitted_state()[0], full.fitted_state()[0]
    assert half_arrays["packed_factor"].dtype == np.float16
    assert half_arrays["packed_factor"].nbytes * 2 == full_arrays["scatter"].nbytes
    assert len(pickle.dumps(half)) < len(pickle.dumps(full))
    np.testing.assert_allclose(half.score_samples(test), full.score_samples(test), rtol=2e-3)
    # It scores with the rounded factors it saves: the same before and after a reload.
    loaded = pickle.loads(pickle.dumps(half))
    assert loaded.statistics_ is None
    np.testing.assert_array_equal(loaded.score_samples(test), half.score_samples(test))


def test_a_model_loaded_from_float16_factors_is_for_inference_only(features):
    train, test = features
    half = pickle.loads(pickle.dumps(PadimDetector(covariance_dtype="float16").fit(train)))
    expected = half.score_samples(test)
    for call in (
        lambda: half.partial_fit(train),
        lambda: half.merge(PadimDetector().fit(train)),
        lambda: half.set_params(covariance_dtype="float32").fitted_state(),
    ):
        with pytest.raises(ValueError, match="keeps its Gaussians only"):
            call()
    half.set_params(covariance_dtype="float16")
    np.testing.assert_array_equal(half.score_samples(test), expected)  # unchanged
    with pytest.raises(ValueError, match="made with reg=0.01.*scores only with those"):
        half.set_params(reg=0.5).score_samples(test)


@pytest.mark.parametrize("as_masks", [False, True])
def test_fit_with_labels_uses_only_normal_images(features, as_masks):
    train, test = features
    labels = np.zeros(len(train), dtype=int)
    labels[::4] = 1
    y = np.zeros((len(train), 3, 3), dtype=bool) if as_masks else labels
    if as_masks:
        y[labels == 1, 1, 1] = True
    polluted = train.copy()
    polluted[labels == 1] += 50
    expected = PadimDetector().fit(train[labels == 0])
    fitted = PadimDetector().fit(polluted, y)
    assert fitted.n_samples_seen_ == (labels == 0).sum()
    np.testing.assert_allclose(fitted.score_samples(test), expected.score_samples(test))


def test_fit_with_only_anomalous_labels_is_an_error(features):
    with pytest.raises(ValueError, match="normal images"):
        PadimDetector().fit(features[0], np.ones(len(features[0])))


def test_pixel_threshold_is_the_quantile_of_the_held_out_maps(features):
    train, _ = features
    detector = PadimDetector(pixel_quantile=0.97, batch_size=7).fit(train)
    stats = detector.statistics_
    distances = stats.held_out_distances(stats.gaussians(0.01), torch.from_numpy(train))
    maps = detector.to_module("cpu").maps(distances).numpy()
    assert detector.pixel_threshold_ == pytest.approx(np.quantile(maps, 0.97), rel=1e-6)
    assert detector.threshold_ == pytest.approx(maps.max(), rel=1e-6)
    explicit = PadimDetector(threshold=1.0, pixel_quantile=1.0).fit(train)
    assert explicit.threshold_ == 1.0
    assert explicit.pixel_threshold_ == pytest.approx(maps.max(), rel=1e-6)


def test_pixel_threshold_flags_the_requested_share_of_new_normal_pixels():
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(4, 4))
    train, test = (
        np.einsum("nkhw,kd->ndhw", rng.normal(size=(n, 4, 6, 6)), mixing).astype(np.float32)
        for n in (300, 300)
    )
    detector = PadimDetector(pixel_quantile=0.99, sigma=1.0).fit(train)
    flagged = (detector.score_samples(test) >= detector.pixel_threshold_).mean()
    assert 0.005 <= flagged <= 0.02  # the requested 1 %, within sampling noise


def test_fitting_one_image_warns_and_sets_no_threshold(features):
    with pytest.warns(UserWarning, match="one image.*two images or more"):
        detector = PadimDetector().fit(features[0][:1])
    assert not hasattr(detector, "threshold_") and not hasattr(detector, "pixel_threshold_")
    with pytest.raises(NotFittedError, match="fit on two or more images"):
        detector.predict(features[1])


def test_held_out_distances_and_scores_are_under_the_model_without_each_image():
    X = np.random.default_rng(0).normal(size=(12, 3, 2, 2)).astype(np.float32)
    detector = PadimDetector(sigma=0, map_size=(2, 2)).fit(X)  # maps are the distances
    vectors = X.reshape(12, 3, 4).transpose(0, 2, 1).astype(np.float64)  # (n, positions, d)
    expected = []
    for i in range(12):
        others = np.delete(vectors, i, axis=0)
        residual = others - others.mean(axis=0)
        scatter = np.einsum("npi,npj->pij", residual, residual)
        # The rank-one downdate keeps the full fit's N - 1 normalisation.
        covariance = scatter / 11 + 0.01 * np.eye(3)
        offset = vectors[i] - others.mean(axis=0)
        squared = np.einsum("pi,pij,pj->p", offset, np.linalg.inv(covariance), offset)
        expected.append(np.sqrt(squared))
    expected = np.array(expected).reshape(12, 2, 2)
    stats = detector.statistics_
    distances = stats.held_out_distances(stats.gaussians(0.01), torch.from_numpy(X))
    assert distances.shape == (12, 2, 2)
    np.testing.assert_allclose(distances.numpy(), expected, rtol=1e-4)
    assert detector.threshold_ == pytest.approx(expected.max(), rel=1e-4)


@pytest.mark.parametrize("covariance_dtype", ["float32", "float16"])
def test_pickled_scoring_module_scores_the_same_without_factorising(covariance_dtype, monkeypatch):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 6, 4, 5)).astype(np.float32)
    test = rng.normal(size=(3, 6, 4, 5)).astype(np.float32)
    detector = PadimDetector(covariance_dtype=covariance_dtype).fit(train)
    scorer = pickle.loads(pickle.dumps(detector.to_module("cpu")))
    monkeypatch.setattr(statistics_module, "whitening_factors", None)  # no factorising
    maps, scores = scorer(torch.from_numpy(test))
    np.testing.assert_array_equal(maps.numpy(), detector.score_samples(test))
    np.testing.assert_array_equal(scores.numpy(), detector.decision_function(test))
