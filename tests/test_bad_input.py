"""Every bad input gets a clear exception naming the problem and the fix, and a failed
fit leaves the estimator as it was.

Each case states the exception type, a pattern the message must match for the
*problem* and one for the *fix*. Cases already in test_features.py / test_detector.py
(an empty array, a 2-D array, an RGBA array, 2.0 and 300 pixels, a NaN array, a missing
path, array + path, a bare string, a non-image file, reg=0, sigma=-1, batch_size=0, ...)
are not repeated here.

Tests marked ``xfail(strict=True)`` pin down defects of the core modules (see their
``reason``); they start passing, and so fail as XPASS, once the defect is fixed: then
drop the marker.
"""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hang_guard import time_limit
from PIL import Image
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from synthetic import smooth_texture

from sk_padim import PadimDetector, PatchFeatureTransformer, fit_streaming

SIZE = 32  # image_size of the shared transformer: layer3 gives a 2x2 map


def raises_clearly(error, problem: str, fix: str, call):
    """``call()`` raises ``error`` whose message matches both patterns."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert re.search(problem, message), f"problem not named: {message!r}"
    assert re.search(fix, message), f"fix not named: {message!r}"
    return info.value


# ---------------------------------------------------------------------------- images


def encoded(image: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rgb():
    return smooth_texture(np.random.default_rng(0), SIZE)


@pytest.fixture(scope="module")
def files(tmp_path_factory, rgb):
    """Image files, good and bad, written once."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}

    def write(name: str, data: bytes):
        paths[name] = folder / name
        paths[name].write_bytes(data)

    png, jpeg = encoded(rgb, "PNG"), encoded(rgb, "JPEG", quality=95)
    write("good.png", png)
    write("good.jpg", jpeg)
    for fraction in (0.2, 0.6, 0.95):
        write(f"cut{int(fraction * 100)}.png", png[: int(len(png) * fraction)])
        write(f"cut{int(fraction * 100)}.jpg", jpeg[: int(len(jpeg) * fraction)])
    write("empty.png", b"")
    write("text.jpg", b"GIF89a but not really")
    grey16 = rgb[..., 0].astype(np.uint16) * 257  # full 16-bit range
    write("deep16.png", encoded(grey16, "PNG"))
    write("low16.png", encoded(rgb[..., 0].astype(np.uint16), "PNG"))  # 16-bit, 0-255
    write("float.tif", encoded(rgb[..., 0].astype(np.float32) / 255, "TIFF"))
    write("wide_float.tif", encoded(rgb[..., 0].astype(np.float32), "TIFF"))  # 0-255 floats
    alpha = np.concatenate([rgb, np.full((SIZE, SIZE, 1), 7, np.uint8)], axis=-1)
    write("rgba.png", encoded(alpha, "PNG"))
    (folder / "a_folder").mkdir()
    paths["a_folder"] = folder / "a_folder"
    return paths


@pytest.fixture(scope="module")
def feat():
    return PatchFeatureTransformer(
        weights=None, image_size=SIZE, n_features=8, batch_size=4, random_state=0
    ).fit()


