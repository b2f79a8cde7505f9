"""Numerics: rank-deficient and near-constant training sets, float32 scoring against a
float64 NumPy computation, the Cholesky fallback, and property-based tests.

Stated tolerances:

- On well-scaled features (spread not tiny next to the mean), the float32 distances agree
  with a float64 NumPy computation to a relative 2e-5 (measured: 4e-6 at d = 20, 100 and
  550, with fewer training images than d included).
- ``partial_fit`` in any split equals ``fit`` to float32 rounding of the statistics; the
  scores then agree to a relative ``1e-4 + 2e-7 * max|x|^2 / reg``: the covariance's
  rounding (relative 1e-7 of its largest entries) is seen through ``(C + reg I)^-1``,
  which for rank-deficient ``C`` (fewer images than d) magnifies it by up to
  ``max|x|^2 / reg`` (hypothesis found 0.17% for ``|x|`` ~ 67, two images, d = 2). The
  same holds for a permutation of the channels (0.3% found for ``|x|`` ~ 83).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import smooth_texture, unpack_upper

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core.packing import pack_lower, unpack_symmetric
from sk_padim.core.whitening import whitening_factors

RTOL = 2e-5


def whitening_factor(packed, reg):
    """Whitening factors ``(P, d, d)`` of packed covariances."""
    factor = torch.empty_like(packed)
    whitening_factors(lambda rows: packed[rows], len(packed), 6, reg, out=factor)
    return unpack_upper(factor)


PROPERTY_SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def reference_distances(train, test, reg=0.01):
    """PaDiM distances per position in float64 NumPy: ``sqrt(diff^T (cov + reg I)^-1 diff)``."""
    n, d, h, w = train.shape
    vectors = train.reshape(n, d, h * w).transpose(2, 0, 1).astype(np.float64)
    mean = vectors.mean(axis=1)
    centred = vectors - mean[:, None]
    cov = centred.transpose(0, 2, 1) @ centred / max(n - 1, 1) + reg * np.eye(d)
    diff = test.reshape(len(test), d, h * w).transpose(2, 0, 1).astype(np.float64)
    diff = diff - mean[:, None]
    solved = np.linalg.solve(cov, diff.transpose(0, 2, 1))
    squared = np.einsum("pmd,pdm->pm", diff, solved)
    return np.sqrt(squared).T.reshape(len(test), h, w)


def distance_grid(detector, X):
    """The detector's distances on the feature grid itself (no resize, no smoothing)."""
    _, h, w = detector.feature_shape_
    return detector.set_params(sigma=0, map_size=(h, w)).score_samples(X)


def correlated_features(rng, n, d, h, w):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.einsum("nkhw,kd->ndhw", rng.normal(size=(n, d, h, w)), mixing).astype(np.float32)


@pytest.mark.parametrize(
    ("n_train", "d", "grid"), [(10, 100, (3, 3)), (50, 550, (2, 2)), (1, 100, (2, 2))]
)
def test_fewer_images_than_features_give_finite_distances_equal_to_float64(n_train, d, grid):
    rng = np.random.default_rng(0)
    features = correlated_features(rng, n_train + 4, d, *grid)
    train, test = features[:n_train], features[n_train:]
    detector = PadimDetector().fit(train)
    for X in (train, test):
        distances = distance_grid(detector, X)
        assert np.isfinite(distances).all() and (distances >= 0).all()
        np.testing.assert_allclose(distances, reference_distances(train, X), rtol=RTOL)


def test_float32_scoring_agrees_with_float64_numpy():
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.1, 5, size=(1, 20, 1, 1)).astype(np.float32)
    features = correlated_features(rng, 48, 20, 4, 4) * scale + 3
    train, test = features[:40], features[40:] * 1.5
    distances = distance_grid(PadimDetector().fit(train), test)
    np.testing.assert_allclose(distances, reference_distances(train, test), rtol=RTOL)


@pytest.fixture(scope="module")
def feat():
    return PatchFeatureTransformer(weights=None, image_size=32, n_features=16, random_state=0).fit()


