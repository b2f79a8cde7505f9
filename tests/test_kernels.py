"""The optimised kernels against straightforward NumPy computations."""

import numpy as np
import pytest
import sklearn
import torch

from sk_padim import PadimDetector, gaussian, mahalanobis
from sk_padim.gaussian import (
    GaussianStatistics,
    pack_lower,
    unpack_symmetric,
    unpack_upper,
    whitening_factor,
)
from sk_padim.mahalanobis import PatchGaussians


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(25, 6, 3, 4)) * rng.uniform(0.1, 3, size=(1, 6, 1, 1))
    test = rng.normal(size=(5, 6, 3, 4))
    return train.astype(np.float32), test.astype(np.float32)


@pytest.mark.parametrize("batch_sizes", [[25], [1] * 25, [3, 10, 12], [24, 1]])
@pytest.mark.parametrize("chunk_positions", [1, 5, 12, 100])
def test_streaming_statistics_equal_numpy_mean_and_cov(problem, batch_sizes, chunk_positions):
    train, _ = problem
    stats = GaussianStatistics.empty(12, 6, "cpu")
    for chunk in np.split(train, np.cumsum(batch_sizes)[:-1]):
        stats.update(torch.tensor(chunk), chunk_positions)
    vectors = train.reshape(25, 6, 12).astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy(), vectors.mean(axis=0).T, atol=1e-6)
    expected = np.stack([np.cov(vectors[:, :, p], rowvar=False) for p in range(12)])
    packed = stats.consume_packed()
    np.testing.assert_allclose(unpack_symmetric(packed, 6).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("chunk_positions", [1, 5, 12, 100])
def test_kernel_equals_per_position_solve_for_any_chunking(problem, chunk_positions, monkeypatch):
    monkeypatch.setattr(mahalanobis, "positions_per_chunk", lambda *_: chunk_positions)
    train, test = problem
    vectors = train.reshape(25, 6, 12).astype(np.float64)
    covariances = np.stack([np.cov(vectors[:, :, p], rowvar=False) for p in range(12)])
    mean = vectors.mean(axis=0).T
    factor = whitening_factor(pack_lower(torch.tensor(covariances)), 0.01)
    distances = PatchGaussians(torch.tensor(mean), factor.float())(torch.tensor(test)).numpy()
    diff = test.reshape(5, 6, 12).transpose(2, 0, 1) - mean[:, None, :]
    regularised = covariances + 0.01 * np.eye(6)
    solved = np.linalg.solve(regularised, diff.transpose(0, 2, 1))
    expected = np.sqrt(np.einsum("pnd,pdn->pn", diff, solved)).T.reshape(5, 3, 4)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)


def test_working_memory_budget_does_not_change_maps(problem):
    train, test = problem
    detector = PadimDetector().fit(train)
    expected = detector.score_samples(test)
    with sklearn.config_context(working_memory=1e-5):
        np.testing.assert_allclose(detector.score_samples(test), expected, rtol=1e-6)


def test_pack_and_unpack_round_trip():
    matrices = torch.randn(3, 5, 5)
    symmetric = matrices + matrices.transpose(1, 2)
    assert pack_lower(symmetric).shape == (3, 15)
    torch.testing.assert_close(unpack_symmetric(pack_lower(symmetric), 5), symmetric)
    upper = torch.triu(torch.randn(3, 5, 5))
    assert torch.equal(unpack_upper(pack_lower(upper.transpose(1, 2)), 5), upper)


def test_factorisation_threads_each_run_lapack_on_one_thread(monkeypatch):
    # Batched LAPACK with torch's intra-op threads collapsed under load: each worker
    # thread must run single-threaded, and the caller's own setting must not change.
    seen = []
    cholesky_ex = torch.linalg.cholesky_ex

    def recording(matrices, **options):
        seen.append(torch.get_num_threads())
        return cholesky_ex(matrices, **options)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    monkeypatch.setattr(gaussian, "CPU_CHUNK_POSITIONS", 2)
    before = torch.get_num_threads()
    with torch.inference_mode():
        torch.set_num_threads(2)
        try:
            covariances = torch.eye(3).expand(10, 3, 3)
            factor = whitening_factor(pack_lower(covariances), 1.0)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(before)
    assert seen == [1] * 5
    torch.testing.assert_close(factor, torch.eye(3).expand(10, 3, 3) / np.sqrt(2))
