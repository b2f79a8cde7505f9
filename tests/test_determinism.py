"""Determinism: the same random_state gives the same channels and bit-identical scores
in separate processes (on the CPU); random_state=None and RandomState instances behave
as scikit-learn documents.

``random_state`` seeds the draw of the channel indices and, with ``weights=None``, the
backbone's random initialisation: the cross-process test uses random weights, so it
covers both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from synthetic import textures_with_squares

from sk_padim import PatchFeatureTransformer

# Run in this process with images and out defined, and in a fresh one.
FIT_AND_SCORE = """
import numpy as np
from sklearn.pipeline import Pipeline
from sk_padim import PadimDetector, PatchFeatureTransformer

X = np.load(images)
pipe = Pipeline([
    ("feat", PatchFeatureTransformer(weights=None, image_size=32, n_features=20,
                                     random_state=7, device="cpu")),
    ("padim", PadimDetector(device="cpu")),
]).fit(X[:6])
np.savez(out, indices=pipe.named_steps["feat"].channel_indices_,
         maps=pipe.score_samples(X[6:]), scores=pipe.decision_function(X[6:]))
"""


def start_fit_in_new_process(images, out):
    script = "import sys\nimages, out = sys.argv[1:3]\n" + FIT_AND_SCORE
    return subprocess.Popen(
        [sys.executable, "-c", script, str(images), str(out)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        stderr=subprocess.PIPE,
    )


def test_same_random_state_gives_bit_identical_results_across_processes(tmp_path):
    images, _, _ = textures_with_squares(6, 3, size=32, seed=3)
    np.save(tmp_path / "x.npy", images)
    process = start_fit_in_new_process(tmp_path / "x.npy", tmp_path / "new.npz")
    names = {"images": tmp_path / "x.npy", "out": tmp_path / "here.npz"}
    exec(FIT_AND_SCORE, names)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()[-2000:]
    here, other = np.load(tmp_path / "here.npz"), np.load(tmp_path / "new.npz")
    for name in ("indices", "maps", "scores"):
        assert here[name].dtype == other[name].dtype and here[name].shape == other[name].shape
        assert here[name].tobytes() == other[name].tobytes(), f"{name} differ across processes"


@pytest.fixture(scope="module")
def backbone_module():
    """A tiny user module: fitting it is fast, and the channel draw is what is tested."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 3))


def draw(backbone_module, random_state):
    feat = PatchFeatureTransformer(
        backbone=backbone_module,
        layers=("0", "1"),
        n_features=20,
        image_size=16,
        random_state=random_state,
    )
    return feat.fit().channel_indices_


def test_an_int_random_state_draws_the_same_channels_every_fit(backbone_module):
    first = draw(backbone_module, 11)
    np.testing.assert_array_equal(draw(backbone_module, 11), first)
    assert not np.array_equal(draw(backbone_module, 12), first)


def test_random_state_none_draws_from_numpys_global_generator(backbone_module):
    """scikit-learn: None uses the global RandomState (np.random): a fresh draw each fit,
    reproducible by seeding np.random."""
    state = np.random.get_state()  # noqa: NPY002 (the global generator is what None means)
    try:
        np.random.seed(0)  # noqa: NPY002
        seeded = draw(backbone_module, None)
        again = draw(backbone_module, None)
        np.random.seed(0)  # noqa: NPY002
        np.testing.assert_array_equal(draw(backbone_module, None), seeded)
    finally:
        np.random.set_state(state)  # noqa: NPY002 (the global generator is what None means)
    assert not np.array_equal(again, seeded)


def test_a_random_state_instance_draws_afresh_each_fit(backbone_module):
    """scikit-learn: a RandomState instance is consumed, so successive fits differ, and
    the sequence of fits is reproducible from the instance's seed."""
    rng = np.random.RandomState(3)
    first, second = draw(backbone_module, rng), draw(backbone_module, rng)
    assert not np.array_equal(first, second)
    replay = np.random.RandomState(3)
    np.testing.assert_array_equal(draw(backbone_module, replay), first)
    np.testing.assert_array_equal(draw(backbone_module, replay), second)