@pytest.mark.parametrize("grey_level", [0, 128, 255])
def test_blank_training_images_give_finite_nonnegative_distances(feat, grey_level):
    train = feat.transform(np.full((6, 32, 32, 3), grey_level, dtype=np.uint8))
    texture = feat.transform(smooth_texture(np.random.default_rng(0), 32)[None])
    detector = PadimDetector().fit(train)
    maps = detector.score_samples(np.concatenate([train[:1], texture]))
    assert np.isfinite(maps).all() and (maps >= 0).all()
    # Identical training vectors: zero covariance, so the distance is |x - mean| / sqrt(reg),
    # about 0 for the blank image itself.
    assert maps[0].max() < 1e-4 * maps[1].max()
    expected = np.linalg.norm(texture - train.mean(axis=0), axis=1) / np.sqrt(0.01)
    np.testing.assert_allclose(distance_grid(detector, texture), expected, rtol=1e-4)


def test_near_constant_features_give_finite_distances_close_to_float64():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(1, 10, 3, 3))
    train = (base + 1e-4 * rng.normal(size=(20, 10, 3, 3))).astype(np.float32)
    test = (base + 1e-3 * rng.normal(size=(4, 10, 3, 3))).astype(np.float32)
    for batch_size in (32, 3):
        distances = distance_grid(PadimDetector(batch_size=batch_size).fit(train), test)
        assert np.isfinite(distances).all() and (distances >= 0).all()
        np.testing.assert_allclose(distances, reference_distances(train, test), rtol=1e-4)


def test_features_with_a_large_common_offset_score_to_float64_accuracy():
    rng = np.random.default_rng(3)
    train = (1000 + 1e-3 * rng.normal(size=(20, 10, 3, 3))).astype(np.float32)
    test = (1000 + 1e-3 * rng.normal(size=(4, 10, 3, 3))).astype(np.float32)
    # The means are float64 and subtracted as float32 hi + lo pairs: with a float32 mean
    # (half an ulp of 1000 is 3e-5) distances were off by ~0.7%.
    for batch_size in (32, 3):
        distances = distance_grid(PadimDetector(batch_size=batch_size).fit(train), test)
        np.testing.assert_allclose(distances, reference_distances(train, test), rtol=1e-5)


def test_finite_features_whose_sum_overflows_float32_are_accepted():
    # The finiteness check sums each batch first; an overflowing sum of finite values
    # must fall back to checking value by value, not call them NaN.
    train = np.full((8, 3, 2, 2), 4e36, dtype=np.float32)
    assert not np.isfinite(train.sum(dtype=np.float32))
    detector = PadimDetector().fit(train)
    np.testing.assert_array_equal(distance_grid(detector, train[:2]), 0.0)


# --------------------------------------------------------------- Cholesky fallback


