import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer
from sk_padim.plotting import (
    AnomalyMapDisplay,
    ImageScoreDisplay,
    check_matplotlib,
    new_map_axes,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_anomaly_map_display_draws_the_three_panels(picture):
    image, anomaly_map, mask = picture
    display = AnomalyMapDisplay.from_predictions(image, anomaly_map, mask=mask, threshold=3.0)
    assert len(display.ax_) == 3 and display.figure_ is display.ax_[0].figure
    np.testing.assert_array_equal(display.im_.get_array(), image)
    np.testing.assert_array_equal(display.heatmap_.get_array(), anomaly_map)
    # The map is stretched over the whole image although it has half its resolution.
    assert display.heatmap_.get_extent() == [-0.5, 47.5, 47.5, -0.5]
    # The red overlay marks exactly the map pixels >= threshold: the hot block.
    red = display.prediction_.get_array()[..., 3] > 0
    np.testing.assert_array_equal(red, anomaly_map >= 3.0)
    assert len(display.contours_) == 2


def test_ground_truth_outline_is_dashed_and_offset_outside_the_mask(picture):
    image, anomaly_map, mask = picture
    display = AnomalyMapDisplay.from_predictions(image, anomaly_map, mask=mask)
    vertices = np.concatenate(display.contours_[0].allsegs[0])
    # The True block covers pixel centres 8..19; its straight sides are outlined 2.5
    # image pixels further out, so a thin defect and the heat over it stay visible.
    np.testing.assert_allclose(vertices.min(axis=0), [5.5, 5.5])
    np.testing.assert_allclose(vertices.max(axis=0), [21.5, 21.5])
    # Round the corners too, the outline keeps its distance from every defect pixel.
    gap = np.hypot(*np.maximum(np.maximum(8 - vertices, vertices - 19), 0).T)
    assert gap.min() > 2.0
    (style,) = {tuple(s[1]) for s in display.contours_[0].get_linestyles() if s[1]}
    assert len(style) == 2  # an on-off dash pattern


def test_outline_of_a_low_resolution_mask_is_in_image_pixels(picture):
    image, anomaly_map, mask = picture
    half = mask[::2, ::2]  # 24 x 24: the block covers cells 4..9, centres 8.5..18.5
    display = AnomalyMapDisplay.from_predictions(image, anomaly_map, mask=half)
    vertices = np.concatenate(display.contours_[0].allsegs[0])
    np.testing.assert_allclose(vertices.min(axis=0), [8.5 - 2.5] * 2)
    np.testing.assert_allclose(vertices.max(axis=0), [18.5 + 2.5] * 2)


def test_without_threshold_or_mask_there_are_two_panels_and_no_outline(picture):
    image, anomaly_map, _ = picture
    display = AnomalyMapDisplay(image, anomaly_map).plot()
    assert len(display.ax_) == 2 and display.prediction_ is None and display.contours_ == []


def test_default_colour_scale_runs_from_the_median_to_the_maximum(picture):
    image, anomaly_map, _ = picture
    display = AnomalyMapDisplay.from_predictions(image, anomaly_map)
    assert display.heatmap_.norm.vmin == pytest.approx(np.median(anomaly_map))
    assert display.heatmap_.norm.vmax == pytest.approx(anomaly_map.max())


def test_plot_draws_on_given_axes_and_checks_their_number(picture):
    image, anomaly_map, _ = picture
    fig, axes = plt.subplots(1, 2)
    display = AnomalyMapDisplay(image, anomaly_map).plot(ax=axes)
    assert display.figure_ is fig
    with pytest.raises(ValueError, match="draws 3 panels but got 2 Axes"):
        AnomalyMapDisplay(image, anomaly_map, threshold=1.0).plot(ax=axes)


def test_from_estimator_shows_the_estimators_map(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=8, random_state=0)
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector())]).fit(X[:5])
    path = tmp_path / "image.png"
    Image.fromarray(X[5]).save(path)
    display = AnomalyMapDisplay.from_estimator(pipe, str(path))
    expected = pipe.score_samples(X[5:])[0]
    np.testing.assert_allclose(display.heatmap_.get_array(), expected, rtol=1e-6)
    assert display.score == pytest.approx(pipe.decision_function(X[5:])[0], rel=1e-6)
    np.testing.assert_array_equal(display.im_.get_array(), X[5])


def test_image_score_display_matches_sklearn_roc():
    y = np.array([0, 0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.8])
    display = ImageScoreDisplay.from_predictions(y, scores, threshold=0.45)
    assert display.roc_auc_ == pytest.approx(roc_auc_score(y, scores))
    assert display.roc_line_.get_xydata()[-1].tolist() == [1.0, 1.0]
    counts = {name: sum(bar.get_height() for bar in bars) for name, bars in display.hist_.items()}
    assert counts == {"normal": 4, "anomalous": 3}
    # Threshold 0.45: 1 of 4 normal images (0.5) and 2 of 3 anomalous ones are flagged.
    point = display.threshold_lines_[0].get_xydata()[0]
    np.testing.assert_allclose(point, [1 / 4, 2 / 3])


