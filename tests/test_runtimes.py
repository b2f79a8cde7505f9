"""The backbone's precision and runtime: what each device runs, and the features they give."""

import threading
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from synthetic import smooth_texture

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.core import runtimes
from sk_padim.core.runtimes import AutocastBackbone, backbone_setting, native_reduced_precision

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(
    not runtimes.openvino_available(), reason="needs the openvino extra"
)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.stack([smooth_texture(rng, 64) for _ in range(5)])


def params(**extra):
    return {
        "weights": None,
        "image_size": 64,
        "n_features": 24,
        "random_state": 0,
        "device": "cpu",
        "batch_size": 2,
        **extra,
    }


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's CPU flags")
def test_auto_is_bfloat16_exactly_where_the_cpu_has_bfloat16_instructions():
    native = bool(cpu_flags() & {"avx512_bf16", "amx_tile", "amx_bf16"})
    expected = torch.bfloat16 if native else torch.float32
    assert native_reduced_precision(CPU) == (torch.bfloat16 if native else None)
    assert backbone_setting("auto", "eager", CPU, strict=True).dtype == expected


@pytest.mark.skipif(
    native_reduced_precision(CPU) is not None, reason="this CPU runs bfloat16 natively"
)
def test_emulated_bfloat16_is_fitted_with_a_warning_that_names_auto():
    with pytest.warns(UserWarning, match="emulated.*precision='auto' picks float32"):
        PatchFeatureTransformer(**params(precision="bfloat16")).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchFeatureTransformer(**params(precision="auto")).fit()


def test_float16_off_cuda_is_refused_at_fit_and_falls_back_when_loaded():
    with pytest.raises(ValueError, match="CUDA GPUs only.*'bfloat16' or 'auto'"):
        backbone_setting("float16", "eager", CPU, strict=True)
    setting = backbone_setting("float16", "eager", CPU, strict=False)
    assert setting.dtype == torch.float32 and "CUDA" in setting.fallback
    with pytest.raises(ValueError, match="precision='float16'"):
        PatchFeatureTransformer(**params(precision="float16")).fit()


def test_openvino_off_the_cpu_is_refused_and_falls_back_to_eager():
    cuda = torch.device("cuda", 0)  # only its type is read
    with pytest.raises(ValueError, match="on the CPU.*device='cpu'"):
        backbone_setting("float32", "openvino", cuda, strict=True)
    setting = backbone_setting("float32", "openvino", cuda, strict=False)
    assert setting.runtime == "eager" and "openvino" in setting.fallback


def test_openvino_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(runtimes, "openvino_available", lambda: False)
    with pytest.raises(ImportError, match=r"sk-padim\[openvino\]"):
        PatchFeatureTransformer(**params(runtime="openvino")).fit()


def test_unknown_names_are_parameter_errors():
    with pytest.raises(ValueError, match="'precision'.*float32"):
        PatchFeatureTransformer(**params(precision="int8")).fit()
    with pytest.raises(ValueError, match="'runtime'.*openvino"):
        PatchFeatureTransformer(**params(runtime="tensorrt")).fit()


def test_bfloat16_features_are_float32_and_close_to_exact(images):
    exact = PatchFeatureTransformer(**params()).fit_transform(images)
    features = PatchFeatureTransformer(**params(precision="bfloat16")).fit_transform(images)
    assert features.dtype == np.float32
    # bfloat16 keeps 8 significant bits: about 1e-2 relative through the backbone.
    np.testing.assert_allclose(features, exact, atol=0.05 * np.abs(exact).max())
    assert np.abs(features - exact).max() > 1e-4 * np.abs(exact).max(), "ran in float32"


def test_autocast_is_deprecated_for_precision(images):
    expected = PatchFeatureTransformer(**params(precision="bfloat16")).fit_transform(images)
    old = PatchFeatureTransformer(**params(autocast="bfloat16"))
    with pytest.warns(FutureWarning, match="precision='bfloat16'"):
        features = old.fit_transform(images)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    both = PatchFeatureTransformer(**params(autocast="bfloat16", precision="auto"))
    with pytest.raises(ValueError, match="both set"):
        both.fit()


def test_autocast_backbone_gives_maps_in_its_dtype_and_leaves_the_thread_as_it_was():
    layer = torch.nn.Conv2d(3, 4, 3)
    wrapped = AutocastBackbone(lambda x: [layer(x)], torch.bfloat16)
    with torch.inference_mode():
        (maps,) = wrapped(torch.ones(1, 3, 8, 8))
    assert maps.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@needs_openvino