ARRAY_CASES = [
    # (id, X, error, problem, fix)
    ("empty list", lambda r: [], ValueError, "empty list", "at least one image"),
    (
        "5-D array",
        lambda r: r[None, None],
        ValueError,
        "5 dimensions",
        r"squeeze\(\)|list of images",
    ),
    (
        "one RGB image without its batch axis",
        lambda r: r,
        ValueError,
        r"\(32, 32, 3\).*3 pixels wide",
        r"X\[None\]",
    ),
    ("2 channels", lambda r: r[None, ..., :2], ValueError, "2 channels", "expected 1 or 3"),
    ("5 channels", lambda r: np.zeros((1, 8, 8, 5), np.uint8), ValueError, "5 channels", "1 or 3"),
    (
        "channels-first array",
        lambda r: r[None].transpose(0, 3, 1, 2),
        ValueError,
        "32 channels",
        "channels-last.*moveaxis",
    ),
    (
        "RGBA item in a list",
        lambda r: [np.dstack([r, r[..., :1]])],
        ValueError,
        "image 0 has 4 channels",
        r"X\[\.\.\., :3\]",
    ),
    (
        "inf pixel",
        lambda r: np.where(np.arange(3) == 1, np.inf, r[None] / 255),
        ValueError,
        "NaN or infinite",
        "fix or drop",
    ),
    (
        "NaN pixel in a list item",
        lambda r: [r / 255, np.full((8, 8), np.nan)],
        ValueError,
        "image 1 contains NaN",
        "fix or drop",
    ),
    (
        "negative integers",
        lambda r: r[None].astype(np.int16) - 200,
        ValueError,
        r"\[-\d+, .*outside the expected 0-255 for int16",
        "rescale to 8 bits",
    ),
    (
        "16-bit integers above 255",
        lambda r: r[None].astype(np.uint16) * 257,
        ValueError,
        r"\[\d+, \d+\], outside the expected 0-255 for uint16",
        "rescale to 8 bits|X / 65535",
    ),
    (
        "ImageNet-normalised floats",
        lambda r: (r[None] / 255 - 0.45) / 0.225,
        ValueError,
        r"outside the expected \[0, 1\]",
        "raw pixels, not normalised",
    ),
    (
        "float item above 1",
        lambda r: [r.astype(np.float32)],
        ValueError,
        r"image 0 has pixel values in .*outside the expected \[0, 1\]",
        "divide 0-255 images by 255",
    ),
    (
        "zero-height image",
        lambda r: r[None, :0],
        ValueError,
        r"height x width \(0, 32\)",
        "at least one pixel",
    ),
    ("zero-width list item", lambda r: [r[:, :0]], ValueError, r"\(32, 0\)", "one pixel"),
    ("bool pixels", lambda r: r[None] > 100, TypeError, "dtype bool", "uint8.*float"),
    ("complex pixels", lambda r: r[None] + 0j, TypeError, "complex128", "uint8.*float"),
    (
        "ragged object array",
        lambda r: np.array([r, r[:8]], dtype=object),
        ValueError,
        r"shape \(2,\)",
        "list of images",
    ),
    ("None in a list", lambda r: [None], ValueError, r"Image 0 has shape \(\)", r"\(H, W\)"),
    (
        "list of PIL images and arrays",
        lambda r: [Image.fromarray(r), r],
        TypeError,
        "mixes array and pil",
        "one kind only",
    ),
    ("generator", lambda r: (x for x in [r]), TypeError, "got generator", "list of images"),
    (
        "channels-last tensor",
        lambda r: torch.zeros(1, 8, 8, 3),
        ValueError,
        "channels first",
        "permute",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "problem", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in ARRAY_CASES],
)
def test_bad_image_arrays_are_clear_errors(feat, rgb, make, error, problem, fix):
    before = feat.transform(rgb[None])
    raises_clearly(error, problem, fix, lambda: feat.transform(make(rgb)))
    np.testing.assert_array_equal(feat.transform(rgb[None]), before)


FILE_CASES = [
    # (file name, error, problem, fix); the problem always names the file.
    ("cut20.png", ValueError, "truncated", "replace it or leave it out"),
    ("cut60.png", ValueError, "truncated", "replace it or leave it out"),
    ("cut95.png", ValueError, "truncated", "replace it or leave it out"),
    ("cut20.jpg", ValueError, "[Tt]runcated", "replace it or leave it out"),
    ("cut60.jpg", ValueError, "truncated", "replace it or leave it out"),
    ("cut95.jpg", ValueError, "truncated", "replace it or leave it out"),
    ("empty.png", ValueError, "Cannot read image file", "replace it or leave it out"),
    ("text.jpg", ValueError, "Cannot read image file", "not an image PIL can decode"),
    (
        "deep16.png",
        ValueError,
        r"mode I;16\) has pixel values in \[\d+, \d+\]",
        # What a command-line user can do with files, not a NumPy expression.
        "convert the files to 8 bits per channel first, e.g. with ImageMagick: mogrify",
    ),
    ("wide_float.tif", ValueError, r"mode F\) has pixel values", "divide 0-255 images by 255"),
    ("a_folder", FileNotFoundError, "is a directory", r"list_images\(folder\)"),
]


@pytest.mark.parametrize(("name", "error", "problem", "fix"), FILE_CASES)
def test_bad_image_files_are_clear_errors_naming_the_file(feat, files, name, error, problem, fix):
    good = files["good.png"]
    # The bad file comes after a good one, in the same batch and in a later batch.
    for batch in ([good, files[name]], [good] * (feat.batch_size + 1) + [files[name]]):
        raised = raises_clearly(error, problem, fix, lambda b=batch: feat.transform(b))
        assert name in str(raised)