def test_image_score_display_takes_masks_as_ground_truth():
    masks = np.zeros((4, 5, 5), dtype=bool)
    masks[2:, 1, 1] = True
    display = ImageScoreDisplay.from_predictions(masks, [0.1, 0.2, 0.3, 0.4])
    assert display.roc_auc_ == 1.0


def test_missing_matplotlib_names_the_plot_extra(monkeypatch, picture):
    image, anomaly_map, _ = picture
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'sk-padim\[plot\]'"):
        AnomalyMapDisplay(image, anomaly_map).plot()
    with pytest.raises(ImportError, match=r"^my report needs matplotlib"):
        check_matplotlib("my report")


def _extent_in_pixels(artist_axes, figure):
    """The drawn extent (tick labels included) of an Axes, in display pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return artist_axes.get_tightbbox(canvas.get_renderer())


@pytest.mark.parametrize("threshold", [None, 400.0])
def test_colour_bar_and_its_labels_lie_inside_the_saved_figure(tmp_path, picture, threshold):
    image, anomaly_map, _ = picture
    big = anomaly_map * 100  # scores in the hundreds, as with real backbones: wide labels
    display = AnomalyMapDisplay.from_predictions(image, big, threshold=threshold, score=466.0)
    bar = _extent_in_pixels(display.colorbar_.ax, display.figure_)
    figure = display.figure_.bbox
    assert figure.x0 <= bar.x0 and bar.x1 <= figure.x1
    assert figure.y0 <= bar.y0 and bar.y1 <= figure.y1
    # ... and clear of the next panel when there is one.
    if threshold is not None:
        assert bar.x1 <= display.ax_[2].get_window_extent().x0


@pytest.mark.parametrize("pyplot", [True, False])
@pytest.mark.parametrize("n_panels", [2, 3])
def test_new_map_axes_fit_the_display_and_its_whole_colour_bar(picture, pyplot, n_panels):
    image, anomaly_map, _ = picture
    axes = new_map_axes(n_panels, pyplot=pyplot)
    threshold = None if n_panels == 2 else 400.0
    display = AnomalyMapDisplay.from_predictions(
        image, anomaly_map * 1000, threshold=threshold, score=466.0, ax=axes
    )
    assert display.figure_.get_size_inches().tolist() == [3.0 * n_panels, 3.6]
    bar = _extent_in_pixels(display.colorbar_.ax, display.figure_)
    right = display.figure_.bbox.x1 if n_panels == 2 else axes[2].get_window_extent().x0
    assert bar.x1 <= right
    # Without pyplot the figure is not registered: nothing to close.
    assert len(plt.get_fignums()) == (1 if pyplot else 0)


@pytest.mark.parametrize(
    ("score", "flagged"),
    [(5.0, True), (2.5, True), (2.0, False)],  # equal to the threshold is anomalous
)
def test_image_panel_states_the_verdict_and_where_the_threshold_came_from(picture, score, flagged):
    image, anomaly_map, _ = picture
    display = AnomalyMapDisplay.from_predictions(
        image, anomaly_map, threshold=2.5, score=score, threshold_source="given"
    )
    verdict, readable, source = display.ax_[0].get_title().splitlines()
    word, sign = ("FLAGGED", ">=") if flagged else ("normal", "<")
    assert verdict == f"{word}: score {score:g} {sign} 2.5"
    # Beside the raw score: score / threshold, and score / (score + threshold).
    relative, normalized = {5.0: ("2", "0.67"), 2.5: ("1", "0.50"), 2.0: ("0.8", "0.44")}[score]
    assert readable == f"{relative}x the threshold, normalized {normalized}"
    assert source == "threshold: given"
    red = matplotlib.colors.to_rgb(display.ax_[0].title.get_color())[0] > 0.5
    assert red == flagged


def test_without_a_threshold_there_is_no_verdict(picture):
    image, anomaly_map, _ = picture
    display = AnomalyMapDisplay.from_predictions(image, anomaly_map, score=3.0)
    assert display.ax_[0].get_title() == "image"
    assert display.ax_[1].get_title() == "anomaly map, score 3"


def test_regions_are_boxed_on_the_prediction_panel_at_the_pixel_threshold():
    from sk_padim.regions import defect_regions

    image = np.full((64, 64), 120, dtype=np.uint8)
    anomaly_map = np.zeros((32, 32))  # half the image's size: boxes are scaled by 2
    anomaly_map[4:8, 10:16] = 3.0
    anomaly_map[20:22, 2:4] = 1.5
    (regions,) = defect_regions(anomaly_map[None], 1.0)
    display = AnomalyMapDisplay.from_predictions(
        image, anomaly_map, threshold=10.0, score=3.0, pixel_threshold=1.0, regions=regions
    )
    assert len(display.ax_) == 3
    assert display.ax_[2].get_title() == "in red: map >= 1, 2 regions"
    boxes = [(b.get_x(), b.get_y(), b.get_width(), b.get_height()) for b in display.boxes_]
    assert boxes == [(19.5, 7.5, 12.0, 8.0), (3.5, 39.5, 4.0, 4.0)]
    assert [b.axes for b in display.boxes_] == [display.ax_[2]] * 2
    plt.close("all")
