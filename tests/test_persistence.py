"""Persistence safety: the pickle-free .npz export, clear errors for truncated or
corrupted model files, version warnings, and fits that keep their last consistent state
when interrupted."""

from __future__ import annotations

import json
import pickle

import joblib
import numpy as np
import pytest
import torch
from hang_guard import time_limit
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from synthetic import textures_with_squares
from torch import nn

import sk_padim
from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming
from sk_padim import fitting as fitting_module
from sk_padim.core.statistics import PatchStatistics
from sk_padim.persistence import load_model, load_npz, save_model, save_npz
from sk_padim.versioning import VersionMismatchWarning


@pytest.fixture(scope="module")
def data():
    train, _, _ = textures_with_squares(8, 0, size=32, seed=1)
    test, _, _ = textures_with_squares(2, 2, size=32, seed=2)
    return train, test


def make_pipeline(weights, **detector_params):
    feat = PatchFeatureTransformer(
        weights=weights, image_size=32, n_features=12, random_state=0, device="cpu"
    )
    return Pipeline([("feat", feat), ("padim", PadimDetector(device="cpu", **detector_params))])


@pytest.fixture(scope="module")
def fitted(data, resnet18_weights):
    return make_pipeline(resnet18_weights, map_size=(24, 20)).fit(data[0])


def test_pickling_leaves_the_fitted_models_as_they_were(fitted, data):
    # joblib.dump, Dask and multiprocessing pickle live models: the copies drop the
    # built modules and Gaussians, the originals keep them (scoring needs no rebuild).
    fitted.decision_function(data[1])
    before = [dict(vars(step)) for _, step in fitted.steps]
    copy = pickle.loads(pickle.dumps(fitted))
    for (_, step), state in zip(fitted.steps, before, strict=True):
        assert vars(step).keys() == state.keys()
        assert all(vars(step)[name] is value for name, value in state.items())
    assert "_fitted_gaussians" in vars(fitted[-1])
    expected = fitted.decision_function(data[1])
    np.testing.assert_array_equal(copy.decision_function(data[1]), expected)


# ---------------------------------------------------------------------- npz export


