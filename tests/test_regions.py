"""Defect regions, readable scores and the pixel threshold from good images alone."""

import numpy as np
import pytest
from scipy import ndimage

from sk_padim import F1ThresholdCalibrator, PadimDetector
from sk_padim.calibration import QuantileThresholdCalibrator, good_pixel_threshold
from sk_padim.evaluation import padim_pipeline
from sk_padim.regions import (
    defect_regions,
    normalized_score,
    pixel_threshold_of,
    predict_regions,
    relative_score,
)
from tests.synthetic import smooth_texture

# ------------------------------------------------------------------------ regions

# (image, row slice, column slice, score) of each drawn rectangle, and what a person
# counts by hand: box (row_min, col_min, row_max, col_max) half-open, and area.
RECTANGLES = [
    (0, slice(2, 5), slice(3, 9), 4.0),  # 3 x 6 = 18 pixels
    (0, slice(10, 16), slice(12, 14), 7.0),  # touches the bottom row: 6 x 2 = 12
    (1, slice(0, 2), slice(12, 14), 3.0),  # image 1's top row, right below image 0's one
    (1, slice(7, 8), slice(0, 1), 9.0),  # a single pixel
]
EXPECTED = {
    0: [((2, 3, 5, 9), 18), ((10, 12, 16, 14), 12)],
    1: [((0, 12, 2, 14), 4), ((7, 0, 8, 1), 1)],
}


def rectangle_maps():
    maps = np.full((2, 16, 16), 0.5)
    for image, rows, cols, score in RECTANGLES:
        maps[image, rows, cols] = score
    maps[0, 3, 4] = 5.5  # a peak inside the first rectangle
    return maps


def test_regions_have_the_hand_counted_boxes_areas_and_scores():
    maps = rectangle_maps()
    regions = defect_regions(maps, 2.0)
    for image, expected in EXPECTED.items():
        got = [((r.row_min, r.col_min, r.row_max, r.col_max), r.area) for r in regions[image]]
        assert got == expected
    first = regions[0][0]
    assert first.peak_score == 5.5
    assert first.mean_score == pytest.approx((17 * 4.0 + 5.5) / 18)
    assert (first.centroid_row, first.centroid_col) == (3.0, 5.5)
    assert first.peak_relative == 5.5 / 2.0
    assert first.peak_normalized == pytest.approx(5.5 / 7.5)
    assert [r.label for r in regions[1]] == [1, 2] and {r.image for r in regions[1]} == {1}


def test_regions_agree_with_scipy_labelling_of_each_map_on_random_blobs():
    rng = np.random.default_rng(0)
    maps = ndimage.gaussian_filter(rng.normal(size=(5, 40, 30)), sigma=(0, 2, 2))
    threshold = float(np.quantile(maps, 0.9))
    regions = defect_regions(maps, threshold)
    for image, found in enumerate(regions):
        labels, n = ndimage.label(maps[image] >= threshold, structure=np.ones((3, 3)))
        boxes = ndimage.find_objects(labels)
        expected = sorted(
            (
                (box[0].start, box[1].start, box[0].stop, box[1].stop),
                int((labels == k + 1).sum()),
                float(maps[image][labels == k + 1].max()),
            )
            for k, box in enumerate(boxes)
        )
        got = sorted(
            ((r.row_min, r.col_min, r.row_max, r.col_max), r.area, r.peak_score) for r in found
        )
        assert len(got) == n > 0
        assert got == expected


def test_min_area_and_connectivity():
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = maps[0, 2, 2] = 1.0  # diagonal neighbours
    maps[0, 4, 3:6] = 1.0
    assert [r.area for r in defect_regions(maps, 0.5)[0]] == [2, 3]
    assert [r.area for r in defect_regions(maps, 0.5, connectivity=1)[0]] == [1, 1, 3]
    assert [r.area for r in defect_regions(maps, 0.5, min_area=3)[0]] == [3]
    assert defect_regions(maps[0], 2.0) == [[]]  # one map, nothing above


@pytest.mark.parametrize("min_area", [0, 2.5, "3", True])
def test_min_area_that_is_not_a_positive_int_is_refused(min_area):
    with pytest.raises(ValueError, match="min_area must be an int >= 1"):
        defect_regions(np.zeros((1, 4, 4)), 0.5, min_area=min_area)


