"""ONNX export: onnxruntime scores like the Python pipeline."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from synthetic import assert_labels_like, textures_with_squares
from torch import nn

import sk_padim
from sk_padim import (
    F1ThresholdCalibrator,
    PadimDetector,
    PatchFeatureTransformer,
    QuantileThresholdCalibrator,
    export_onnx,
)
from sk_padim import export as export_module
from sk_padim.cli import main
from sk_padim.pipelines import padim_model


def make_pipeline(image_size, n_features=100, backbone="resnet18", **feat_params):
    feat = PatchFeatureTransformer(
        backbone=backbone,
        weights=None,
        image_size=image_size,
        n_features=n_features,
        random_state=0,
        **feat_params,
    )
    return Pipeline([("feat", feat), ("padim", PadimDetector())])


def images_at(size, n_normal=6, n_anomalous=4, seed=0):
    height, width = (size, size) if isinstance(size, int) else size
    images, labels, _ = textures_with_squares(n_normal, n_anomalous, max(height, width), seed)
    return np.ascontiguousarray(images[:, :height, :width]), labels


def run(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def assert_scores_like(pipe, outputs, images, rtol=1e-4):
    maps, scores = pipe.score_samples(images), pipe.decision_function(images)
    np.testing.assert_allclose(outputs[0], maps, atol=rtol * np.ptp(maps))
    np.testing.assert_allclose(outputs[1], scores, rtol=rtol)
    assert_labels_like(outputs[2], scores, pipe[-1].threshold_, pipe.predict(images), rtol)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    train, _ = images_at(224, n_normal=8, n_anomalous=0)
    test, labels = images_at(224, seed=1)
    pipe = make_pipeline(224).fit(train)
    folder = tmp_path_factory.mktemp("export")
    paths = {f16: export_onnx(pipe, folder / f"r18-{f16}.onnx", float16=f16) for f16 in (0, 1)}
    return pipe, test, labels, paths


def test_resnet18_at_224_scores_like_the_pipeline_for_batches_of_1_and_7(r18):
    pipe, test, _, paths = r18
    assert_scores_like(pipe, run(paths[0], test[:7]), test[:7])
    assert_scores_like(pipe, run(paths[0], test[:1]), test[:1])


def test_the_threshold_is_an_input_whose_default_is_the_models(r18):
    pipe, test, _, paths = r18
    session = onnxruntime.InferenceSession(str(paths[0]), providers=["CPUExecutionProvider"])
    graph = onnx.load(str(paths[0]))
    (default,) = [t for t in graph.graph.initializer if t.name == "threshold"]
    assert float(numpy_helper.to_array(default)) == np.float32(pipe[-1].threshold_)
    assert [i.name for i in graph.graph.input] == ["images", "threshold"]
    # onnxruntime lists it as an input with a default: an overridable initializer.
    assert [i.name for i in session.get_overridable_initializers()] == ["threshold"]
    scores = pipe.decision_function(test)
    omitted = session.run(None, {"images": test})[2]  # the model's threshold
    assert_labels_like(omitted, scores, pipe[-1].threshold_, pipe.predict(test))
    for threshold in np.quantile(scores, [0.2, 0.5, 0.9]).astype(np.float32):
        feed = {"images": test, "threshold": np.array(threshold)}  # a 0-d float32 array
        flags = session.run(["is_anomalous"], feed)[0]
        assert_labels_like(flags, scores, threshold, np.where(scores >= threshold, -1, 1))


def test_float16_keeps_the_auroc_and_the_size_targets(r18):
    pipe, test, labels, paths = r18
    half = run(paths[1], test)
    expected = roc_auc_score(labels, pipe.decision_function(test))
    assert abs(roc_auc_score(labels, half[1]) - expected) <= 0.002
    # Against the same model holding a full float32 inverse covariance per position.
    detector = pipe[-1]
    n_positions, d = detector.statistics_.n_positions, detector.statistics_.n_features
    packed_bytes = n_positions * d * (d + 1) // 2 * 4
    full_inverse_model = paths[0].stat().st_size - packed_bytes + n_positions * d * d * 4
    assert paths[0].stat().st_size <= 0.55 * full_inverse_model
    assert paths[1].stat().st_size <= 0.3 * full_inverse_model


def test_metadata_describes_the_model(r18):
    pipe, _, _, paths = r18
    metadata = {p.key: p.value for p in onnx.load(str(paths[0])).metadata_props}
    assert metadata["image_size"] == "224,224" and metadata["map_size"] == "224,224"
    assert float(metadata["threshold"]) == pipe[-1].threshold_
    assert metadata["backbone"] == "resnet18" and metadata["n_features"] == "100"
    assert metadata["layers"] == "layer1,layer2,layer3"
    assert metadata["sk_padim_version"] == sk_padim.__version__
    mean = [float(v) for v in metadata["normalization_mean"].split(",")]
    assert mean == list(pipe[0].normalization_[0])


def test_non_square_image_size(tmp_path):
    train, _ = images_at((160, 224), n_normal=5, n_anomalous=0)
    test, _ = images_at((160, 224), seed=1)
    pipe = make_pipeline((160, 224), n_features=40).fit(train)
    path = export_onnx(pipe, tmp_path / "wide.onnx")
    assert_scores_like(pipe, run(path, test), test)


def test_a_native_size_tiled_texture_model_exports(tmp_path):
    # image_size=None, the backbone in tiles and texture mode: the traced graph unrolls
    # the backbone's tiles and the texture tiles, and scores as the pipeline does.
    train, _ = images_at((160, 224), n_normal=5, n_anomalous=0)
    test, _ = images_at((160, 224), seed=1)
    pipe = make_pipeline(None, n_features=40, tile_size=64)
    pipe.set_params(padim__texture_tile=(12, 16)).fit(train)
    assert pipe[0].tile_plan_ is not None and pipe[0].image_size_ == (160, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export itself prints nothing
        path = export_onnx(pipe, tmp_path / "texture.onnx")
    assert_scores_like(pipe, run(path, test), test)


def test_efficientnet_lite0(tmp_path):
    train, _ = images_at(128, n_normal=5, n_anomalous=0)
    test, _ = images_at(128, seed=1)
    pipe = make_pipeline(128, n_features=50, backbone="efficientnet_lite0").fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the export itself prints nothing
        path = export_onnx(pipe, tmp_path / "lite.onnx")
    assert_scores_like(pipe, run(path, test), test)


def test_a_float16_model_scores_in_onnx_as_in_python(tmp_path):
    # Export and Python score through the same PatchGaussians, rounded factors included.
    train, _ = images_at(64, n_normal=6, n_anomalous=0)
    test, _ = images_at(64, seed=1)
    pipe = make_pipeline(64, n_features=20).fit(train)
    pipe.set_params(padim=PadimDetector(covariance_dtype="float16")).fit(train)
    path = export_onnx(pipe, tmp_path / "half.onnx")
    model = onnx.load(str(path))
    assert {entry.key: entry.value for entry in model.metadata_props}["storage"] == "float16"
    assert_scores_like(pipe, run(path, test), test, rtol=1e-3)


def test_calibrated_threshold_and_torch_core_are_exported(tmp_path):
    train, _ = images_at(64, n_normal=6, n_anomalous=0)
    test, labels = images_at(64, seed=1)
    pipe = make_pipeline(64, n_features=20).fit(train)
    calibrator = F1ThresholdCalibrator(pipe).fit(test, labels)
    anomalous = run(export_onnx(calibrator, tmp_path / "calibrated.onnx"), test)[2]
    scores = pipe.decision_function(test)
    assert_labels_like(anomalous, scores, calibrator.threshold_, calibrator.predict(test))
    good = QuantileThresholdCalibrator(pipe, quantile=0.99).fit(train)
    path = export_onnx(good, tmp_path / "quantile.onnx")
    metadata = {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}
    assert float(metadata["pixel_threshold"]) == pytest.approx(good.pixel_threshold_)
    assert float(metadata["threshold"]) == pytest.approx(pipe[-1].threshold_)
    outputs = run(export_onnx(padim_model(pipe), tmp_path / "core.onnx"), test)
    assert len(outputs) == 2  # no threshold, no verdict
    np.testing.assert_allclose(outputs[1], pipe.decision_function(test), rtol=1e-4)


@pytest.fixture(scope="module")
def wide():
    """A non-square model (64 x 96 px) and test images."""
    train, _ = images_at((64, 96), n_normal=6, n_anomalous=0)
    test, _ = images_at((64, 96), seed=1)
    return make_pipeline((64, 96), n_features=20).fit(train), test


def test_models_past_the_size_limit_use_external_data(wide, tmp_path, monkeypatch):
    pipe, test = wide
    whole = {f16: export_onnx(pipe, tmp_path / f"whole-{f16}.onnx", float16=f16) for f16 in (0, 1)}
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 2**20)
    for f16 in (0, 1):
        path = export_onnx(pipe, tmp_path / f"big-{f16}.onnx", float16=f16)
        data = tmp_path / f"big-{f16}.onnx.data"
        assert data.stat().st_size > 4 * path.stat().st_size
        model = onnx.load(str(path), load_external_data=False)
        offsets = [
            int(entry.value)
            for tensor in model.graph.initializer
            for entry in tensor.external_data
            if entry.key == "offset"
        ]
        assert offsets and all(offset % 4096 == 0 for offset in offsets)  # mappable
        # The same graph and values as the single-file export, bit for bit.
        for got, expected in zip(run(path, test), run(whole[f16], test), strict=True):
            np.testing.assert_array_equal(got, expected)
    assert_scores_like(pipe, run(tmp_path / "big-0.onnx", test), test)
    metadata = {
        p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
    }
    assert metadata["image_size"] == "64,96" and metadata["map_size"] == "64,96"
    (tmp_path / "big-0.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(Exception, match=r"does not exist.*big-0\.onnx\.data"):
        onnxruntime.InferenceSession(str(tmp_path / "big-0.onnx"))


def test_weights_torch_writes_as_external_files_are_copied_block_by_block(
    wide, tmp_path, monkeypatch
):
    """Past 2 GiB torch writes each weight to its own file; the export reads them through
    memory maps, a block at a time (the copy is cut small here), into one .data file."""
    pipe, test = wide
    reference = tmp_path / "reference"
    reference.mkdir()
    half = run(export_onnx(pipe, reference / "half.onnx", float16=True), test)
    original = export_module._torch_export

    def as_torch_writes_large_models(module, example, path, outputs, opset):
        original(module, example, path, outputs, opset)
        onnx.save_model(
            onnx.load(str(path)), str(path), save_as_external_data=True,
            all_tensors_to_one_file=False, size_threshold=1024,
        )  # fmt: skip

    monkeypatch.setattr(export_module, "_torch_export", as_torch_writes_large_models)
    monkeypatch.setattr(export_module, "_COPY_BYTES", 1000)
    folder = tmp_path / "out"
    folder.mkdir()
    whole = export_onnx(pipe, folder / "whole.onnx")
    assert [p.name for p in folder.iterdir()] == ["whole.onnx"]  # self-contained
    assert_scores_like(pipe, run(whole, test), test)
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 2**20)
    path = export_onnx(pipe, folder / "big.onnx", float16=True)
    assert sorted(p.name for p in folder.iterdir()) == ["big.onnx", "big.onnx.data", "whole.onnx"]
    for got, expected in zip(run(path, test), half, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_the_file_runs_in_a_process_without_torch(r18, tmp_path):
    pipe, test, _, paths = r18
    np.save(tmp_path / "x.npy", test[:3])
    script = (
        "import sys, json, numpy as np, onnxruntime\n"
        "session = onnxruntime.InferenceSession(sys.argv[1])\n"
        "scores = session.run(['score'], {'images': np.load(sys.argv[2])})[0]\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(scores.tolist()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(paths[0]), str(tmp_path / "x.npy")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    np.testing.assert_allclose(
        json.loads(result.stdout), pipe.decision_function(test[:3]), rtol=1e-4
    )


class NotExportable(nn.Module):
    """A CNN using an operator ONNX has no translation for."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.a(x)
        return self.b(x + torch_special(x))


