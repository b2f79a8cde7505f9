"""Fits past ``max_memory``: Gaussians made in place of the statistics, or arrays in a store.

Each layout must score as the in-memory fit does (maps to 1e-4 relative), and a store
must never hold half-written arrays that look complete.
"""

import pickle
import threading

import numpy as np
import pytest
import torch

from sk_padim import PadimDetector
from sk_padim.core import statistics as statistics_module
from sk_padim.core.store import RowFile, StoreFolder

D, H, W = 6, 8, 10
ARRAY_BYTES = H * W * (8 * D + 2 * D * (D + 1))  # statistics, or Gaussians, of the grid
GIB = 2**30
# max_memory for each layout: both arrays fit, one fits, none fits.
BOTH, ONE, NONE = 3 * ARRAY_BYTES / GIB, 1.5 * ARRAY_BYTES / GIB, 0.5 * ARRAY_BYTES / GIB


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(15, D, H, W)).astype(np.float32) + 3
    test = rng.normal(size=(4, D, H, W)).astype(np.float32) + 3
    test[0, :, 2, 3] += 4  # an anomaly
    return train, test


@pytest.fixture(scope="module")
def reference(features):
    train, test = features
    detector = PadimDetector(sigma=1.0).fit(train)
    return detector, detector.score_samples(test)


def fit(features, tmp_path=None, **params):
    store = None if tmp_path is None else tmp_path / "store"
    return PadimDetector(sigma=1.0, store=store, **params).fit(features[0])


def assert_scores_like(detector, reference, test):
    expected_detector, expected_maps = reference
    np.testing.assert_allclose(detector.score_samples(test), expected_maps, rtol=1e-4)
    assert detector.threshold_ == pytest.approx(expected_detector.threshold_, rel=1e-4)
    assert detector.pixel_threshold_ == pytest.approx(expected_detector.pixel_threshold_, rel=1e-4)


def test_gaussians_made_in_place_of_the_statistics_score_as_in_memory(features, reference):
    detector = fit(features, max_memory=ONE)
    assert detector.statistics_ is None
    assert_scores_like(detector, reference, features[1])
    with pytest.raises(ValueError, match="keeps its Gaussians only.*max_memory"):
        detector.partial_fit(features[0])
    # It saves and loads as the Gaussians it keeps.
    copy = PadimDetector.from_fitted_state(detector.get_params(), *detector.fitted_state())
    np.testing.assert_allclose(copy.score_samples(features[1]), reference[1], rtol=1e-4)


def test_statistics_in_a_store_score_as_in_memory_and_rescore(features, reference, tmp_path):
    detector = fit(features, tmp_path, max_memory=ONE)
    assert isinstance(detector.statistics_.scatter, RowFile)
    assert_scores_like(detector, reference, features[1])
    # Another reg is factorised from the stored statistics, as a fit with it would be.
    expected = PadimDetector(sigma=1.0, reg=0.5).fit(features[0]).score_samples(features[1])
    detector.set_params(reg=0.5)
    np.testing.assert_allclose(detector.score_samples(features[1]), expected, rtol=1e-4)


def test_statistics_and_gaussians_in_a_store_score_as_in_memory(features, reference, tmp_path):
    detector = fit(features, tmp_path, max_memory=NONE)
    assert isinstance(detector.statistics_.scatter, RowFile)
    assert_scores_like(detector, reference, features[1])
    (fit_folder,) = (tmp_path / "store").glob("fit-*")
    assert StoreFolder.is_complete(fit_folder)
    assert sorted(path.name for path in fit_folder.glob("*.npy")) == ["factor.npy", "scatter.npy"]
    # A pickle holds the arrays themselves, and scores the same without the folder.
    loaded = pickle.loads(pickle.dumps(detector))
    np.testing.assert_allclose(loaded.score_samples(features[1]), reference[1], rtol=1e-4)
    with pytest.raises(ValueError, match="made in the store at fit only"):
        detector.set_params(reg=0.5).score_samples(features[1])


def test_gaussians_past_max_memory_need_a_store(features):
    with pytest.raises(ValueError, match=r"more than max_memory.*set store=<folder>"):
        fit(features, max_memory=NONE)


def test_partial_fit_refuses_statistics_past_max_memory(features):
    with pytest.raises(ValueError, match="partial_fit keeps.*in memory"):
        PadimDetector(max_memory=ONE).partial_fit(features[0])