@pytest.mark.parametrize("threshold", [0, -1.0, np.nan])
def test_a_threshold_that_is_not_positive_is_refused(threshold):
    with pytest.raises(ValueError, match="positive"):
        defect_regions(np.zeros((1, 4, 4)), threshold)


# ---------------------------------------------------------------- readable scores


def test_normalized_score_is_one_half_at_the_threshold_and_increasing():
    threshold = 13.6
    assert normalized_score(threshold, threshold) == 0.5
    assert relative_score(threshold, threshold) == 1.0
    scores = np.linspace(0, 50 * threshold, 2001)
    normalized = normalized_score(scores, threshold)
    assert np.all(np.diff(normalized) > 0)
    assert normalized[0] == 0 and normalized[-1] < 1
    # The verdict is kept: past the threshold exactly when past 0.5.
    np.testing.assert_array_equal(normalized >= 0.5, scores >= threshold)
    relative = relative_score(scores, threshold)
    np.testing.assert_allclose(normalized, relative / (1 + relative))


# ------------------------------------------------- the good-only pixel threshold

SIZE = 32


@pytest.fixture(scope="module")
def good_images():
    rng = np.random.default_rng(1)
    return np.stack([smooth_texture(rng, SIZE) for _ in range(60)])


@pytest.fixture(scope="module")
def pipeline(good_images):
    pipe = padim_pipeline(weights=None, image_size=SIZE, n_features=10, random_state=0)
    return pipe.fit(good_images[:20])


def test_good_only_threshold_gives_the_requested_false_positive_rate_on_new_good_images(
    pipeline, good_images
):
    quantile = 0.99
    calibrator = QuantileThresholdCalibrator(pipeline, quantile=quantile)
    calibrator.fit(good_images[20:40])
    assert calibrator.false_positive_rate_ == pytest.approx(1 - quantile, abs=1e-3)
    # On other good images, unseen by both the fit and the calibration: about 1 %.
    rate = float(np.mean(calibrator.predict_masks(good_images[40:])))
    assert 0.004 <= rate <= 0.025, rate
    assert calibrator.threshold_ == pipeline[-1].threshold_  # the image verdict is kept
    maps = pipeline.score_samples(good_images[20:40])
    assert calibrator.pixel_threshold_ == good_pixel_threshold(maps, quantile)


def test_a_model_straight_from_fit_gives_regions_at_its_pixel_threshold(pipeline, good_images):
    test = good_images[40:43].copy()
    test[0, 8:16, 8:16] = 255
    threshold = pipeline[-1].pixel_threshold_
    assert pixel_threshold_of(pipeline) == threshold
    maps = pipeline.score_samples(test)
    assert predict_regions(pipeline, test) == defect_regions(maps, threshold)
    regions = predict_regions(pipeline, test, min_area=4)[0]
    assert any(r.row_min <= 12 < r.row_max and r.col_min <= 12 < r.col_max for r in regions)


def test_calibrators_cut_regions_at_their_pixel_threshold(pipeline, good_images):
    calibrator = QuantileThresholdCalibrator(pipeline, quantile=0.999).fit(good_images[20:40])
    test = good_images[40:42]
    maps = pipeline.score_samples(test)
    assert calibrator.regions(test) == defect_regions(maps, calibrator.pixel_threshold_)
    assert predict_regions(calibrator, test) == calibrator.regions(test)
    # An image-level F1 calibrator uses the detector's pixel threshold from fit.
    f1 = F1ThresholdCalibrator(pipeline).fit(good_images[40:44], [0, 0, 1, 1])
    assert f1.pixel_threshold_ == pipeline[-1].pixel_threshold_
    assert f1.regions(test) == defect_regions(maps, pipeline[-1].pixel_threshold_)


def test_quantile_calibration_needs_a_fitted_model_and_a_valid_quantile():
    with pytest.raises(ValueError, match="fitted"):
        QuantileThresholdCalibrator(PadimDetector()).fit(np.zeros((3, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="quantile"):
        good_pixel_threshold(np.zeros((2, 4, 4)), 1.0)
