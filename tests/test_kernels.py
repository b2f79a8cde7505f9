"""The core's kernels and statistics against straightforward NumPy computations."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic import unpack_upper

from sk_padim.core import mahalanobis, statistics, whitening
from sk_padim.core.mahalanobis import PatchGaussians
from sk_padim.core.packing import pack_lower, unpack_symmetric
from sk_padim.core.statistics import PatchStatistics
from sk_padim.core.whitening import whitening_factors


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(25, 6, 3, 4)) * rng.uniform(0.1, 3, size=(1, 6, 1, 1))
    test = rng.normal(size=(5, 6, 3, 4))
    return train.astype(np.float32), test.astype(np.float32)


def numpy_statistics(train):
    """Mean (P, d) and covariances (P, d, d) of (n, d, h, w) features, float64."""
    n, d = train.shape[:2]
    vectors = train.reshape(n, d, -1).astype(np.float64)
    covariances = np.stack(
        [np.cov(vectors[:, :, p], rowvar=False) for p in range(vectors.shape[2])]
    )
    return vectors.mean(axis=0).T, covariances


def accumulate(train, batch_sizes):
    stats = PatchStatistics.empty(12, 6)
    for chunk in np.split(train, np.cumsum(batch_sizes)[:-1]):
        stats.update(torch.tensor(chunk))
    return stats


@pytest.mark.parametrize("batch_sizes", [[25], [1] * 25, [3, 10, 12], [24, 1]])
@pytest.mark.parametrize("chunk_positions", [1, 5, 12, 100])
def test_streaming_statistics_equal_numpy_mean_and_cov(
    problem, batch_sizes, chunk_positions, monkeypatch
):
    monkeypatch.setattr(statistics, "positions_per_chunk", lambda *_: chunk_positions)
    train, _ = problem
    stats = accumulate(train, batch_sizes)
    mean, covariances = numpy_statistics(train)
    assert stats.count == 25
    np.testing.assert_allclose(stats.mean.numpy(), mean, atol=1e-6)
    covariance = unpack_symmetric(stats.covariance(slice(None))).numpy()
    np.testing.assert_allclose(covariance, covariances, atol=1e-5)


@pytest.mark.parametrize("cut", [1, 12, 24])
def test_merge_equals_the_statistics_of_the_union(problem, cut):
    train, _ = problem
    shifted = train + 50  # the merge's mean-shift term carries the offset exactly
    left, right = accumulate(train[:cut], [cut]), accumulate(shifted[cut:], [25 - cut])
    merged = left.merge(right)
    mean, covariances = numpy_statistics(np.concatenate([train[:cut], shifted[cut:]]))
    assert merged.count == 25 and left.count == cut  # operands unchanged
    np.testing.assert_allclose(merged.mean.numpy(), mean, atol=1e-5)
    covariance = unpack_symmetric(merged.covariance(slice(None))).numpy()
    np.testing.assert_allclose(covariance, covariances, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="Cannot merge"):
        left.merge(PatchStatistics.empty(12, 5))


def test_split_and_join_give_the_statistics_back(problem):
    stats = accumulate(problem[0], [25])
    parts = stats.split(5)
    assert [part.n_positions for part in parts] == [len(r) for r in np.array_split(range(12), 5)]
    joined = PatchStatistics.join(parts)
    assert torch.equal(joined.mean, stats.mean) and torch.equal(joined.scatter, stats.scatter)
    with pytest.raises(ValueError, match="n_parts"):
        stats.split(13)
    with pytest.raises(ValueError, match="Cannot join"):
        PatchStatistics.join([parts[0], accumulate(problem[0][:3], [3]).split(5)[1]])


def test_statistics_pickle_and_round_trip_through_arrays(problem):
    stats = accumulate(problem[0], [25])
    for copy in (
        pickle.loads(pickle.dumps(stats)),
        PatchStatistics.from_arrays(stats.count, **stats.arrays()),
    ):
        assert copy.count == 25
        assert torch.equal(copy.mean, stats.mean) and torch.equal(copy.scatter, stats.scatter)
    arrays = stats.arrays()
    with pytest.raises(ValueError, match="float64 mean"):
        PatchStatistics.from_arrays(25, arrays["mean"].astype(np.float32), arrays["scatter"])
    with pytest.raises(ValueError, match="non-finite"):
        PatchStatistics.from_arrays(25, arrays["mean"] * np.nan, arrays["scatter"])
    with pytest.raises(ValueError, match="does not fit"):
        PatchStatistics(25, stats.mean, stats.scatter[:, :3])


@pytest.mark.parametrize("chunk_positions", [1, 5, 12, 100])
def test_kernel_equals_per_position_solve_for_any_chunking(problem, chunk_positions, monkeypatch):
    monkeypatch.setattr(mahalanobis, "positions_per_chunk", lambda *_: chunk_positions)
    train, test = problem
    mean, covariances = numpy_statistics(train)
    gaussians = accumulate(train, [25]).gaussians(0.01)
    distances = gaussians(torch.tensor(test)).numpy()
    diff = test.reshape(5, 6, 12).transpose(2, 0, 1) - mean[:, None, :]
    regularised = covariances + 0.01 * np.eye(6)
    solved = np.linalg.solve(regularised, diff.transpose(0, 2, 1))
    expected = np.sqrt(np.einsum("pnd,pdn->pn", diff, solved)).T.reshape(5, 3, 4)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)
    # The export's form, every factor unpacked at once: the same distances.
    traced = torch.jit.trace(gaussians, torch.tensor(test))
    np.testing.assert_allclose(traced(torch.tensor(test)).numpy(), distances, rtol=1e-6)


def test_float16_storage_rounds_the_factors_once(problem):
    train, test = problem
    gaussians = accumulate(train, [25]).gaussians(0.01, storage="float16")
    assert gaussians.storage == "float16"
    packed = gaussians.packed_factor_values()
    assert packed.dtype == torch.float16
    # The factors scored with are exactly the float16 values stored.
    assert torch.equal(unpack_upper(packed.float()), gaussians.whole_factor())
    copy = pickle.loads(pickle.dumps(gaussians))
    assert copy.storage == "float16"
    assert torch.equal(copy(torch.tensor(test)), gaussians(torch.tensor(test)))
    exact = accumulate(train, [25]).gaussians(0.01)(torch.tensor(test))
    np.testing.assert_allclose(gaussians(torch.tensor(test)), exact, rtol=2e-3)


def test_pack_and_unpack_round_trip():
    matrices = torch.randn(3, 5, 5)
    symmetric = matrices + matrices.transpose(1, 2)
    assert pack_lower(symmetric).shape == (3, 15)
    torch.testing.assert_close(unpack_symmetric(pack_lower(symmetric)), symmetric)
    upper = torch.triu(torch.randn(3, 5, 5))
    assert torch.equal(unpack_upper(pack_lower(upper.transpose(1, 2))), upper)
    with pytest.raises(ValueError, match="no packed triangle"):
        unpack_symmetric(torch.zeros(2, 7))


def test_gaussians_check_what_they_are_built_from():
    mean = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 mean"):
        PatchGaussians.from_arrays(mean.float(), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="do not fit"):
        PatchGaussians.from_arrays(mean, torch.zeros(4, 10))


def test_factorisation_threads_each_run_lapack_on_one_thread(monkeypatch):
    # Batched LAPACK with torch's intra-op threads collapsed under load: each worker
    # thread must run single-threaded, and the caller's own setting must not change.
    seen = []
    cholesky_ex = torch.linalg.cholesky_ex

    def recording(matrices, **options):
        seen.append(torch.get_num_threads())
        return cholesky_ex(matrices, **options)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", recording)
    monkeypatch.setattr(whitening, "_CPU_CHUNK_POSITIONS", 2)
    before = torch.get_num_threads()
    packed = pack_lower(torch.eye(3).expand(10, 3, 3))
    with torch.inference_mode():
        torch.set_num_threads(2)
        try:
            factor = torch.empty_like(packed)
            whitening_factors(lambda rows: packed[rows], 10, 3, 1.0, out=factor)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(before)
    assert seen == [1] * 5
    torch.testing.assert_close(unpack_upper(factor), torch.eye(3).expand(10, 3, 3) / np.sqrt(2))


def test_scoring_shows_no_torch_notice_even_when_warnings_are_errors():
    # torch's one-time "CSR support is in beta" notice comes from the first sparse tensor
    # of a process: a fresh interpreter, with every warning an error, scores cleanly and
    # leaves the user's filters as they were.
    code = (
        "import warnings, numpy as np\n"
        "from sk_padim import PadimDetector\n"
        "X = np.random.default_rng(0).normal(size=(6, 5, 4, 4)).astype(np.float32)\n"
        "filters = list(warnings.filters)\n"
        "PadimDetector().fit(X).score_samples(X)\n"
        "assert warnings.filters == filters\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=300)