def test_a_completed_fit_deletes_the_files_of_the_fits_before(features, tmp_path):
    first = fit(features, tmp_path, max_memory=NONE)
    second = fit(features, tmp_path, max_memory=NONE)
    (fit_folder,) = (tmp_path / "store").glob("fit-*")
    assert fit_folder == second.statistics_.scatter.path.parent
    # The first model's open files are gone from the folder, not from under it (POSIX).
    np.testing.assert_allclose(
        first.score_samples(features[1]), second.score_samples(features[1]), rtol=1e-6
    )


def test_an_interrupted_fit_leaves_nothing_a_later_fit_reads_as_valid(
    features, reference, tmp_path, monkeypatch
):
    detector = fit(features, tmp_path, max_memory=NONE)
    (complete,) = (tmp_path / "store").glob("fit-*")
    written = []

    def interrupted(*args, **kwargs):
        written.extend((tmp_path / "store").glob("fit-*"))
        raise KeyboardInterrupt

    monkeypatch.setattr(statistics_module, "whitening_factors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        detector.fit(features[0] + 1)
    monkeypatch.undo()
    assert len(written) == 2  # the new fit had written its scatter ...
    assert list((tmp_path / "store").glob("fit-*")) == [complete]  # ... and deleted it
    assert_scores_like(detector, reference, features[1])  # the model is unchanged
    # A killed process leaves an unmarked subfolder: the next fit deletes it.
    killed = tmp_path / "store" / "fit-killed"
    killed.mkdir()
    (killed / "scatter.npy").write_bytes(b"half written")
    fit(features, tmp_path, max_memory=NONE)
    assert not killed.exists()
    assert len(list((tmp_path / "store").glob("fit-*"))) == 1


def test_row_files_read_and_write_ranges_from_many_threads(tmp_path):
    rows = RowFile.create(tmp_path / "rows.npy", (1000, 7), torch.float32)
    expected = np.arange(7000, dtype=np.float32).reshape(1000, 7)

    def write(start):
        rows[start : start + 100] = torch.from_numpy(expected[start : start + 100])

    threads = [threading.Thread(target=write, args=(start,)) for start in range(0, 1000, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(rows[250:640].numpy(), expected[250:640])
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), expected)  # a valid .npy
    np.testing.assert_array_equal(rows.array(), expected)
    with pytest.raises(ValueError, match="contiguous ranges"):
        rows[::2]
    with pytest.raises(TypeError, match="pickle the arrays"):
        pickle.dumps(rows)


def test_a_truncated_row_file_is_named(tmp_path):
    rows = RowFile.create(tmp_path / "rows.npy", (10, 4), torch.float32)
    rows.close()
    size = (tmp_path / "rows.npy").stat().st_size
    with open(tmp_path / "rows.npy", "r+b") as file:
        file.truncate(size - 16)
    with pytest.raises(OSError, match="truncated file"):
        RowFile(tmp_path / "rows.npy")[0:10]


@pytest.mark.parametrize("max_memory", [BOTH, ONE, NONE], ids=["memory", "one", "store"])
def test_fit_batches_equals_fit_in_every_layout(features, reference, tmp_path, max_memory):
    # Batches of features made twice (accumulation, thresholds), as fit_streaming makes
    # them from image files: the model of one fit on all the features, thresholds included.
    train, test = features
    calls = []

    def make_batches():
        calls.append(len(calls))
        return (train[start : start + 4] for start in range(0, len(train), 4))

    store = tmp_path / "store" if max_memory == NONE else None
    detector = PadimDetector(sigma=1.0, max_memory=max_memory, store=store)
    detector.fit_batches(make_batches)
    assert calls == [0, 1] and detector.n_samples_seen_ == len(train)
    assert_scores_like(detector, reference, test)


def test_fit_batches_that_change_between_passes_are_a_clear_error(features):
    train = features[0]
    passes = iter([np.split(train, 3), np.split(train[:10], 2)])
    detector = PadimDetector()
    with pytest.raises(ValueError, match="held 15 images when .* accumulated and 10 when"):
        detector.fit_batches(lambda: next(passes))
    assert not hasattr(detector, "n_samples_seen_")  # unchanged
    with pytest.raises(ValueError, match="no features to fit on"):
        detector.fit_batches(lambda: [])
    with pytest.raises(ValueError, match="shape"):
        detector.fit_batches(lambda: [train[:3], train[3:, :, :4]])