def test_decompression_bomb_is_a_clear_error_naming_the_file(feat, files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    raised = raises_clearly(
        ValueError,
        "decompression bomb",
        "MAX_IMAGE_PIXELS",
        lambda: feat.transform([files["good.png"]]),
    )
    assert "good.png" in str(raised)


def test_rgba_files_lose_their_alpha_channel(feat, files):
    """Documented: files go through PIL's convert("RGB"), which drops alpha; RGBA
    *arrays* are refused (see ARRAY_CASES) since there the user chose the channels."""
    np.testing.assert_array_equal(
        feat.transform([files["rgba.png"]]), feat.transform([files["good.png"]])
    )


def test_high_bit_depth_files_in_range_are_read_like_arrays(feat, files, rgb):
    """16-bit files holding 0-255 and float files holding [0, 1] are read as such, not
    clipped or truncated by PIL's 8-bit conversion."""
    grey = rgb[..., 0]
    np.testing.assert_array_equal(feat.transform([files["low16.png"]]), feat.transform([grey]))
    np.testing.assert_allclose(
        feat.transform([files["float.tif"]]), feat.transform([grey / 255]), atol=1e-5
    )


# -------------------------------------------------------------- transformer parameters


TRANSFORMER_PARAM_CASES = [
    # (id, params, error, problem, fix); each on fit(), from a fitted transformer.
    ("n_features -1", {"n_features": -1}, ValueError, "'n_features'.*Got -1", r"range \[1, inf\)"),
    ("n_features 2.5", {"n_features": 2.5}, ValueError, "Got 2.5", "must be an int"),
    (
        "n_features above one layer's channels",
        {"layers": ("layer1",), "n_features": 65},
        ValueError,
        r"n_features=65 .*only 64 channels",
        "n_features <= 64",
    ),
    (
        "backbone name lists the valid ones",
        {"backbone": "resnet_eighteen"},
        ValueError,
        "Unknown backbone 'resnet_eighteen'",
        r"resnet18.*wide_resnet50_2|wide_resnet50_2.*resnet18",
    ),
    ("backbone of a wrong type", {"backbone": 18}, ValueError, "'backbone'.*Got 18", "str"),
    (
        "misspelt layer lists the valid ones",
        {"layers": ("layer_1",)},
        ValueError,
        r"Unknown layers \['layer_1'\]",
        "Valid names include.*layer1",
    ),
    ("layers as one string", {"layers": "layer1"}, ValueError, "'layers'", "tuple"),
    ("no layers", {"layers": ()}, ValueError, r"got \(\)", "non-empty tuple"),
    ("a layer twice", {"layers": ("layer1", "layer1")}, ValueError, "twice", "layer1"),
    (
        "a non-convolutional layer",
        {"layers": ("layer1", "fc")},
        ValueError,
        r"'fc' outputs shape \(1, 1000\)",
        "convolutional feature maps",
    ),
    (
        "image_size too small for layer3",
        {"image_size": 16},
        ValueError,
        r"image_size=16 leaves layer 'layer3' a \(1, 1\) map",
        "larger image_size",
    ),
    ("image_size 0", {"image_size": 0}, ValueError, "'image_size'.*Got 0", r"range \[1, inf\)"),
    ("image_size (64,)", {"image_size": (64,)}, ValueError, r"got \(64,\)", r"\(height, width\)"),
    ("image_size (0, 64)", {"image_size": (0, 64)}, ValueError, r"\(0, 64\)", "height, width"),
    ("image_size 64.0", {"image_size": 64.0}, ValueError, "Got 64.0", "int"),
    ("autocast int8", {"autocast": "int8"}, ValueError, "'autocast'", "bfloat16"),
    (
        "image_size None without images",
        {"image_size": None},
        ValueError,
        "image_size=None takes the size from the training images",
        r"fit\(X\)",
    ),
    ("tile_size 0", {"tile_size": 0}, ValueError, "'tile_size'.*Got 0", "'auto'"),
    ("tile_size 'big'", {"tile_size": "big"}, ValueError, "'tile_size'.*Got 'big'", "None"),
]


def transformer_state(feat):
    return (feat.channel_indices_.copy(), feat.feature_shape_, feat.layers_)


@pytest.mark.parametrize(
    ("params", "error", "problem", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in TRANSFORMER_PARAM_CASES],
)
def test_bad_transformer_parameters_are_clear_errors(feat, params, error, problem, fix):
    before, good = transformer_state(feat), feat.get_params()
    try:
        raises_clearly(error, problem, fix, lambda: feat.set_params(**params).fit())
    finally:
        feat.set_params(**good)
    after = transformer_state(feat)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1:] == before[1:]


