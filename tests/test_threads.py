"""Threads scoring one loaded model while another thread fits new transformers.

Fitting truncates backbones without ``torch.fx`` (which would patch ``nn.Module.__call__``
for every thread while it traces) and without a lock around forward passes: scores from
any number of threads equal the serial ones. The tolerance, ``rtol=1e-5``, allows the
backend to round a convolution otherwise when threads share the cores.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares
from torch import nn

from sk_padim import PadimDetector, PatchFeatureTransformer

N_SCORERS = 8
ROUNDS = 3


class Generic(nn.Module):
    """A model outside the known families: the hook route."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x).relu()).mean(dim=(2, 3)))


def transformer(backbone="resnet18", **params) -> PatchFeatureTransformer:
    params = {"weights": None, "image_size": 32, "n_features": 8, "random_state": 0, **params}
    return PatchFeatureTransformer(backbone, device="cpu", **params)


NEW_TRANSFORMERS = [
    lambda: transformer(image_size=48),
    lambda: transformer(Generic(), layers=("a", "b")),
    lambda: transformer(layers=("layer1", "layer2.0")),  # a ResNet through hooks
    lambda: transformer("efficientnet_b0", image_size=64),
]


@pytest.fixture(scope="module")
def images():
    return textures_with_squares(10, 4, size=48, seed=0)[0]


@pytest.mark.parametrize(
    "feat",
    [transformer(), transformer(Generic(), layers=("a", "b"))],
    ids=["stages", "hooks"],
)
def test_threads_scoring_while_another_fits_get_the_serial_scores(images, feat, tmp_path):
    train, test = images[:10], images[10:]
    joblib.dump(Pipeline([("feat", feat), ("padim", PadimDetector())]).fit(train), tmp_path / "m")
    model = joblib.load(tmp_path / "m")
    expected = (model.decision_function(test), model.score_samples(test))
    fitting = threading.Event()
    fitting.set()

    def fit_new_transformers():
        try:
            for make in NEW_TRANSFORMERS * 2:
                make().fit_transform(test)
        finally:
            fitting.clear()

    def score(_):
        results = []
        while fitting.is_set() or len(results) < ROUNDS:
            results.append((model.decision_function(test), model.score_samples(test)))
        return results

    with ThreadPoolExecutor(N_SCORERS + 1) as pool:
        fitter = pool.submit(fit_new_transformers)
        scored = list(pool.map(score, range(N_SCORERS)))
        fitter.result()
    for results in scored:
        for scores, maps in results:
            np.testing.assert_allclose(scores, expected[0], rtol=1e-5)
            np.testing.assert_allclose(maps, expected[1], rtol=1e-5)