def test_pipeline_round_trips_through_npz_bit_for_bit(fitted, data, tmp_path):
    _, test = data
    save_npz(fitted, tmp_path / "model.npz")
    loaded = load_npz(tmp_path / "model.npz")
    assert isinstance(loaded, Pipeline) and [n for n, _ in loaded.steps] == ["feat", "padim"]
    assert loaded.get_params(deep=True).keys() == fitted.get_params(deep=True).keys()
    for name in ("feat", "padim"):
        assert loaded.named_steps[name].get_params() == fitted.named_steps[name].get_params()
    detector, original = loaded.named_steps["padim"], fitted.named_steps["padim"]
    for name in ("n_samples_seen_", "n_features_in_", "feature_shape_", "threshold_"):
        assert getattr(detector, name) == getattr(original, name)
    (arrays, _), (expected, _) = detector.fitted_state(), original.fitted_state()
    for name in ("mean", "scatter"):
        assert arrays[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(arrays[name], expected[name])
    np.testing.assert_array_equal(
        loaded.named_steps["feat"].channel_indices_, fitted.named_steps["feat"].channel_indices_
    )
    np.testing.assert_array_equal(loaded.score_samples(test), fitted.score_samples(test))
    np.testing.assert_array_equal(loaded.decision_function(test), fitted.decision_function(test))
    np.testing.assert_array_equal(loaded.predict(test), fitted.predict(test))


def write_old_format(path, detector):
    """The layout of the development format 1: attribute-named arrays, format_version 1."""
    metadata = {
        "format": "sk-padim-npz",
        "format_version": 1,
        "versions": {"sk_padim": sk_padim.__version__, "torch": torch.__version__},
        "kind": "PadimDetector",
        "steps": [{"name": None, "class": "PadimDetector", "params": {}, "fitted": {}}],
    }
    arrays = detector.fitted_state()[0]
    np.savez(
        path,
        metadata=np.array(json.dumps(metadata)),
        **{"step0.mean_": arrays["mean"], "step0.packed_covariance_": arrays["scatter"]},
    )


def test_files_of_an_earlier_development_format_say_to_refit(small_detector, tmp_path):
    write_old_format(tmp_path / "old.npz", small_detector)
    with pytest.raises(ValueError, match=r"earlier development version.*refit it.*old\.npz"):
        load_npz(tmp_path / "old.npz")
    # A joblib file of the format 1 detector: fitted attributes, no state format.
    state = {"reg": 0.01, "mean_": np.zeros((4, 2)), "n_samples_seen_": 3}
    legacy = PadimDetector.__new__(PadimDetector)
    with pytest.raises(ValueError, match=r"earlier development version.*refit it") as info:
        legacy.__setstate__(state)
    assert "\n" not in str(info.value)
    joblib.dump(small_detector, tmp_path / "new.joblib")
    with open(tmp_path / "new.joblib", "rb") as file:
        data = file.read().replace(b"_state_format", b"_other_format")
    (tmp_path / "old.joblib").write_bytes(data)
    with pytest.raises(ValueError, match=r"earlier development version.*old\.joblib"):
        load_model(tmp_path / "old.joblib")
    # A pickle of the format 2 layout names modules that moved into sk_padim.core.
    (tmp_path / "flat.joblib").write_bytes(b"csk_padim.statistics\nPatchStatistics\n.")
    with pytest.raises(ValueError, match=r"earlier development version.*refit it") as info:
        load_model(tmp_path / "flat.joblib")
    assert "flat.joblib" in str(info.value) and "\n" not in str(info.value)


def test_the_archive_holds_only_plain_arrays_and_json(fitted, tmp_path):
    save_npz(fitted, tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz", allow_pickle=False) as archive:
        for key in archive.files:
            assert archive[key].dtype != object, key
        metadata = json.loads(str(archive["metadata"]))
    assert metadata["format"] == "sk-padim-npz" and metadata["kind"] == "Pipeline"
    assert metadata["versions"] == {"sk_padim": sk_padim.__version__, "torch": torch.__version__}
    feat, padim = metadata["steps"]
    assert feat["params"]["layers"] is None and feat["params"]["image_size"] == 32
    assert padim["fitted"]["n_samples_seen_"] == 8 and padim["params"]["map_size"] == [24, 20]


def test_random_weights_are_stored_so_the_model_reloads_exactly(data, tmp_path):
    """weights=None draws the backbone at random: the export keeps the drawn weights."""
    train, test = data
    pipe = make_pipeline(None).fit(train)
    save_npz(pipe, tmp_path / "random.npz")
    torch.manual_seed(123)  # a reload must not depend on torch's generator
    np.testing.assert_array_equal(
        load_npz(tmp_path / "random.npz").decision_function(test), pipe.decision_function(test)
    )


@pytest.mark.parametrize(
    "params", [{"covariance_dtype": "float16"}, {"threshold": 2.5, "sigma": 0.0, "reg": 0.5}]
)
def test_detector_alone_round_trips(params, tmp_path):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(9, 6, 3, 5)).astype(np.float32)
    detector = PadimDetector(**params).fit(train)
    save_npz(detector, tmp_path / "detector.npz")
    loaded = load_npz(tmp_path / "detector.npz")
    assert type(loaded) is PadimDetector and loaded.get_params() == detector.get_params()
    np.testing.assert_array_equal(loaded.score_samples(train), detector.score_samples(train))


def test_partially_fitted_detector_without_threshold_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    detector = PadimDetector().partial_fit(rng.normal(size=(4, 3, 2, 2)))
    save_npz(detector, tmp_path / "partial.npz")
    loaded = load_npz(tmp_path / "partial.npz")
    assert not hasattr(loaded, "threshold_")
    more = rng.normal(size=(5, 3, 2, 2))
    np.testing.assert_array_equal(
        loaded.partial_fit(more).decision_function(more),
        detector.partial_fit(more).decision_function(more),
    )


def test_transformer_alone_round_trips(fitted, data, tmp_path):
    feat = fitted.named_steps["feat"]
    save_npz(feat, tmp_path / "feat.npz")
    loaded = load_npz(tmp_path / "feat.npz")
    assert type(loaded) is PatchFeatureTransformer
    np.testing.assert_array_equal(loaded.transform(data[1]), feat.transform(data[1]))


def test_npz_model_loads_offline_without_its_weights_file(data, resnet18_weights, tmp_path):
    """The export carries the backbone's weights: no download, no weights file needed."""
    import shutil

    import torchvision

    train, test = data
    weights = tmp_path / "weights.pth"
    shutil.copy(resnet18_weights, weights)
    pipe = make_pipeline(str(weights)).fit(train)
    save_npz(pipe, tmp_path / "model.npz")
    weights.unlink()

    def offline(*args, **kwargs):
        raise AssertionError("load_npz tried to download weights")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
        loaded = load_npz(tmp_path / "model.npz")
    assert loaded.named_steps["feat"].weights == str(weights)  # the parameter, for a refit
    np.testing.assert_array_equal(loaded.score_samples(test), pipe.score_samples(test))


def test_saving_is_atomic_and_keeps_the_exact_name(small_detector, tmp_path, monkeypatch):
    path = tmp_path / "model.v1"
    save_npz(small_detector, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.v1"]
    saved = path.read_bytes()

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_npz(small_detector, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.v1"]  # no temporary left
    assert path.read_bytes() == saved  # the previous model is intact
    np.testing.assert_array_equal(load_npz(path).statistics_.mean, small_detector.statistics_.mean)


def test_user_module_backbone_cannot_be_exported_and_says_what_to_do(tmp_path):
    feat = PatchFeatureTransformer(
        backbone=nn.Sequential(nn.Conv2d(3, 4, 3)), layers=("0",), n_features=2, image_size=8
    ).fit()
    with pytest.raises(TypeError, match=r"nn\.Module.*Python code.*Export the detector alone"):
        save_npz(feat, tmp_path / "module.npz")
    assert not (tmp_path / "module.npz").exists()


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (PadimDetector(), NotFittedError, "not fitted"),
        ("a string", TypeError, "got str.*save_model"),
        (Pipeline([("scale", "passthrough")]), TypeError, "step 'scale'"),
    ],
)
def test_what_cannot_be_exported_is_a_clear_error(model, error, match, tmp_path):
    with pytest.raises(error, match=match):
        save_npz(model, tmp_path / "x.npz")


def test_npz_from_another_minor_version_warns(tmp_path):
    detector = PadimDetector().fit(np.random.default_rng(0).normal(size=(3, 2, 2, 2)))
    path = tmp_path / "old.npz"
    save_npz(detector, path)
    with np.load(path) as archive:
        arrays = dict(archive)
    metadata = json.loads(str(arrays["metadata"]))
    metadata["versions"]["torch"] = "1.13.1"
    np.savez(path, **{**arrays, "metadata": np.array(json.dumps(metadata))})
    with pytest.warns(VersionMismatchWarning, match=r"old\.npz.*torch 1\.13\.1.*Refit it"):
        load_npz(path)


# -------------------------------------------------------- broken files: npz and joblib


def cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def flip(path, fraction):
    data = bytearray(path.read_bytes())
    position = int(len(data) * fraction)
    data[position : position + 8] = bytes(b ^ 0xFF for b in data[position : position + 8])
    path.write_bytes(bytes(data))


def write_npy(path):
    with open(path, "wb") as file:
        np.save(file, np.zeros(3))


@pytest.fixture(scope="module")
def small_detector():
    return PadimDetector().fit(np.random.default_rng(0).normal(size=(6, 8, 3, 3)))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: cut(p, 0.0), "not an sk-padim export"),
        (lambda p: cut(p, 0.5), "not an sk-padim export|truncated, corrupted"),
        (lambda p: cut(p, 0.99), "truncated, corrupted"),
        (lambda p: flip(p, 0.3), "truncated, corrupted"),  # array data: zip's CRC-32
        (lambda p: flip(p, 0.95), "truncated, corrupted|inconsistent"),  # zip directory
        (lambda p: p.write_bytes(b"\x93NUMPY junk"), "not an sk-padim export"),
        (write_npy, "not an sk-padim export"),
        (lambda p: np.savez(p, x=np.zeros(2)), r"no 'metadata' entry"),
    ],
    ids=["empty", "half", "last byte", "flipped data", "flipped end", "junk", ".npy", "foreign"],
)
def test_broken_npz_files_are_clear_errors_naming_the_file(small_detector, tmp_path, damage, match):
    path = tmp_path / "broken.npz"
    save_npz(small_detector, path)
    damage(path)
    with time_limit(30), pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert "broken.npz" in str(info.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m, a: m.update(format_version=99), "format_version 99.*upgrade sk-padim"),
        (lambda m, a: m["steps"][0]["fitted"].update(feature_shape_=[8, 3, 4]), "do not fit"),
        (lambda m, a: m["steps"][0].update({"class": "os.system"}), "unknown class"),
        (lambda m, a: a.update({"step0.mean": a["step0.mean"] * np.nan}), "non-finite"),
        (
            lambda m, a: a.update({"step0.scatter": a["step0.scatter"][:, :3]}),
            "does not fit",
        ),
    ],
    ids=["newer format", "shape", "class", "NaN statistics", "covariance"],
)
def test_inconsistent_npz_files_are_clear_errors(small_detector, tmp_path, edit, match):
    path = tmp_path / "edited.npz"
    save_npz(small_detector, path)
    with np.load(path) as archive:
        arrays = dict(archive)
    metadata = json.loads(str(arrays["metadata"]))
    edit(metadata, arrays)
    np.savez(path, **{**arrays, "metadata": np.array(json.dumps(metadata))})
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert "edited.npz" in str(info.value)