def covariances_with_eigenvalue(eigenvalue: float, n_positions=3, d=6, bad=1):
    """Packed covariances, position ``bad`` with one eigenvalue set to ``eigenvalue``."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    covs = []
    for position in range(n_positions):
        values = rng.uniform(0.5, 2, size=d)
        if position == bad:
            values[0] = eigenvalue
        covs.append((q * values) @ q.T)
    return pack_lower(torch.tensor(np.stack(covs))).float()


def test_cholesky_failure_falls_back_with_a_warning_and_finite_factor():
    packed = covariances_with_eigenvalue(-5.0)
    with pytest.warns(RuntimeWarning, match=r"not positive definite at 1 positions.*reg"):
        factor = whitening_factor(packed, reg=0.01)
    assert torch.isfinite(factor).all()
    # The positions that factorised are untouched by the fallback.
    healthy = whitening_factor(packed[[0, 2]], reg=0.01)
    torch.testing.assert_close(factor[[0, 2]], healthy, rtol=0, atol=0)
    # The fallback factor whitens the covariance plus the regularisation it settled on,
    # reg + the first tenfold step from reg that makes it positive definite: 0.01 + 10.
    u = factor[1].double()
    cov = unpack_symmetric(packed[1:2].double())[0]
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(u.T @ (cov + 10.01 * eye) @ u, eye, atol=1e-5, rtol=0)


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("bad_value", "device"),
    [
        (-1e9, "cpu"),
        (float("nan"), "cpu"),
        pytest.param(-1e9, "cuda", marks=NEEDS_CUDA),
        pytest.param(float("nan"), "cuda", marks=[NEEDS_CUDA]),
    ],
)
def test_hopeless_covariance_raises_instead_of_returning_nan(bad_value, device):
    packed = covariances_with_eigenvalue(-1.0).to(device)
    packed[1, 0] = bad_value
    with warnings.catch_warnings(), pytest.raises(FloatingPointError, match="huge values"):
        warnings.simplefilter("ignore", RuntimeWarning)
        factor = whitening_factor(packed, reg=0.01)
        assert torch.isfinite(factor).all(), "NaN factor"


def test_tiny_reg_on_rank_deficient_features_warns_and_stays_finite():
    """With reg far below float32 rounding, the singular covariance fails Cholesky and
    the fallback adds regularisation: a warning, never NaN."""
    rng = np.random.default_rng(5)
    train = rng.normal(size=(5, 30, 2, 2)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="Increase reg"):
        detector = PadimDetector(reg=1e-10).fit(train)
    distances = distance_grid(detector, rng.normal(size=(3, 30, 2, 2)).astype(np.float32))
    assert np.isfinite(distances).all() and (distances >= 0).all()


# ------------------------------------------------------------------------- properties


@st.composite
def problems(draw):
    """A training set (any float dtype), a test set, and a split of the training set."""
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 8))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 100)
    train = (rng.normal(size=(n, d, h, w)) * scale).astype(dtype)
    test = (rng.normal(size=(3, d, h, w)) * scale * 2).astype(dtype)
    cuts = sorted(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=3, unique=True)))
    cuts = [c for c in cuts if c < n]
    return train, test, cuts


@PROPERTY_SETTINGS
@given(problems(), st.integers(1, 5))
def test_partial_fit_in_any_split_equals_fit(problem, batch_size):
    train, test, cuts = problem
    full = PadimDetector(batch_size=batch_size).fit(train)
    streamed = PadimDetector(batch_size=batch_size)
    for chunk in np.split(train, cuts):
        streamed.partial_fit(chunk)
    assert streamed.n_samples_seen_ == full.n_samples_seen_ == len(train)
    scale = float(np.abs(train.astype(np.float64)).max()) + 1e-12
    streamed_stats, full_stats = streamed.statistics_, full.statistics_
    np.testing.assert_allclose(streamed_stats.mean, full_stats.mean, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(
        streamed_stats.covariance(slice(None)),
        full_stats.covariance(slice(None)),
        rtol=1e-4,
        atol=1e-5 * scale**2,
    )
    # Scores see the float32 rounding of the covariance through (C + reg I)^-1: for
    # rank-deficient C (n <= d) that is amplified by up to max|x|^2 / reg.
    conditioning = scale**2 / full.reg
    np.testing.assert_allclose(
        streamed.decision_function(test),
        full.decision_function(test),
        rtol=1e-4 + 2e-7 * conditioning,
    )


@PROPERTY_SETTINGS
@given(problems(), st.integers(1, 4), st.integers(5, 40))
def test_scores_do_not_depend_on_the_scoring_batch_size(problem, small, large):
    train, test, _ = problem
    detector = PadimDetector().fit(train)
    maps = detector.set_params(batch_size=small).score_samples(test)
    np.testing.assert_allclose(
        detector.set_params(batch_size=large).score_samples(test), maps, rtol=1e-5, atol=1e-6
    )


@PROPERTY_SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_scores_do_not_depend_on_the_order_of_channels(problem, random):
    train, test, _ = problem
    order = list(range(train.shape[1]))
    random.shuffle(order)
    maps = PadimDetector().fit(train).score_samples(test)
    shuffled = PadimDetector().fit(train[:, order]).score_samples(test[:, order])
    # Another order rounds the float32 covariance differently: the partial_fit tolerance.
    conditioning = float(np.abs(train.astype(np.float64)).max()) ** 2 / 0.01
    np.testing.assert_allclose(shuffled, maps, rtol=1e-4 + 2e-7 * conditioning, atol=1e-6)


@PROPERTY_SETTINGS
@given(problems(), st.sampled_from([1e-6, 1e-2, 1.0]), st.sampled_from([0.0, 1.0, 4.0]))
def test_distances_are_finite_and_nonnegative(problem, reg, sigma):
    train, test, _ = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tiny reg may take the fallback
        detector = PadimDetector(reg=reg, sigma=sigma).fit(train)
    for X in (train, test):
        maps = detector.score_samples(X)
        scores = detector.decision_function(X)
        assert np.isfinite(maps).all() and (maps >= 0).all()
        assert np.isfinite(scores).all() and (scores >= 0).all()