def test_unknown_device_is_a_clear_error(feat, rgb):
    bad = PatchFeatureTransformer(weights=None, image_size=SIZE, n_features=4, device="gpu")
    raises_clearly(
        ValueError,
        "device='gpu' is not a valid",
        "'auto', 'cpu'",
        lambda: bad.fit().transform(rgb[None]),
    )


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x04K\x01."], ids=["bytes", "a pickle"])
def test_weights_file_that_is_not_a_state_dict_names_the_file(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    feat = PatchFeatureTransformer(weights=str(path), image_size=SIZE, n_features=4)
    raised = raises_clearly(ValueError, "broken.pth", "state.dict", feat.fit)
    assert "weights_only=False" not in str(raised) and "weights_only` set to `False" not in str(
        raised
    )


# ------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def train():
    rng = np.random.default_rng(1)
    return rng.normal(size=(12, 5, 3, 4)).astype(np.float32)


@pytest.fixture
def detector(train):
    return PadimDetector().fit(train)


def detector_state(detector):
    """The fitted state through the public API: counts, shapes, threshold, and the maps
    of a fixed probe (which the Gaussians of every position decide)."""
    probe = np.random.default_rng(2).normal(size=(2, *detector.feature_shape_))
    return {
        "n_samples_seen_": detector.n_samples_seen_,
        "feature_shape_": detector.feature_shape_,
        "threshold_": getattr(detector, "threshold_", None),
        "probe_maps": detector.score_samples(probe.astype(np.float32)),
    }


def assert_unchanged(detector, before, probe):
    after = detector_state(detector)
    for name, value in after.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_array_equal(detector.decision_function(probe), before["scores"])


def with_nan(x, value=np.nan):
    x = np.array(x, dtype=np.float32)
    x[-1, 0, 0, 0] = value
    return x


FEATURE_CASES = [
    # (id, make(train) -> X, error, problem, fix)
    (
        "3-D features",
        lambda t: t[0],
        ValueError,
        r"shape \(n, d, h, w\); got shape \(5, 3, 4\)",
        "PatchFeatureTransformer first",
    ),
    (
        "5-D features",
        lambda t: t[None],
        ValueError,
        r"got shape \(1, 12, 5, 3, 4\)",
        "PatchFeatureTransformer first",
    ),
    ("no images", lambda t: t[:0], ValueError, r"n = 0", "at least one image"),
    ("NaN feature", with_nan, ValueError, "NaN or infinite", "check the images and the backbone"),
    (
        "inf feature",
        lambda t: with_nan(t, np.inf),
        ValueError,
        "NaN or infinite",
        "check the images",
    ),
    ("text features", lambda t: t.astype(str), TypeError, "dtype <U", "numeric"),
]


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize(
    ("make", "error", "problem", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in FEATURE_CASES],
)
def test_bad_features_in_fit_are_clear_errors_and_change_nothing(
    detector, train, method, make, error, problem, fix
):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    raises_clearly(error, problem, fix, lambda: getattr(detector, method)(make(train)))
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize("method", ["score_samples", "decision_function", "predict"])
@pytest.mark.parametrize(
    ("make", "error", "problem", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in FEATURE_CASES],
)
def test_bad_features_in_scoring_are_clear_errors(
    detector, train, method, make, error, problem, fix
):
    raises_clearly(error, problem, fix, lambda: getattr(detector, method)(make(train)))


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("partial_fit", (4, 3, 4)),
        ("decision_function", (5, 2, 4)),
        ("predict", (5, 3, 5)),
        ("score_samples", (5, 4, 3)),  # same size, transposed grid
    ],
)
def test_features_of_another_shape_are_refused(detector, train, method, shape):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    other = np.zeros((2, *shape), np.float32)
    raises_clearly(
        ValueError,
        re.escape(f"(d, h, w) = {shape}") + ".*" + re.escape("fitted on (5, 3, 4)"),
        "same transformer settings",
        lambda: getattr(detector, method)(other),
    )
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize("shape", [(2, 0, 3, 3), (2, 3, 0, 3), (2, 3, 3, 0)])
def test_empty_feature_axes_are_clear_errors(shape):
    raises_clearly(
        ValueError, "0", "PatchFeatureTransformer", lambda: PadimDetector().fit(np.zeros(shape))
    )