def test_missing_model_files_are_file_not_found(tmp_path):
    for load in (load_npz, load_model):
        with pytest.raises(FileNotFoundError, match="nothing.here"):
            load(tmp_path / "nothing.here")


@pytest.mark.parametrize(
    ("compress", "fraction"),
    [(0, 0.0), (0, 0.1), (0, 0.5), (0, 0.9), (0, 0.999), (3, 0.1), (3, 0.5), (3, 0.9)],
)
def test_truncated_joblib_files_raise_promptly(small_detector, tmp_path, compress, fraction):
    """Plain joblib.load raises (EOFError, ValueError, ...) rather than hanging or
    crashing; load_model turns it into one clear error naming the file. (A compressed
    file cut in its last bytes, the zlib trailer, may still load: the data was whole.)"""
    path = tmp_path / "model.joblib"
    joblib.dump(small_detector, path, compress=compress)
    cut(path, fraction)
    with time_limit(30), pytest.raises(Exception):  # noqa: B017 (joblib's own types vary)
        joblib.load(path)
    with time_limit(30), pytest.raises(ValueError, match=r"model\.joblib.*truncated, corrupted"):
        load_model(path)


def test_save_model_checksum_catches_corruption_that_joblib_would_load(fitted, data, tmp_path):
    """Corrupting bytes inside an array is invisible to joblib (it loads a model that
    scores differently); the SHA-256 file written by save_model catches it."""
    path = tmp_path / "model.joblib"
    assert save_model(fitted, path) == [str(path), str(path) + ".sha256"]
    np.testing.assert_array_equal(
        load_model(path).decision_function(data[1]), fitted.decision_function(data[1])
    )
    flip(path, 0.5)
    with pytest.raises(ValueError, match=r"does not match its checksum.*truncated or corrupted"):
        load_model(path)


