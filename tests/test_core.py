"""The torch core, device-resident features, thread safety and the public seams."""

from __future__ import annotations

import ast
import io
import pickle
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from synthetic import assert_labels_like, textures_with_squares
from torch import nn

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core.backbones import TruncatedBackbone
from sk_padim.core.devices import DeviceFeatures
from sk_padim.datasets import list_images
from sk_padim.pipelines import padim_model

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


class Untraceable(nn.Module):
    """A small CNN whose forward branches on data, so torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu(self.a(x))
        if x.sum() > 0:  # data-dependent control flow
            x = x * 1.0
        return self.c(torch.relu(self.b(x)))


def make_pipeline(backbone="resnet18", device="cpu", **feat_params) -> Pipeline:
    params = {"weights": None, "image_size": 64, "n_features": 20, "random_state": 0}
    if backbone != "resnet18":
        params["layers"] = ("a", "b")
    feat = PatchFeatureTransformer(backbone=backbone, device=device, **{**params, **feat_params})
    return Pipeline([("feat", feat), ("padim", PadimDetector(device=device, batch_size=3))])


@pytest.fixture(scope="module")
def images():
    train, _, _ = textures_with_squares(8, 0, seed=0)
    test, _, _ = textures_with_squares(3, 3, seed=1)
    return train, test


@pytest.fixture(scope="module")
def fitted(images):
    return make_pipeline().fit(images[0])


def channels_first(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_torch_core_maps_equal_the_estimators_maps(fitted, images):
    _, test = images
    model = padim_model(fitted, "cpu")
    with torch.inference_mode():
        maps, scores = model(channels_first(test))
    np.testing.assert_allclose(maps.numpy(), fitted.score_samples(test), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), fitted.decision_function(test), rtol=1e-5)
    np.testing.assert_allclose(scores.numpy(), maps.numpy().max(axis=(1, 2)), rtol=1e-6)


def test_torch_model_of_a_pipeline_needs_a_fitted_padim_pipeline():
    with pytest.raises(NotFittedError):
        padim_model(make_pipeline())
    with pytest.raises(TypeError, match="padim_model needs Pipeline"):
        padim_model(Pipeline([("padim", PadimDetector())]))


def test_scorer_module_equals_the_detector(fitted, images):
    features = fitted[0].transform(images[1])
    with torch.inference_mode():
        maps, scores = fitted[-1].to_module("cpu")(torch.from_numpy(features))
    detector_maps = fitted[-1].score_samples(features)
    detector_scores = fitted[-1].decision_function(features)
    # One batch here, batches of 3 in the detector: float32 sums differ in rounding only.
    np.testing.assert_allclose(maps.numpy(), detector_maps, rtol=1e-6)
    np.testing.assert_allclose(scores.numpy(), detector_scores, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_pipeline_with_tensors_in_equals_numpy_in(fitted, images, dtype):
    _, test = images
    pixels = channels_first(test)
    if dtype == torch.float32:
        pixels, test = pixels / 255.0, test / 255.0
    maps = fitted.score_samples(pixels)
    scores = fitted.decision_function(pixels)
    assert isinstance(maps, torch.Tensor) and isinstance(scores, torch.Tensor)
    np.testing.assert_allclose(maps.numpy(), fitted.score_samples(test), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), fitted.decision_function(test), rtol=1e-6)
    labels = fitted.predict(pixels)
    threshold = fitted[-1].threshold_
    assert_labels_like(labels.numpy() == -1, scores.numpy(), threshold, fitted.predict(test))


def test_fit_on_tensors_equals_fit_on_numpy(images):
    train, test = images
    from_numpy = make_pipeline().fit(train)
    from_tensors = make_pipeline().fit(channels_first(train))
    np.testing.assert_array_equal(
        from_tensors[-1].statistics_.mean, from_numpy[-1].statistics_.mean
    )
    assert from_tensors[-1].threshold_ == from_numpy[-1].threshold_
    np.testing.assert_array_equal(
        from_tensors.decision_function(test), from_numpy.decision_function(test)
    )


def test_device_features_read_as_numpy_and_pickle_as_numpy(fitted, images):
    features = fitted[0].transform(images[1])
    wrapped = DeviceFeatures(torch.from_numpy(features))
    assert wrapped.shape == features.shape and len(wrapped) == len(features)
    assert wrapped.dtype == np.float32 and wrapped.ndim == 4
    np.testing.assert_array_equal(np.asarray(wrapped), features)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(wrapped)), features)
    rows = np.array([True, False, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(wrapped[rows]), features[rows])
    np.testing.assert_array_equal(wrapped[0], features[0])
    scores = fitted[-1].decision_function(wrapped)
    assert isinstance(scores, np.ndarray)
    np.testing.assert_array_equal(scores, fitted[-1].decision_function(features))


def _score_concurrently(pipe, test, n_threads=8, calls=20):
    """Each of ``n_threads`` threads alternates decision_function and score_samples."""
    start = threading.Barrier(n_threads)

    def work(index):
        start.wait()
        results = []
        for call in range(calls):
            if (index + call) % 2:
                results.append(("scores", pipe.decision_function(test)))
            else:
                results.append(("maps", pipe.score_samples(test[:2])))
        return results

    with ThreadPoolExecutor(n_threads) as pool:
        return [r for results in pool.map(work, range(n_threads)) for r in results]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", ["resnet18", "untraceable"])
def test_threads_scoring_a_freshly_loaded_model_get_the_serial_results(images, device, backbone):
    train, test = images
    pipe = make_pipeline(Untraceable() if backbone == "untraceable" else "resnet18", device)
    pipe.fit(train)
    assert (pipe[0].backbone_.stages is not None) == (backbone == "resnet18")
    buffer = io.BytesIO()
    joblib.dump(pipe, buffer)
    serial, concurrent = (joblib.load(io.BytesIO(buffer.getvalue())) for _ in range(2))
    expected = {
        "scores": serial.decision_function(test),
        "maps": serial.score_samples(test[:2]),
    }
    # The concurrent copy is fresh: its factorisation runs lazily, at the first calls.
    # rtol as in test_threads.py: the backend may round a convolution otherwise when
    # threads share the cores.
    for kind, result in _score_concurrently(concurrent, test):
        np.testing.assert_allclose(result, expected[kind], rtol=1e-5)


def test_hook_fallback_returns_each_layer_and_prunes_the_rest():
    model = Untraceable().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        a = model.a(x)
        b = model.b(torch.relu(a))
        truncated = TruncatedBackbone(model, ("a", "b"), torch.zeros(1, 3, 32, 32))
        outputs = truncated(x)
        copy = pickle.loads(pickle.dumps(truncated))
        copied = copy(x)
    assert truncated.stages is None and isinstance(truncated.model.c, nn.Identity)
    for output, expected in zip([*outputs, *copied], [a, b, a, b], strict=True):
        torch.testing.assert_close(output, expected)


@pytest.mark.parametrize(
    ("features", "error", "message"),
    [
        (np.zeros((6, 64, 64, 3), np.uint8), TypeError, "floating point.*PatchFeatureTransformer"),
        (np.zeros((6, 8, 8, 20), bool), TypeError, "floating point.*PatchFeatureTransformer"),
        (np.zeros((6, 64, 64, 3), np.float32), ValueError, "look like images"),
        (np.zeros((6, 64, 48, 1), np.float32), ValueError, "PatchFeatureTransformer before"),
        (torch.zeros(6, 8, 4, 4, dtype=torch.int64), TypeError, "floating point"),
    ],
)
def test_detector_refuses_images_and_integer_input(features, error, message):
    with pytest.raises(error, match=message):
        PadimDetector().fit(features)


def test_read_only_arrays_give_no_warning(fitted):
    image = Image.fromarray(np.full((64, 64, 3), 100, np.uint8))
    read_only = np.asarray(image)[None]
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = fitted[0].transform(read_only)
    np.testing.assert_array_equal(features, fitted[0].transform(read_only.copy()))


def test_a_folder_is_read_as_its_sorted_image_files(fitted, images, tmp_path):
    for i, image in enumerate(images[1][:3]):
        Image.fromarray(image).save(tmp_path / f"{2 - i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(
        fitted.decision_function(tmp_path), fitted.decision_function(list_images(tmp_path))
    )
    np.testing.assert_array_equal(
        fitted.decision_function(str(tmp_path)), fitted.decision_function(images[1][2::-1])
    )


def _private_uses(path: Path) -> list[str]:
    """``obj._name`` on anything but ``self``/``cls``, and private names imported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom):
            found += [
                f"{path.name}:{node.lineno} import {alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    return found


@pytest.mark.parametrize(
    "path",
    [
        *(ROOT / "sk_padim" / name for name in ("streaming.py", "dask.py", "persistence.py")),
        *(ROOT / "sk_padim" / name for name in ("cli.py", "cli_parser.py", "evaluation.py")),
        ROOT / "sk_padim" / "demo.py",
        *(ROOT / "sk_padim" / name for name in ("plotting.py", "heatmaps.py")),
        *(ROOT / "sk_padim" / name for name in ("export.py", "score_run.py")),
        *sorted((ROOT / "benchmarks").glob("*.py")),
    ],
    ids=lambda path: path.name,
)
def test_modules_use_only_public_names_of_other_modules(path):
    if not path.exists():
        pytest.skip(f"{path.name} is not in this checkout")
    assert _private_uses(path) == []
