"""The semi-orthogonal embedding (Kim et al. 2021) against a NumPy re-derivation."""

import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares

from sk_padim import PadimDetector, PatchFeatureTransformer, export_onnx, load_npz, save_npz


def make_feat(**params):
    base = {"weights": None, "image_size": 64, "n_features": 30, "random_state": 0}
    return PatchFeatureTransformer(projection="semi_orthogonal", **{**base, **params})


@pytest.fixture(scope="module")
def images():
    return textures_with_squares(4, 2, 64, seed=0)[0]


def test_features_equal_projecting_the_upsampled_concatenation(images):
    feat = make_feat().fit()
    embedding = feat.to_module("cpu")
    with torch.inference_mode():
        pixels = embedding.normalise(torch.from_numpy(images).permute(0, 3, 1, 2))
        layers = [layer.numpy() for layer in embedding.backbone(pixels)]
    h, w = layers[0].shape[2:]
    upsampled = [
        layer.repeat(h // layer.shape[2], axis=2).repeat(w // layer.shape[3], axis=3)
        for layer in layers
    ]
    concatenation = np.concatenate(upsampled, axis=1).astype(np.float64)
    expected = np.einsum("nfhw,fd->ndhw", concatenation, feat.projection_.astype(np.float64))
    features = feat.transform(images)
    assert features.shape == (len(images), 30, h, w)
    np.testing.assert_allclose(features, expected, atol=1e-4 * np.ptp(expected))
    assert not hasattr(feat, "channel_indices_")


def test_projection_has_orthonormal_columns():
    feat = make_feat(n_features=100).fit()
    assert feat.projection_.shape == (64 + 128 + 256, 100)
    gram = feat.projection_.T.astype(np.float64) @ feat.projection_
    np.testing.assert_allclose(gram, np.eye(100), atol=1e-5)


def test_same_random_state_gives_the_same_matrix_in_a_fresh_process(tmp_path):
    script = (
        "import sys, numpy as np\n"
        "from sk_padim import PatchFeatureTransformer\n"
        "feat = PatchFeatureTransformer(weights=None, image_size=64, n_features=30, "
        "random_state=0, projection='semi_orthogonal').fit()\n"
        "np.save(sys.argv[1], feat.projection_)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.npy")], check=True)
    here = make_feat().fit().projection_
    np.testing.assert_array_equal(np.load(tmp_path / "w.npy"), here)
    assert not np.array_equal(make_feat(random_state=1).fit().projection_, here)


def test_refit_with_the_other_projection_drops_the_first_ones_attribute():
    feat = make_feat().fit()
    feat.set_params(projection="channels").fit()
    assert hasattr(feat, "channel_indices_") and not hasattr(feat, "projection_")
    assert clone(feat).get_params()["projection"] == "channels"


def test_pipeline_persists_and_exports(images, tmp_path):
    pipe = Pipeline([("feat", make_feat()), ("padim", PadimDetector())]).fit(images)
    scores = pipe.decision_function(images)
    save_npz(pipe, tmp_path / "model.npz")
    np.testing.assert_array_equal(
        load_npz(tmp_path / "model.npz").decision_function(images), scores
    )
    path = export_onnx(pipe, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["score"], {"images": images})[0], scores, rtol=1e-4)
