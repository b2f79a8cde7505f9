"""scikit-learn's estimator checks on PadimDetector, PatchFeatureTransformer and
F1ThresholdCalibrator, with feature- and image-shaped data.

The estimators take 4-D input (features ``(n, d, h, w)``, images ``(n, H, W, C)``), so
their tags say ``two_d_array=False``, and ``check_estimator`` skips every check. Here
the estimator's class claims 2-D input while the checks are listed and run, and
scikit-learn's input hooks (``estimator_checks._enforce_estimator_tags_X`` / ``_y``)
turn each check's data into the estimator's, sample by sample: ``(n, p)`` becomes
features ``(n, p, 3, 3)`` (``p`` stays the number of features) or images
``(n, 32, 32, 3)``, and targets become image labels (1 = anomalous). Each listed check
runs and passes, or is in ``NOT_APPLICABLE`` (with why it cannot apply to 4-D input),
in ``DELIBERATE_DEVIATIONS`` (a contract the estimator breaks by design, with the
reason) or in ``EXPECTED_FAILURES`` (with the failure and the fix it waits for, and the
test fails once it passes); the lists must name checks that exist, so they cannot rot.

The hooks are private to scikit-learn (checked with scikit-learn 1.9); the first test
says so if a release renames them.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import estimator_checks_generator

from sk_padim import F1ThresholdCalibrator, PadimDetector, PatchFeatureTransformer

IMAGE_SHAPE = (32, 32, 3)
GRID = (3, 3)


def feature_shaped(X: np.ndarray) -> np.ndarray:
    """``(n, p)`` -> features ``(n, p, 3, 3)``: channel ``c`` at ``(i, j)`` holds column
    ``(c + 3 i + j) % p``, so each sample's features come from its row alone."""
    p = X.shape[1]
    channels, rows, cols = np.indices((p, *GRID))
    return X[:, (channels + GRID[1] * rows + cols) % p]


def image_shaped(X: np.ndarray) -> np.ndarray:
    """``(n, p)`` -> images ``(n, 32, 32, 3)``: each row's values tiled over the pixels;
    finite floats squashed into [0, 1], integers taken modulo 256, NaN and infinities
    kept (so that the checks for them still see them)."""
    pixels = X[:, np.arange(np.prod(IMAGE_SHAPE)) % X.shape[1]]
    if pixels.dtype.kind == "f":
        with np.errstate(over="ignore"):
            squashed = 1 / (1 + np.exp(-pixels))
        pixels = np.where(np.isfinite(pixels), squashed, pixels).astype(pixels.dtype)
    elif pixels.dtype.kind in "iu":
        pixels = pixels % 256
    return pixels.reshape(len(X), *IMAGE_SHAPE)


SHAPERS = {
    PadimDetector: feature_shaped,
    PatchFeatureTransformer: image_shaped,
    F1ThresholdCalibrator: feature_shaped,
}


def small_transformer() -> PatchFeatureTransformer:
    return PatchFeatureTransformer(
        weights=None, image_size=32, n_features=8, device="cpu", random_state=0
    )


ESTIMATORS = {
    "PadimDetector": PadimDetector(device="cpu"),
    "PatchFeatureTransformer": small_transformer(),
    "F1ThresholdCalibrator": F1ThresholdCalibrator(PadimDetector(device="cpu")),
}

# check name -> why it cannot apply to an estimator of 4-D input.
_NO_HOOK = "builds 2-D X without the input hook, which a 4-D estimator refuses as such"
_COMMON = {
    "check_array_api_input": "needs SCIPY_ARRAY_API=1 before SciPy is imported (else it "
    "skips itself); the estimators claim no array API support",
    "check_complex_data": _NO_HOOK,
    "check_estimators_empty_data_messages": _NO_HOOK,
    "check_estimators_nan_inf": _NO_HOOK + " (test_bad_input.py covers NaN and infinity)",
    "check_fit1d": _NO_HOOK,
    "check_fit2d_1feature": _NO_HOOK,
    "check_fit2d_1sample": _NO_HOOK,
    "check_fit2d_predict1d": _NO_HOOK,
    "check_methods_subset_invariance": "reshapes each sample to (1, n_features)",
    "check_estimator_sparse_array": "sparse input: 4-D arrays have no sparse form",
    "check_estimator_sparse_matrix": "sparse input: 4-D arrays have no sparse form",
    "check_estimator_sparse_tag": "sparse input: 4-D arrays have no sparse form",
}
_FLOAT_FEATURES = (
    "features must be floating point: an integer or object array is refused with a "
    "TypeError naming its dtype (a 4-D integer array is images without the transformer)"
)
_NO_N_FEATURES = (
    "images of any size and channel count are taken (and resized), so there is no n_features_in_"
)
_DETECTOR = {
    "check_dtype_object": _FLOAT_FEATURES,
    "check_estimators_dtypes": "fits integer X; " + _FLOAT_FEATURES,
}
NOT_APPLICABLE = {
    "PadimDetector": {
        **_COMMON,
        **_DETECTOR,
        "check_classifier_data_not_an_array": "its X is integer; " + _FLOAT_FEATURES,
    },
    "PatchFeatureTransformer": {
        **_COMMON,
        "check_dtype_object": "pixels must be uint8 or float: an object array is refused "
        "with a TypeError naming its dtype",
        "check_n_features_in": _NO_N_FEATURES,
        "check_n_features_in_after_fitting": _NO_N_FEATURES,
        "check_positive_only_tag_during_fit": "pixels are bounded (0-255, or [0, 1]); "
        "negative ones are refused as not raw pixels (DESIGN.md section 7)",
        "check_transformer_data_not_an_array": "unpacks X.shape as (n_samples, n_features)",
        "check_transformer_general": "unpacks X.shape as (n_samples, n_features)",
    },
    "F1ThresholdCalibrator": {**_COMMON, **_DETECTOR},
}

