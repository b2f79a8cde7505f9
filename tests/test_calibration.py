"""F1-optimal thresholds against a brute-force search over every candidate threshold."""

import pickle
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from synthetic import textures_with_squares

from sk_padim import (
    F1ThresholdCalibrator,
    PadimDetector,
    PatchFeatureTransformer,
    f1_optimal_threshold,
)


class MapsFromInput(BaseEstimator):
    """A stand-in detector: X is (n, H, W) and its maps are X minus the training mean."""

    def fit(self, X, y=None):
        self.fitted_on_ = np.asarray(X)
        self.offset_ = float(np.mean(X))
        return self

    def score_samples(self, X):
        check_is_fitted(self)
        return np.asarray(X) - self.offset_

    def decision_function(self, X):
        return self.score_samples(X).max(axis=(1, 2))


def brute_force_f1_threshold(truth, scores):
    """Try every distinct score as threshold (score >= t is anomalous); the lowest of
    the best."""
    truth, scores = np.ravel(truth), np.ravel(scores)
    candidates = np.unique(scores)
    f1s = [f1_score(truth, scores >= t, zero_division=0.0) for t in candidates]
    best = int(np.argmax(f1s))
    return candidates[best], f1s[best]


def validation_set(seed=0, n_normal=12, n_anomalous=8, shape=(6, 6), decimals=None):
    """Maps-like X (n, H, W), masks with one blob per anomalous image, labels."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_normal + n_anomalous, *shape), dtype=bool)
    for i in range(n_normal, len(masks)):
        blob = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
        masks[i] = blob > np.quantile(blob, 0.8)
    X = rng.normal(size=masks.shape) + 1.5 * masks
    if decimals is not None:
        X = np.round(X, decimals)
    return X, masks, masks.any(axis=(1, 2)).astype(int)


# --- f1_optimal_threshold ----------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_f1_optimal_threshold_equals_the_brute_force_maximum(seed, decimals):
    rng = np.random.default_rng(seed)
    y = (rng.random(60) < 0.3).astype(int)
    scores = rng.normal(size=60) + y
    if decimals is not None:
        scores = np.round(scores, decimals)
    assert f1_optimal_threshold(y, scores) == brute_force_f1_threshold(y, scores)[0]


def test_f1_optimal_threshold_on_maps_searches_pixels():
    X, masks, _ = validation_set(decimals=1)
    assert f1_optimal_threshold(masks, X) == brute_force_f1_threshold(masks, X)[0]


def test_f1_optimal_threshold_on_image_scores_takes_masks_as_labels():
    X, masks, labels = validation_set(decimals=1)
    scores = X.max(axis=(1, 2))
    assert f1_optimal_threshold(masks, scores) == brute_force_f1_threshold(labels, scores)[0]


def test_f1_ties_go_to_the_lowest_threshold():
    # Thresholds 4 (P=1, R=1/2) and 1 (P=1/2, R=1) both give F1 = 2/3.
    assert f1_optimal_threshold([1, 0, 0, 1], [4.0, 3.0, 2.0, 1.0]) == 1.0


def test_points_with_zero_precision_and_recall_count_as_zero_f1_without_warning():
    # The top score is normal: at that threshold precision = recall = 0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f1_optimal_threshold([1, 0], [0.1, 0.9]) == 0.1


def test_f1_optimal_threshold_refuses_a_single_class():
    with pytest.raises(ValueError, match="only normal samples"):
        f1_optimal_threshold([0, 0, 0], [0.1, 0.5, 0.3])


# --- F1ThresholdCalibrator, image level -----------------------------------------------------


def test_fitted_estimator_is_used_as_is_and_never_refitted():
    X_train, _, _ = validation_set(seed=5, n_anomalous=0)
    X, _, labels = validation_set(decimals=1)
    detector = MapsFromInput().fit(X_train)
    calibrator = F1ThresholdCalibrator(detector).fit(X, labels)
    assert calibrator.estimator_ is detector
    assert np.array_equal(detector.fitted_on_, X_train)
    expected, best_f1 = brute_force_f1_threshold(labels, detector.decision_function(X))
    assert calibrator.threshold_ == expected
    assert calibrator.best_score_ == pytest.approx(best_f1)


def test_unfitted_estimator_is_cloned_and_fitted_on_normal_samples_only():
    X, _, labels = validation_set(decimals=1)
    detector = MapsFromInput()
    calibrator = F1ThresholdCalibrator(detector).fit(X, labels)
    assert not hasattr(detector, "offset_")
    assert np.array_equal(calibrator.estimator_.fitted_on_, X[labels == 0])
    scores = calibrator.estimator_.decision_function(X)
    assert calibrator.threshold_ == brute_force_f1_threshold(labels, scores)[0]


def test_image_predictions_reach_best_score_on_the_validation_data():
    # A score equal to threshold_ is anomalous, as in precision_recall_curve.
    X, _, labels = validation_set(seed=1, decimals=1)
    calibrator = F1ThresholdCalibrator(MapsFromInput()).fit(X, labels)
    predicted = calibrator.predict(X)
    scores = calibrator.decision_function(X)
    assert np.array_equal(predicted, np.where(scores >= calibrator.threshold_, -1, 1))
    assert f1_score(labels, predicted == -1) == pytest.approx(calibrator.best_score_)


def test_scores_pass_through_the_fitted_estimator():
    X, _, labels = validation_set()
    calibrator = F1ThresholdCalibrator(MapsFromInput()).fit(X, labels)
    assert np.array_equal(calibrator.score_samples(X), calibrator.estimator_.score_samples(X))
    assert np.array_equal(
        calibrator.decision_function(X), calibrator.estimator_.decision_function(X)
    )


def test_fitted_calibrator_survives_pickling():
    X, _, labels = validation_set()
    calibrator = F1ThresholdCalibrator(MapsFromInput()).fit(X, labels)
    restored = pickle.loads(pickle.dumps(calibrator))
    assert restored.threshold_ == calibrator.threshold_
    assert np.array_equal(restored.predict(X), calibrator.predict(X))


# --- F1ThresholdCalibrator, pixel level -----------------------------------------------------


def test_pixel_threshold_equals_the_brute_force_maximum_over_pixels():
    X, masks, labels = validation_set(seed=2, decimals=1)
    calibrator = F1ThresholdCalibrator(MapsFromInput(), level="pixel").fit(X, masks)
    maps = calibrator.estimator_.score_samples(X)
    expected, best_f1 = brute_force_f1_threshold(masks, maps)
    assert calibrator.threshold_ == expected
    assert calibrator.best_score_ == pytest.approx(best_f1)


def test_pixel_level_predicts_masks_and_flags_images_with_any_anomalous_pixel():
    X, masks, _ = validation_set(seed=2, decimals=1)
    calibrator = F1ThresholdCalibrator(MapsFromInput(), level="pixel").fit(X, masks)
    maps = calibrator.score_samples(X)
    predicted_masks = calibrator.predict_masks(X)
    assert predicted_masks.dtype == bool
    assert np.array_equal(predicted_masks, maps >= calibrator.threshold_)
    expected = np.where((maps >= calibrator.threshold_).any(axis=(1, 2)), -1, 1)
    assert np.array_equal(calibrator.predict(X), expected)
    assert f1_score(masks.ravel(), predicted_masks.ravel()) == pytest.approx(calibrator.best_score_)


def test_pixel_level_resizes_larger_masks_to_the_maps():
    X, masks, _ = validation_set(seed=3, decimals=1)
    doubled = masks.repeat(2, axis=1).repeat(2, axis=2)
    detector = MapsFromInput().fit(X)
    direct = F1ThresholdCalibrator(detector, level="pixel").fit(X, masks)
    resized = F1ThresholdCalibrator(detector, level="pixel").fit(X, doubled)
    assert resized.threshold_ == direct.threshold_


# --- with the real estimators ------------------------------------------------------------


def test_unfitted_pipeline_is_fitted_on_normal_images_and_calibrated(resnet18_weights):
    images, labels, masks = textures_with_squares(8, 4, size=32, seed=0)
    pipe = Pipeline(
        [
            (
                "feat",
                PatchFeatureTransformer(
                    weights=resnet18_weights, image_size=32, n_features=10, random_state=0
                ),
            ),
            ("padim", PadimDetector()),
        ]
    )
    calibrator = F1ThresholdCalibrator(pipe).fit(images, masks)
    assert calibrator.estimator_ is not pipe
    assert calibrator.estimator_[-1].n_samples_seen_ == 8
    scores = calibrator.estimator_.decision_function(images)
    assert calibrator.threshold_ == brute_force_f1_threshold(labels, scores)[0]

    again = F1ThresholdCalibrator(calibrator.estimator_).fit(images, labels)
    assert again.estimator_ is calibrator.estimator_  # a fitted Pipeline is used as is
    assert again.threshold_ == calibrator.threshold_


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["image", "pixel"])
def test_a_single_class_is_refused(level):
    X, masks, _ = validation_set(n_anomalous=0)
    with pytest.raises(ValueError, match="only normal samples"):
        F1ThresholdCalibrator(MapsFromInput(), level=level).fit(X, masks)


def test_unknown_level_is_refused():
    X, masks, _ = validation_set()
    with pytest.raises(
        ValueError, match=r"'level' parameter .* among \{'(image|pixel)', '(image|pixel)'\}"
    ):
        F1ThresholdCalibrator(MapsFromInput(), level="region").fit(X, masks)


def test_an_estimator_without_anomaly_scores_is_refused():
    X, masks, _ = validation_set()
    with pytest.raises(TypeError, match="'estimator' parameter .* 'decision_function'"):
        F1ThresholdCalibrator(object()).fit(X, masks)


def test_pixel_level_refuses_image_labels():
    X, _, labels = validation_set()
    with pytest.raises(ValueError, match="Pixel masks"):
        F1ThresholdCalibrator(MapsFromInput(), level="pixel").fit(X, labels)


def test_predict_masks_needs_the_pixel_level():
    X, _, labels = validation_set()
    calibrator = F1ThresholdCalibrator(MapsFromInput()).fit(X, labels)
    with pytest.raises(ValueError, match="level='pixel'"):
        calibrator.predict_masks(X)


def test_an_estimator_without_the_needed_scores_is_refused():
    class ImageScoresOnly(BaseEstimator):
        def decision_function(self, X):
            return np.zeros(len(X))

    X, masks, _ = validation_set()
    with pytest.raises(TypeError, match="score_samples"):
        F1ThresholdCalibrator(ImageScoresOnly(), level="pixel").fit(X, masks)


def test_an_unfitted_estimator_needs_normal_images():
    X, masks, _ = validation_set(n_normal=0)
    with pytest.raises(ValueError, match="no normal image"):
        F1ThresholdCalibrator(MapsFromInput(), level="pixel").fit(X, masks)


def test_lengths_of_x_and_y_must_agree():
    X, _, labels = validation_set()
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        F1ThresholdCalibrator(MapsFromInput()).fit(X[:-1], labels)


def test_predict_before_fit_raises_not_fitted():
    X, _, _ = validation_set()
    with pytest.raises(NotFittedError):
        F1ThresholdCalibrator(MapsFromInput()).predict(X)