def test_ragged_feature_list_is_a_clear_error(train):
    raises_clearly(
        ValueError,
        "shape",
        "PatchFeatureTransformer",
        lambda: PadimDetector().fit([train[0], train[0, :2]]),
    )


def test_features_beyond_float32_range_are_named_as_such(train):
    raises_clearly(
        ValueError,
        "float32",
        "scale",
        lambda: PadimDetector().fit(train.astype(np.float64) * 1e300),
    )


def test_features_too_large_for_the_statistics_are_refused_by_partial_fit(detector, train):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    with pytest.raises((ValueError, FloatingPointError)):
        detector.partial_fit(train * 1e20)
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_huge_features_are_a_clear_error_not_nan(train, device):
    raises_clearly(
        FloatingPointError,
        "too large",
        "scale them down",
        lambda: PadimDetector(device=device).fit(train * 1e20),
    )


# ------------------------------------------------------------------ detector parameters


DETECTOR_PARAM_CASES = [
    ("reg -1", {"reg": -1.0}, "'reg'.*Got -1.0", r"range \(0.0, inf\)"),
    ("reg NaN", {"reg": math.nan}, "'reg'.*Got nan", r"range \(0.0, inf\)"),
    ("reg inf", {"reg": math.inf}, "'reg'.*Got inf", r"range \(0.0, inf\)"),
    ("sigma -0.5", {"sigma": -0.5}, "'sigma'.*Got -0.5", r"range \[0.0, inf\)"),
    ("sigma NaN", {"sigma": math.nan}, "'sigma'.*Got nan", r"range \[0.0, inf\)"),
    ("truncate 0", {"truncate": 0}, "'truncate'.*Got 0", r"range \(0.0, inf\)"),
    ("map_size 0", {"map_size": 0}, "'map_size'.*Got 0", r"range \[1, inf\)"),
    ("threshold text", {"threshold": "high"}, "'threshold'.*Got 'high'", "float|None"),
    ("covariance_dtype float64", {"covariance_dtype": "float64"}, "'covariance_dtype'", "float16"),
]


@pytest.mark.parametrize(
    ("params", "problem", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in DETECTOR_PARAM_CASES],
)
def test_bad_detector_parameters_are_clear_errors_and_change_nothing(
    detector, train, params, problem, fix
):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    good = detector.get_params()
    raises_clearly(ValueError, problem, fix, lambda: detector.set_params(**params).fit(train))
    detector.set_params(**good)
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize(
    "params", [{"reg": math.nan}, {"sigma": -0.5}], ids=["reg NaN", "sigma -0.5"]
)
def test_bad_detector_parameters_in_a_first_partial_fit_are_clear_errors(train, params):
    name = next(iter(params))
    raises_clearly(
        ValueError, f"'{name}'", "range", lambda: PadimDetector(**params).partial_fit(train)
    )


@pytest.mark.parametrize(
    "params", [{"reg": math.nan}, {"sigma": -0.5}], ids=["reg NaN", "sigma -0.5"]
)
def test_bad_detector_parameters_in_a_later_partial_fit_are_clear_errors(detector, train, params):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    good = detector.get_params()
    name = next(iter(params))
    with warnings.catch_warnings(), time_limit(1):
        warnings.simplefilter("ignore", RuntimeWarning)
        raises_clearly(
            ValueError,
            f"'{name}'",
            "range",
            lambda: detector.set_params(**params).partial_fit(train),
        )
    detector.set_params(**good)
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize("map_size", [(5,), (0, 4)])
def test_bad_map_size_in_fit_changes_nothing(detector, train, map_size):
    before = {**detector_state(detector), "scores": detector.decision_function(train[:3])}
    raises_clearly(
        ValueError,
        "map_size",
        r"\(height, width\)",
        lambda: detector.set_params(map_size=map_size).fit(np.concatenate([train, train])),
    )
    detector.set_params(map_size=None)
    assert_unchanged(detector, before, train[:3])


@pytest.mark.parametrize(
    "params", [{"reg": 0.0}, {"reg": -1.0}, {"reg": math.nan}, {"sigma": -1.0}]
)
def test_bad_parameters_set_after_fit_are_clear_errors_when_scoring(train, params):
    detector = PadimDetector().fit(train[:1])  # one image: the covariance is singular
    detector.set_params(**params)
    name = next(iter(params))
    with warnings.catch_warnings(), time_limit(1):
        warnings.simplefilter("ignore", RuntimeWarning)
        raises_clearly(ValueError, name, "range", lambda: detector.decision_function(train))