def test_openvino_features_equal_eager_for_ragged_batches_and_tiles(images):
    exact = PatchFeatureTransformer(**params()).fit_transform(images)
    compiled = PatchFeatureTransformer(**params(runtime="openvino")).fit()
    features = compiled.transform(images)  # batches of 2, 2 and 1: one compiled model
    np.testing.assert_allclose(features, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    tiled = {"image_size": 96, "tile_size": 32}
    big = np.stack([smooth_texture(np.random.default_rng(1), 96) for _ in range(2)])
    exact = PatchFeatureTransformer(**params(**tiled)).fit_transform(big)
    features = PatchFeatureTransformer(**params(runtime="openvino", **tiled)).fit_transform(big)
    np.testing.assert_allclose(features, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


@needs_openvino
def test_openvino_model_scores_from_threads_as_serially(images):
    feat = PatchFeatureTransformer(**params(runtime="openvino")).fit()
    serial = [feat.transform(images[i : i + 1]) for i in range(4)]
    results = [None] * 4

    def work(i):
        results[i] = feat.transform(images[i : i + 1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for got, expected in zip(results, serial, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_openvino
def test_fast_model_round_trips_and_runs_eagerly_with_one_warning_without_openvino(
    images, tmp_path, monkeypatch
):
    pipe = PadimDetector(device="cpu")
    feat = PatchFeatureTransformer(**params(runtime="openvino")).fit()
    scores = pipe.fit(feat.transform(images)).decision_function(feat.transform(images))
    joblib.dump(feat, tmp_path / "feat.joblib")
    loaded = joblib.load(tmp_path / "feat.joblib")
    assert loaded.get_params()["runtime"] == "openvino"
    np.testing.assert_allclose(pipe.decision_function(loaded.transform(images)), scores, rtol=1e-3)
    monkeypatch.setattr(runtimes, "openvino_available", lambda: False)
    elsewhere = joblib.load(tmp_path / "feat.joblib")
    with pytest.warns(UserWarning, match="runs its backbone in eager float32 here"):
        features = elsewhere.transform(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elsewhere.transform(images)  # warned once
    np.testing.assert_allclose(pipe.decision_function(features), scores, rtol=1e-3)


@needs_openvino
def test_openvino_with_memory_reads_stored_outputs_and_caches_its_compiled_model(images, tmp_path):
    memory = tmp_path / "memory"
    first = PatchFeatureTransformer(**params(runtime="openvino", memory=memory))
    stored = first.fit_transform(images)
    assert any(memory.rglob("openvino/*")), "OpenVINO's compiled model is not cached"
    again = PatchFeatureTransformer(**params(runtime="openvino", memory=memory, n_features=12))
    features = again.fit_transform(images)
    exact = PatchFeatureTransformer(**params(n_features=12)).fit_transform(images)
    np.testing.assert_allclose(features, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    assert stored.shape[1] == 24


def write_images(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def test_cli_names_the_library_choices():
    from sk_padim import cli_parser

    assert cli_parser._PRECISIONS == runtimes.PRECISIONS
    assert cli_parser._RUNTIMES == runtimes.RUNTIMES


@needs_openvino
def test_cli_fits_with_a_runtime_the_model_records_and_score_overrides_it(images, tmp_path):
    from sk_padim.cli import main

    good = write_images(tmp_path / "good", images)
    model = tmp_path / "model.joblib"
    options = ["--weights", "none", "--image-size", "64", "--n-features", "24", "--device", "cpu"]
    assert main(["fit", str(good), "-o", str(model), *options, "--runtime", "openvino", "-q"]) == 0
    feat = joblib.load(model)[0]
    assert (feat.runtime, feat.precision) == ("openvino", "float32")
    for runtime, out in (("openvino", None), ("eager", "--runtime")):
        folder = tmp_path / runtime
        argv = ["score", str(model), str(good), "-o", str(folder), "-q"]
        assert main(argv + ([out, runtime] if out else [])) == 0
    fast, eager = (
        np.loadtxt(tmp_path / r / "scores.csv", delimiter=",", skiprows=1, usecols=1)
        for r in ("openvino", "eager")
    )
    np.testing.assert_allclose(fast, eager, rtol=1e-4)
    assert joblib.load(model)[0].runtime == "openvino", "score changed the model file"
