"""Scoring a batch at a time: ``iter_scores`` and ``decision_function`` hold one batch of
maps, never every image's (issue 22, outputs that fit in memory)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares
from torch.overrides import TorchFunctionMode

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core.postprocess import AnomalyMapGenerator
from sk_padim.streaming import ScoredImage, iter_scores

SIZE = 32


@pytest.fixture(scope="module")
def fitted():
    train, _, _ = textures_with_squares(6, 0, size=SIZE, seed=0)
    test, _, _ = textures_with_squares(4, 3, size=SIZE, seed=1)
    feat = PatchFeatureTransformer(weights=None, image_size=SIZE, n_features=8, random_state=0)
    return Pipeline([("feat", feat), ("padim", PadimDetector())]).fit(train), test


class Spy:
    """Delegates ``score_samples``; records each call's image count and keeps a weak
    reference to each batch of maps it returned."""

    def __init__(self, estimator):
        self.estimator = estimator
        self.calls: list[int] = []
        self.returned: list[weakref.ref] = []

    def score_samples(self, images):
        maps = self.estimator.score_samples(images)
        self.calls.append(len(images))
        self.returned.append(weakref.ref(maps))
        return maps

    def alive(self) -> list[np.ndarray]:
        return [maps for ref in self.returned if (maps := ref()) is not None]


def test_iter_scores_equal_score_samples_and_decision_function(fitted):
    pipe, test = fitted
    results = list(iter_scores(pipe, test, batch_size=3))
    assert all(isinstance(result, ScoredImage) for result in results)
    assert [result.index for result in results] == list(range(len(test)))
    # Batches of 3 and of 7 take different float32 summation orders.
    np.testing.assert_allclose(
        np.stack([result.map for result in results]), pipe.score_samples(test), rtol=1e-5
    )
    np.testing.assert_allclose(
        [result.score for result in results], pipe.decision_function(test), rtol=1e-5
    )


def test_iter_scores_hold_one_batch_of_maps_at_a_time(fitted):
    pipe, test = fitted
    spy = Spy(pipe)
    kept = []
    for result in iter_scores(spy, test, batch_size=3):
        alive = spy.alive()
        assert len(alive) == 1  # this batch's maps only: the previous ones are freed
        assert len(spy.calls) == result.index // 3 + 1  # scored when reached, not before
        assert not np.shares_memory(result.map, alive[0])  # a copy, which frees the batch
        kept.append(result.map)
        del alive
    assert spy.calls == [3, 3, 1] and spy.alive() == []
    assert len(kept) == len(test)


def test_iter_scores_read_files_when_their_batch_is_scored(fitted, tmp_path):
    pipe, test = fitted
    paths = []
    for i, image in enumerate(test[:6]):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    scored = iter_scores(pipe, tmp_path, batch_size=2)  # a folder: its files, sorted
    first = next(scored)
    np.testing.assert_allclose(first.map, pipe.score_samples(paths[:1])[0], rtol=1e-5)
    paths[4].write_bytes(b"not a png")  # broken after the run started, in the third batch
    indices = [first.index]
    with pytest.raises(ValueError, match="004.png"):
        for result in scored:
            indices.append(result.index)
    assert indices == [0, 1, 2, 3]


def test_iter_scores_bad_arguments_are_clear_errors(fitted):
    pipe, test = fitted
    for batch_size in (0, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            next(iter_scores(pipe, test, batch_size=batch_size))
    with pytest.raises(TypeError, match="score_samples.*PadimDetector"):
        next(iter_scores(pipe[0], test))


class LargestTensor(TorchFunctionMode):
    """Records the number of elements of the largest tensor any torch call makes (dense
    ones: a sparse tensor's ``numel`` counts its zeros, which it does not store)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor) and item.layout == torch.strided:
                self.largest = max(self.largest, item.numel())
        return out


def test_decision_function_never_holds_all_maps(monkeypatch):
    """No tensor as large as every image's maps is made (``score_samples``, the control,
    makes one), and each batch's maps are dropped once scored: at most two batches' maps
    are alive at once (the next is made before the previous name is rebound)."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(10, 6, 5, 5)).astype(np.float32)
    test = rng.normal(size=(24, 6, 5, 5)).astype(np.float32)
    batch, map_pixels = 4, 64 * 64
    detector = PadimDetector(batch_size=batch, map_size=64).fit(train)
    with LargestTensor() as control:
        expected = detector.score_samples(test).max(axis=(1, 2))
    assert control.largest >= len(test) * map_pixels

    live, made, peak = set(), [], [0]
    original = AnomalyMapGenerator.maps_and_scores

    def counted(self, distances):
        maps, scores = original(self, distances)
        key = len(made)
        made.append(len(maps))
        live.add(key)
        weakref.finalize(maps, live.discard, key)
        peak[0] = max(peak[0], sum(made[k] for k in live))
        return maps, scores

    monkeypatch.setattr(AnomalyMapGenerator, "maps_and_scores", counted)
    with LargestTensor() as scoring:
        scores = detector.decision_function(test)
    assert scoring.largest <= batch * map_pixels  # one batch's maps at most
    assert sum(made) == len(test) and max(made) <= batch
    assert peak[0] <= 2 * batch < len(test)
    assert not live  # nothing kept after the call
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