def test_load_model_without_checksum_file(small_detector, tmp_path):
    path = tmp_path / "plain.joblib"
    joblib.dump(small_detector, path)
    assert isinstance(load_model(path), PadimDetector)
    with pytest.raises(FileNotFoundError, match=r"plain\.joblib\.sha256.*verify=False"):
        load_model(path, verify=True)


def test_load_model_refuses_a_file_that_is_not_joblib(tmp_path):
    path = tmp_path / "image.joblib"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a pickle")
    with pytest.raises(ValueError, match=r"image\.joblib.*not a joblib file"):
        load_model(path)


# ------------------------------------------------ interrupted fits keep the last state


def snapshot(detector):
    arrays = detector.fitted_state()[0]
    return (
        detector.n_samples_seen_,
        arrays["mean"].copy(),
        arrays["scatter"].copy(),
        getattr(detector, "threshold_", None),
    )


def assert_same(detector, before):
    after = snapshot(detector)
    assert after[0] == before[0] and after[3] == before[3]
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[2], before[2])


def interrupt_on_call(monkeypatch, target, name, call_number):
    """Make ``target.name`` raise KeyboardInterrupt on its ``call_number``-th call."""
    original = getattr(target, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call_number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_partial_fit_interrupted_between_batches_keeps_the_last_state(monkeypatch):
    rng = np.random.default_rng(0)
    detector = PadimDetector(batch_size=2).partial_fit(rng.normal(size=(5, 3, 2, 2)))
    before = snapshot(detector)
    probe = rng.normal(size=(2, 3, 2, 2))
    scores = detector.decision_function(probe)
    interrupt_on_call(monkeypatch, PatchStatistics, "update", 2)  # between batches 1, 2
    with pytest.raises(KeyboardInterrupt):
        detector.partial_fit(rng.normal(size=(6, 3, 2, 2)))
    monkeypatch.undo()
    assert_same(detector, before)
    np.testing.assert_array_equal(detector.decision_function(probe), scores)


def test_fit_streaming_interrupted_between_chunks_keeps_the_last_state(
    data, resnet18_weights, monkeypatch
):
    """Ctrl-C in the middle of a long fit_streaming: the detector keeps the model it had,
    and the pipeline scores as before (the transformer, with random_state and weights
    fixed, is refitted to the same state)."""
    train, test = data
    pipe = make_pipeline(resnet18_weights).fit(train)
    before, scores = snapshot(pipe.named_steps["padim"]), pipe.decision_function(test)
    interrupt_on_call(monkeypatch, PatchFeatureTransformer, "transform", 3)  # third chunk
    with pytest.raises(KeyboardInterrupt):
        fit_streaming(pipe, train, chunk_size=2)
    monkeypatch.undo()
    assert_same(pipe.named_steps["padim"], before)
    np.testing.assert_array_equal(pipe.decision_function(test), scores)


def test_fit_interrupted_while_setting_the_threshold_keeps_the_last_state(monkeypatch):
    rng = np.random.default_rng(0)
    detector = PadimDetector().fit(rng.normal(size=(5, 3, 2, 2)))
    before = snapshot(detector)
    interrupt_on_call(monkeypatch, fitting_module, "held_out_distances", 1)
    with pytest.raises(KeyboardInterrupt):
        detector.fit(rng.normal(size=(7, 3, 2, 2)))
    monkeypatch.undo()
    assert_same(detector, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_npz_of_a_gpu_fitted_pipeline_loads_and_scores_on_the_cpu(data, resnet18_weights, tmp_path):
    train, test = data
    pipe = make_pipeline(resnet18_weights).set_params(feat__device="cuda", padim__device="cuda")
    pipe.fit(train)
    save_npz(pipe, tmp_path / "gpu.npz")
    loaded = load_npz(tmp_path / "gpu.npz").set_params(feat__device="cpu", padim__device="cpu")
    # CUDA convolutions may use TF32: maps agree with the CPU's to about 1e-3.
    np.testing.assert_allclose(
        loaded.score_samples(test), pipe.score_samples(test), rtol=5e-3, atol=5e-3
    )
