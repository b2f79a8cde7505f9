import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares

import sk_padim
from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming


def make_pipeline(weights, **feat_params):
    params = {"weights": weights, "image_size": 64, "n_features": 40, "random_state": 0}
    return Pipeline(
        [("feat", PatchFeatureTransformer(**{**params, **feat_params})), ("padim", PadimDetector())]
    )


@pytest.fixture(scope="module")
def data():
    train, _, _ = textures_with_squares(30, 0, seed=1)
    test, labels, masks = textures_with_squares(8, 8, seed=2)
    return train, test, labels, masks


@pytest.fixture(scope="module")
def fitted(data, resnet18_weights):
    return make_pipeline(resnet18_weights).fit(data[0])


def test_pipeline_ranks_pasted_squares_above_normal_images(fitted, data):
    _, test, labels, _ = data
    assert roc_auc_score(labels, fitted.decision_function(test)) > 0.9


def test_maps_peak_inside_the_pasted_square(fitted, data):
    _, test, labels, masks = data
    maps = fitted.score_samples(test)
    assert maps.shape == masks.shape
    for anomaly_map, mask in zip(maps[labels == 1], masks[labels == 1], strict=True):
        # The map resolves the stride-4 feature grid: allow one grid cell around the square.
        assert ndimage.binary_dilation(mask, iterations=4).flat[np.argmax(anomaly_map)]
        assert not mask.flat[np.argmin(anomaly_map)]


def test_joblib_round_trip_in_fresh_process_scores_identically(fitted, data, tmp_path):
    _, test, _, _ = data
    model_path, images_path, out_path = (tmp_path / n for n in ("m.joblib", "x.npy", "s.npy"))
    joblib.dump(fitted, model_path)
    np.save(images_path, test)
    script = (
        "import sys, joblib, numpy as np\n"
        "model = joblib.load(sys.argv[1])\n"
        "np.save(sys.argv[3], model.score_samples(np.load(sys.argv[2])))\n"
    )
    empty_home = tmp_path / "torch_home"
    subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(images_path), str(out_path)],
        check=True,
        cwd=tmp_path,
        env={
            "TORCH_HOME": str(empty_home),
            "PATH": "",
            "HOME": str(tmp_path),
            # The sk_padim under test, where it is not the installed one.
            **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ},
        },
        timeout=300,
    )
    # Another process may use another number of threads, which may round otherwise.
    np.testing.assert_allclose(np.load(out_path), fitted.score_samples(test), rtol=1e-5)


def test_pipeline_params_clone_and_set_params(resnet18_weights):
    pipe = make_pipeline(resnet18_weights)
    params = pipe.get_params()
    assert params["feat__n_features"] == 40 and params["padim__reg"] == 0.01
    copy = clone(pipe)
    copy.set_params(feat__n_features=10, padim__sigma=2.0)
    assert copy.get_params()["feat__n_features"] == 10
    assert pipe.get_params()["feat__n_features"] == 40 and pipe.get_params()["padim__sigma"] == 4.0


def test_pipeline_predict_uses_the_detector_threshold(fitted, data):
    train, test, _, _ = data
    assert (fitted.predict(train) == 1).all()
    scores = fitted.decision_function(test)
    threshold = fitted.named_steps["padim"].threshold_
    np.testing.assert_array_equal(fitted.predict(test), np.where(scores >= threshold, -1, 1))


def test_fit_streaming_equals_pipeline_fit(data, resnet18_weights):
    train, test, _, _ = data
    full = make_pipeline(resnet18_weights).fit(train)
    streamed = fit_streaming(make_pipeline(resnet18_weights), list(train), chunk_size=7)
    detector, expected = streamed.named_steps["padim"], full.named_steps["padim"]
    assert detector.n_samples_seen_ == len(train)
    # Chunks change the batch sizes, and with them CUDA's TF32 convolution algorithms.
    tolerance = 5e-3 if torch.cuda.is_available() else 1e-4
    np.testing.assert_allclose(
        streamed.score_samples(test), full.score_samples(test), rtol=tolerance, atol=tolerance
    )
    # The thresholds too: the training images are transformed again and scored.
    assert detector.threshold_ == pytest.approx(expected.threshold_, rel=tolerance)
    assert detector.pixel_threshold_ == pytest.approx(expected.pixel_threshold_, rel=tolerance)


def test_fit_streaming_chunks_default_to_one_backbone_pass(data, resnet18_weights, monkeypatch):
    train = data[0]
    chunks = []
    transform = PatchFeatureTransformer.transform
    monkeypatch.setattr(
        PatchFeatureTransformer,
        "transform",
        lambda self, X: chunks.append(len(X)) or transform(self, X),
    )
    pipe = make_pipeline(resnet18_weights).set_params(feat__batch_size=5)
    fit_streaming(pipe, list(train))
    # Two passes (statistics, thresholds) over chunks of the transformer's batch.
    n_chunks = -(-len(train) // 5)
    assert chunks == 2 * ([5] * (n_chunks - 1) + [len(train) - 5 * (n_chunks - 1)])


def test_fit_streaming_needs_feature_and_detector_steps():
    with pytest.raises(TypeError, match="PatchFeatureTransformer"):
        fit_streaming(Pipeline([("padim", PadimDetector())]), np.zeros((2, 8, 8)))


def test_model_from_another_minor_version_warns_on_load(fitted, tmp_path):
    from sk_padim.versioning import VersionMismatchWarning

    detector = fitted.named_steps["padim"]
    state = detector.__getstate__()
    assert state["_saved_versions"]["sk_padim"] == sk_padim.__version__
    state["_saved_versions"] = {**state["_saved_versions"], "torch": "1.0.0"}
    with pytest.warns(VersionMismatchWarning, match="torch 1.0.0"):
        PadimDetector.__new__(PadimDetector).__setstate__(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_fitted_on_gpu_scores_the_same_on_a_cpu_only_process(
    data, resnet18_weights, tmp_path
):
    train, test, _, _ = data
    pipe = make_pipeline(resnet18_weights, device="cuda")
    pipe.set_params(padim__device="cuda").fit(train)
    gpu_maps = pipe.score_samples(test)
    model_path, images_path, out_path = (tmp_path / n for n in ("m.joblib", "x.npy", "s.npy"))
    joblib.dump(pipe.set_params(feat__device="auto", padim__device="auto"), model_path)
    np.save(images_path, test)
    script = (
        "import sys, joblib, numpy as np, torch\n"
        "assert not torch.cuda.is_available()\n"
        "model = joblib.load(sys.argv[1])\n"
        "np.save(sys.argv[3], model.score_samples(np.load(sys.argv[2])))\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(images_path), str(out_path)],
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    # CUDA convolutions use TF32 by default: maps agree with the CPU's to about 1e-3.
    np.testing.assert_allclose(np.load(out_path), gpu_maps, rtol=5e-3, atol=5e-3)