def torch_special(x):
    import torch

    return torch.special.i0e(x) * 0  # no ONNX symbolic for i0e


def test_bad_exports_are_clear_errors_and_write_nothing(tmp_path):
    with pytest.raises(NotFittedError):
        export_onnx(make_pipeline(64), tmp_path / "unfitted.onnx")
    train, _ = images_at(64, n_normal=4, n_anomalous=0)
    pipe = make_pipeline(64, n_features=20).fit(train)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(pipe, tmp_path / "missing" / "model.onnx")
    custom = Pipeline(
        [
            ("feat", PatchFeatureTransformer(NotExportable(), ("a", "b"), 8, None, 32)),
            ("padim", PadimDetector()),
        ]
    ).fit(train)
    with pytest.raises(ValueError, match="NotExportable.*i0e|i0e.*NotExportable"):
        export_onnx(custom, tmp_path / "custom.onnx")
    with pytest.raises(TypeError, match="PadimModel"):
        export_onnx(pipe[-1], tmp_path / "detector.onnx")
    assert list(tmp_path.iterdir()) == []


def test_command_line_export(tmp_path, capsys):
    import joblib

    train, _ = images_at(64, n_normal=4, n_anomalous=0)
    pipe = make_pipeline(64, n_features=20).fit(train)
    joblib.dump(pipe, tmp_path / "model.joblib")
    assert main(["export", str(tmp_path / "model.joblib"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert_scores_like(pipe, run(tmp_path / "m.onnx", train), train)
    assert main(["export", str(tmp_path / "none.joblib"), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "Model file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module",
    [
        "sk_padim.export",
        "sk_padim.core.model",
        "sk_padim.core.devices",
        "sk_padim.core.mahalanobis",
    ],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(
        sys.modules[module] if module in sys.modules else __import__(module, fromlist=["_"])
    )
    assert result.failed == 0 and result.attempted > 0