# check name -> the failure and the fix it waits for (none left).
# check name -> the deliberate difference from scikit-learn's contract that it tests.
_SIGN = (
    "scores are higher for more anomalous inputs (as in PaDiM, anomalib and PyOD; "
    "docs/algorithm.md), while the check requires scikit-learn's sign: decision_function "
    ">= 0 for inliers and score_samples higher for inliers"
)
DELIBERATE_DEVIATIONS = {
    "PadimDetector": {"check_outliers_fit_predict": _SIGN, "check_outliers_train": _SIGN},
    "PatchFeatureTransformer": {},
    "F1ThresholdCalibrator": {},
}

EXPECTED_FAILURES: dict[str, dict[str, str]] = {
    "PadimDetector": {},
    "PatchFeatureTransformer": {},
    "F1ThresholdCalibrator": {},
}


@contextmanager
def claiming_2d_input(estimator):
    """The estimator's class says ``two_d_array=True`` inside the block."""
    cls = type(estimator)
    real = cls.__sklearn_tags__

    def tags(self):
        claimed = real(self)
        claimed.input_tags.two_d_array = True
        return claimed

    cls.__sklearn_tags__ = tags
    try:
        yield
    finally:
        cls.__sklearn_tags__ = real  # each of the three classes defines its own


def check_name(check) -> str:
    while isinstance(check, partial):
        check = check.func
    return check.__name__


def listed_checks(name: str) -> dict[str, object]:
    """Check name (``name[i]`` for repeats, e.g. with a read-only memmap) -> check."""
    estimator = ESTIMATORS[name]
    checks: dict[str, object] = {}
    with claiming_2d_input(estimator), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, check in estimator_checks_generator(estimator, legacy=True):
            key, count = check_name(check), 1
            while key in checks:
                key, count = f"{check_name(check)}[{count}]", count + 1
            checks[key] = check
    return checks


CHECKS = {name: listed_checks(name) for name in ESTIMATORS}
CASES = [(name, key) for name, checks in CHECKS.items() for key in checks]


def test_the_input_hooks_exist():
    for hook in ("_enforce_estimator_tags_X", "_enforce_estimator_tags_y"):
        assert callable(getattr(estimator_checks, hook, None)), hook


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_skip_and_failure_lists_name_existing_checks(name):
    names = {key.split("[")[0] for key in CHECKS[name]}
    assert set(NOT_APPLICABLE[name]) - names == set()
    assert set(EXPECTED_FAILURES[name]) - names == set()
    assert set(DELIBERATE_DEVIATIONS[name]) - names == set()
    assert set(NOT_APPLICABLE[name]).isdisjoint(EXPECTED_FAILURES[name])
    assert set(DELIBERATE_DEVIATIONS[name]).isdisjoint(
        set(NOT_APPLICABLE[name]) | set(EXPECTED_FAILURES[name])
    )


def binary_labels(y):
    """A check's targets as image labels (1 = anomalous): those above their median (or
    above their minimum, when as many as half are the maximum).

    Targets built from shaped X (``X[:, 0]``) have the grid's axes; the first value
    per sample is the column the check meant.
    """
    y = np.asarray(y)
    if not y.size or y.dtype.kind not in "iuf":
        return y
    y = y.reshape(len(y), -1)[:, 0]
    anomalous = y > np.median(y)
    return (anomalous if anomalous.any() else y > y.min()).astype(int)


@pytest.fixture
def shaped_input(monkeypatch, request):
    """sklearn's input hooks, then the estimator's shape (ndarrays only) and labels."""
    name = request.node.callspec.params["name"]
    shape = SHAPERS[type(ESTIMATORS[name])]
    original = estimator_checks._enforce_estimator_tags_X

    def hook(estimator, X, X_test=None, **kwargs):
        shaped = original(estimator, X, X_test, **kwargs)
        pairs = shaped if X_test is not None else (shaped,)
        pairs = tuple(shape(x) if isinstance(x, np.ndarray) and x.ndim == 2 else x for x in pairs)
        return pairs if X_test is not None else pairs[0]

    monkeypatch.setattr(estimator_checks, "_enforce_estimator_tags_X", hook)
    original_y = estimator_checks._enforce_estimator_tags_y
    monkeypatch.setattr(
        estimator_checks,
        "_enforce_estimator_tags_y",
        lambda estimator, y: binary_labels(original_y(estimator, y)),
    )


@pytest.mark.parametrize(("name", "key"), CASES)
def test_estimator_check(name, key, shaped_input):
    base = key.split("[")[0]
    if base in NOT_APPLICABLE[name]:
        pytest.skip(NOT_APPLICABLE[name][base])
    if base in DELIBERATE_DEVIATIONS[name]:
        pytest.skip(f"deliberate deviation: {DELIBERATE_DEVIATIONS[name][base]}")
    with claiming_2d_input(ESTIMATORS[name]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if base not in EXPECTED_FAILURES[name]:
            CHECKS[name][key](ESTIMATORS[name])
            return
        try:
            CHECKS[name][key](ESTIMATORS[name])
        except Exception:
            pytest.xfail(EXPECTED_FAILURES[name][base])
    pytest.fail(f"{key} passes now: remove it from EXPECTED_FAILURES[{name!r}]")