# ------------------------------------------------------------------- not fitted yet


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda x, f: PatchFeatureTransformer().transform(x), id="transform"),
        pytest.param(lambda x, f: PadimDetector().score_samples(f), id="score_samples"),
        pytest.param(lambda x, f: PadimDetector().decision_function(f), id="decision_function"),
        pytest.param(lambda x, f: PadimDetector().predict(f), id="predict"),
        pytest.param(lambda x, f: PadimDetector().merge(PadimDetector()), id="merge"),
        pytest.param(
            lambda x, f: PadimDetector().fit(f).merge(PadimDetector()), id="merge unfitted other"
        ),
        pytest.param(
            lambda x, f: Pipeline(
                [("feat", PatchFeatureTransformer()), ("padim", PadimDetector())]
            ).decision_function(x),
            id="pipeline",
        ),
    ],
)
def test_scoring_before_fit_says_to_fit(rgb, train, call):
    raises_clearly(NotFittedError, "not fitted yet", "Call 'fit'", lambda: call(rgb[None], train))


# ------------------------------------------------------------------------ pipelines


def small_pipeline(**feat_params):
    params = {"weights": None, "image_size": SIZE, "n_features": 8, **feat_params}
    return Pipeline([("feat", PatchFeatureTransformer(**params)), ("padim", PadimDetector())])


def test_pipeline_fitted_on_one_image_scores_finitely(rgb):
    pipe = small_pipeline(random_state=0).fit(rgb[None])
    other = smooth_texture(np.random.default_rng(5), SIZE)[None]
    detector = pipe.named_steps["padim"]
    assert detector.n_samples_seen_ == 1
    maps = pipe.score_samples(np.concatenate([rgb[None], other]))
    assert np.isfinite(maps).all() and (maps >= 0).all()
    assert maps[0].max() < 1e-4 * maps[1].max()  # the training image is its own mean
    # No held-out image to set threshold_ from: predict says what to do.
    raises_clearly(
        NotFittedError, "threshold_ is not set", "threshold=<float>", lambda: pipe.predict(other)
    )
    pipe.set_params(padim__threshold=1.0).fit(rgb[None])
    assert np.isfinite(pipe.decision_function(other)).all()


def test_fit_streaming_bad_chunk_size_is_a_clear_error(rgb):
    raises_clearly(
        ValueError,
        "chunk_size must be a positive int or None; got 0",
        "positive int",
        lambda: fit_streaming(small_pipeline(), rgb[None], chunk_size=0),
    )


def test_fit_streaming_with_a_truncated_file_names_it_and_keeps_the_detector(files, rgb):
    pipe = small_pipeline(random_state=0).fit(np.stack([rgb, rgb[::-1]]))
    detector = pipe.named_steps["padim"]
    before = {**detector_state(detector), "scores": pipe.decision_function(rgb[None])}
    paths = [files["good.png"]] * 3 + [files["cut60.png"]]
    raised = raises_clearly(
        ValueError,
        "truncated",
        "replace it or leave it out",
        lambda: fit_streaming(pipe, paths, chunk_size=2),
    )
    assert "cut60.png" in str(raised)
    after = detector_state(detector)
    for name, value in before.items():
        if name != "scores":
            np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize("route", ["fit_streaming", "Pipeline.fit"])
def test_failed_refit_leaves_the_pipeline_scoring_as_before(files, rgb, route):
    pipe = small_pipeline().fit(np.stack([rgb, rgb[::-1]]))
    before = pipe.decision_function(rgb[None])
    with pytest.raises(ValueError):
        if route == "fit_streaming":
            fit_streaming(pipe, [files["good.png"]] * 3 + [files["cut60.png"]], chunk_size=2)
        else:
            pipe.fit(np.full((2, SIZE, SIZE, 3), 300))
    np.testing.assert_array_equal(pipe.decision_function(rgb[None]), before)


def test_a_missing_folder_is_said_to_be_missing(tmp_path):
    from sk_padim.core.images import check_images

    with pytest.raises(FileNotFoundError, match="Folder not found: no/such/folder"):
        check_images("no/such/folder")
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(TypeError, match=r"single path.*not a folder.*wrap a single path as"):
        check_images(str(tmp_path / "one.png"))
