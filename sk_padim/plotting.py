"""Pictures of anomaly maps and image scores, in scikit-learn's Display style.

matplotlib is imported only when something is drawn; install it with the ``plot`` extra,
``pip install 'sk-padim[plot]'``. This module sits on top of the estimators: the core
never imports it.

- :class:`AnomalyMapDisplay`: one image, its anomaly map over it, the ground-truth
  defect outline and the thresholded map.
- :class:`ImageScoreDisplay`: the image-level ROC curve and the histograms of the
  image scores of normal and anomalous images.
- :func:`new_map_axes`: a new figure laid out for an :class:`AnomalyMapDisplay`.

:mod:`sk_padim.heatmaps` writes the pictures to files.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import roc_curve

from sk_padim._checks import image_labels
from sk_padim.core.images import check_images, read_image
from sk_padim.metrics import image_auroc
from sk_padim.regions import normalized_score, relative_score

__all__ = [
    "AnomalyMapDisplay",
    "ImageScoreDisplay",
    "check_matplotlib",
    "new_map_axes",
]

_PANEL_INCHES = 3.0
_TITLE_INCHES = 0.6  # above the panels: room for a two-line title
# Fixed layouts (fractions of the figure): faster than a layout engine, and the pictures
# keep their size. Maps need room for titles and, right of the map panel (the second),
# for its colour bar and tick labels; plots need room for axis labels.
_COLORBAR_INCHES = 0.65
_MAP_LAYOUT = {"left": 0.01, "right": 0.99, "bottom": 0.02, "wspace": 0.3}
_PLOT_LAYOUT = {"left": 0.1, "right": 0.97, "bottom": 0.15, "wspace": 0.35}
_TRUTH_COLOR = "white"
_TRUTH_OFFSET = 2.5  # image pixels between a defect and its outline, so thin defects show
_PREDICTION_COLOR = (1.0, 0.1, 0.1)
_FLAGGED_COLOR = (0.8, 0.0, 0.0)
_BOX_COLOR = (1.0, 0.85, 0.0)


def check_matplotlib(caller: str) -> None:
    """Raise an ImportError saying how to install matplotlib if it is missing.

    Call it before long work whose end is a picture, to fail at once.

    Parameters
    ----------
    caller : str
        What needs matplotlib, named in the message.

    Raises
    ------
    ImportError
        If ``matplotlib.pyplot`` cannot be imported; the message names the ``plot``
        extra.

    Examples
    --------
    >>> from sk_padim.plotting import check_matplotlib
    >>> check_matplotlib("my report")  # matplotlib is installed: nothing happens
    """
    _pyplot(caller)


def _pyplot(caller: str):
    """matplotlib.pyplot, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            f"{caller} needs matplotlib: pip install 'sk-padim[plot]' (or pip install matplotlib)."
        ) from error
    return plt


def _new_axes(caller: str, n_panels: int, layout: dict, *, pyplot: bool) -> np.ndarray:
    """``n_panels`` Axes side by side on a new figure of fixed layout, registered with
    pyplot if ``pyplot``."""
    plt = _pyplot(caller)
    figsize = (_PANEL_INCHES * n_panels, _PANEL_INCHES + _TITLE_INCHES)
    layout = {**layout, "top": 1 - _TITLE_INCHES / figsize[1]}
    if pyplot:
        figure = plt.figure(figsize=figsize)
    else:
        from matplotlib.figure import Figure

        figure = Figure(figsize=figsize)
    return figure.subplots(1, n_panels, squeeze=False, gridspec_kw=layout)[0]


def new_map_axes(n_panels: int, *, pyplot: bool = True) -> np.ndarray:
    """Make Axes side by side on a new figure laid out for an :class:`AnomalyMapDisplay`.

    The figure is 3 inches per panel by 3.6 inches, with room above the panels for
    their titles and right of the map panel (the second) for its colour bar. Pass the
    Axes as ``ax`` to :meth:`AnomalyMapDisplay.plot` or
    :meth:`AnomalyMapDisplay.from_predictions`.

    Parameters
    ----------
    n_panels : int
        Number of panels: 2, or 3 with a threshold (see :class:`AnomalyMapDisplay`).
    pyplot : bool, default=True
        Register the figure with pyplot. With ``pyplot=False`` the figure is not
        registered: no GUI backend is touched and nothing needs closing, which suits
        writing files in a loop.

    Returns
    -------
    axes : ndarray of shape (n_panels,) of matplotlib Axes
        The panels, left to right, all on one new figure.

    Examples
    --------
    >>> from sk_padim.plotting import new_map_axes
    >>> axes = new_map_axes(3, pyplot=False)
    >>> len(axes), axes[0].figure.get_size_inches().tolist()
    (3, [9.0, 3.6])
    """
    layout = _MAP_LAYOUT
    if n_panels <= 2:  # the map panel is the last one: room on its right for the colour bar
        layout = {**_MAP_LAYOUT, "right": 1 - _COLORBAR_INCHES / (_PANEL_INCHES * n_panels)}
    return _new_axes("AnomalyMapDisplay", n_panels, layout, pyplot=pyplot)


def _check_axes(ax, n_panels: int, caller: str) -> np.ndarray:
    """The given ``ax`` as an array of ``n_panels`` Axes."""
    axes = np.ravel(np.asarray(ax, dtype=object))
    if axes.size != n_panels:
        raise ValueError(
            f"{caller} draws {n_panels} panels but got {axes.size} Axes; pass ax as a "
            f"sequence of {n_panels} Axes, or ax=None for a new figure."
        )
    return axes


def _display_image(image) -> np.ndarray:
    """One image (array, file path or PIL image) as an array ``imshow`` can draw."""
    (item,) = check_images([image])
    array = np.asarray(item) if isinstance(item, np.ndarray) else read_image(item)
    return array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array


def _pixel_centres(n_in: int, n_out: int) -> np.ndarray:
    """Centres of ``n_in`` pixels spread over ``n_out`` image pixels, in image coordinates."""
    return (np.arange(n_in) + 0.5) * n_out / n_in - 0.5


class AnomalyMapDisplay:
    """Anomaly map visualisation of one image.

    Draws up to three panels side by side:

    1. the image, titled with the verdict when ``score`` and ``threshold`` are given:
       flagged anomalous (``score >= threshold``, in red) or not, the two numbers and
       where the threshold came from (``threshold_source``);
    2. the anomaly map over the image (higher = more anomalous, hotter colours) and its
       colour bar, with the ground-truth defect outlined;
    3. the predicted defect, the map ``>= pixel_threshold`` (``threshold`` if not
       given), in red over the image, with the ground truth outlined and the defect
       regions boxed (only when a threshold is given).

    With a score and a threshold, the verdict in the first panel's title gives the score
    beside the threshold as ``relative`` (``score / threshold``, 1 on the line) and
    ``normalized`` (``score / (score + threshold)``, 0.5 on the line; not a probability),
    see :mod:`sk_padim.regions`.

    The outline is drawn a few pixels outside the defect, dashed, so that it hides
    neither a thin defect nor the heat over it. The map is stretched over the image
    when their sizes differ, and so is the mask.
    Use :meth:`from_estimator` or :meth:`from_predictions` to make one; all parameters
    are stored as attributes.

    Parameters
    ----------
    image : ndarray of shape (H, W) or (H, W, 3), file path or PIL image
        The image, uint8 (0-255) or float (0-1) pixels.
    anomaly_map : ndarray of shape (H', W')
        Pixel anomaly scores of the image, e.g. from ``score_samples``.
    mask : ndarray of shape (H'', W''), default=None
        Ground-truth defect mask (nonzero = defective), outlined in white.
    threshold : float, default=None
        The image threshold of the verdict (``score >= threshold``), and the pixel
        threshold of the third panel unless ``pixel_threshold`` is given. ``None``
        leaves out the verdict and, without ``pixel_threshold``, the third panel.
    pixel_threshold : float, default=None
        Pixels whose score is ``>=`` it are predicted defective (third panel).
    regions : sequence of sk_padim.regions.Region, default=None
        Defect regions of the map (:func:`sk_padim.regions.defect_regions`), drawn as
        boxes with their peak's relative score on the third panel (on the map panel
        without one).
    score : float, default=None
        Image anomaly score, shown in the titles.
    threshold_source : str, default=None
        Where ``threshold`` came from, shown in the verdict, e.g. ``"calibrated, best
        image F1"`` or ``"the model's own"``; short (about 25 characters) to fit the
        panel. None says ``"given"``.
    vmin, vmax : float, default=None
        Scores mapped to the ends of the colour map; by default the map's median (a
        typical normal pixel) and maximum. The overlay is transparent at ``vmin`` and
        below. Give several images the same values to compare them.

    Attributes
    ----------
    im_ : matplotlib.image.AxesImage
        The image in the first panel.
    heatmap_ : matplotlib.image.AxesImage
        The anomaly map overlay.
    colorbar_ : matplotlib.colorbar.Colorbar
        Colour scale of the anomaly map.
    prediction_ : matplotlib.image.AxesImage or None
        The red predicted-defect overlay; None without a threshold.
    boxes_ : list of matplotlib.patches.Rectangle
        The regions' boxes; empty without ``regions``.
    contours_ : list of matplotlib.contour.QuadContourSet
        The ground-truth outlines, one per panel that shows them; empty without
        ``mask``.
    ax_ : ndarray of matplotlib Axes
        The panels.
    figure_ : matplotlib Figure
        The figure holding the panels.

    See Also
    --------
    sk_padim.heatmaps.save_heatmaps : Write one such picture per image.
    ImageScoreDisplay : Image-level ROC curve and score histograms.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sk_padim.plotting import AnomalyMapDisplay
    >>> image = np.full((64, 64), 128, dtype=np.uint8)
    >>> anomaly_map = np.zeros((64, 64))
    >>> anomaly_map[20:30, 20:30] = 5.0
    >>> display = AnomalyMapDisplay.from_predictions(
    ...     image, anomaly_map, mask=anomaly_map > 0, threshold=2.5)
    >>> len(display.ax_), len(display.contours_)
    (3, 2)
    >>> display.ax_[0].get_title()
    'image'
    >>> display = AnomalyMapDisplay.from_predictions(
    ...     image, anomaly_map, threshold=2.5, score=5.0, threshold_source="the model's own")
    >>> print(display.ax_[0].get_title())
    FLAGGED: score 5 >= 2.5
    2x the threshold, normalized 0.67
    threshold: the model's own
    """

    def __init__(
        self,
        image,
        anomaly_map: ArrayLike,
        *,
        mask: ArrayLike | None = None,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        regions=None,
        score: float | None = None,
        threshold_source: str | None = None,
        vmin: float | None = None,
        vmax: float | None = None,
    ):
        self.image = image
        self.anomaly_map = anomaly_map
        self.mask = mask
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.regions = regions
        self.score = score
        self.threshold_source = threshold_source
        self.vmin = vmin
        self.vmax = vmax

    def plot(self, ax=None, *, cmap: str = "jet", alpha: float = 0.7) -> AnomalyMapDisplay:
        """Draw the panels.

        Parameters
        ----------
        ax : sequence of matplotlib Axes, default=None
            One Axes per panel (2, or 3 with ``threshold``). ``None`` makes a new
            pyplot figure.
        cmap : str, default="jet"
            Colour map of the anomaly map.
        alpha : float, default=0.7
            Opacity of the anomaly map over the image at ``vmax``; lower scores are
            drawn more transparent, down to invisible at ``vmin``.

        Returns
        -------
        display : AnomalyMapDisplay
            This object, with the artists stored as attributes.
        """
        image = _display_image(self.image)
        anomaly_map = np.asarray(self.anomaly_map, dtype=float)
        if anomaly_map.ndim != 2:
            raise ValueError(
                f"anomaly_map must have shape (H, W); got {anomaly_map.shape}. Pass one "
                "image's map, e.g. score_samples(X)[i]."
            )
        cut = self.threshold if self.pixel_threshold is None else self.pixel_threshold
        n_panels = 2 if cut is None else 3
        self.ax_ = (
            new_map_axes(n_panels) if ax is None else _check_axes(ax, n_panels, "AnomalyMapDisplay")
        )
        self.figure_ = self.ax_[0].figure
        height, width = image.shape[:2]
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        grey = {"cmap": "gray", "vmin": 0, "vmax": 1 if image.dtype.kind == "f" else 255}
        self.im_ = self.ax_[0].imshow(image, **grey)
        self._set_verdict(self.ax_[0])

        self.ax_[1].imshow(image, **grey)
        self.heatmap_ = self._plot_heatmap(self.ax_[1], anomaly_map, extent, cmap, alpha)
        # The colour bar sits in the gap right of the panel (the layouts of new figures
        # leave room for it), so all panels keep one size.
        colorbar_ax = self.ax_[1].inset_axes((1.02, 0.1, 0.04, 0.8))
        self.colorbar_ = self.figure_.colorbar(self.heatmap_, cax=colorbar_ax)
        title = "anomaly map" if self.score is None else f"anomaly map, score {self.score:.3g}"
        self.ax_[1].set_title(title)

        self.prediction_ = None
        if cut is not None:
            self.prediction_ = self._plot_prediction(
                self.ax_[2], image, anomaly_map, extent, grey, cut
            )
        self.contours_ = []
        if self.mask is not None:
            self.contours_ = [self._plot_truth(axes, height, width) for axes in self.ax_[1:]]
        scale = (height / anomaly_map.shape[0], width / anomaly_map.shape[1])
        self.boxes_ = [self._plot_box(self.ax_[-1], region, scale) for region in self.regions or ()]
        for axes in self.ax_:
            axes.set_axis_off()
        return self

    def _set_verdict(self, axes) -> None:
        """Title the image panel with the verdict, when there is one to give."""
        if self.score is None or self.threshold is None:
            axes.set_title("image")
            return
        flagged = self.score >= self.threshold
        verdict = (
            f"FLAGGED: score {self.score:.4g} >= {self.threshold:.4g}"
            if flagged
            else f"normal: score {self.score:.4g} < {self.threshold:.4g}"
        )
        if self.threshold > 0:
            relative = float(relative_score(self.score, self.threshold))
            normalized = float(normalized_score(self.score, self.threshold))
            verdict += f"\n{relative:.3g}x the threshold, normalized {normalized:.2f}"
        source = f"threshold: {self.threshold_source or 'given'}"
        color = _FLAGGED_COLOR if flagged else "black"
        axes.set_title(f"{verdict}\n{source}", color=color, fontsize=9)

    def _plot_heatmap(self, axes, anomaly_map, extent, cmap, alpha):
        from matplotlib.colors import Normalize

        norm = Normalize(
            np.median(anomaly_map) if self.vmin is None else self.vmin,
            anomaly_map.max() if self.vmax is None else self.vmax,
        )
        # Opacity grows with the score: normal regions stay visible, defects glow.
        opacity = alpha * np.clip(norm(anomaly_map), 0, 1)
        return axes.imshow(
            anomaly_map,
            cmap=cmap,
            norm=norm,
            alpha=opacity,
            extent=extent,
            interpolation="bilinear",
        )

    def _plot_prediction(self, axes, image, anomaly_map, extent, grey, cut):
        predicted = anomaly_map >= cut
        overlay = np.zeros((*predicted.shape, 4))
        overlay[predicted] = (*_PREDICTION_COLOR, 0.55)
        axes.imshow(image, **grey)
        boxed = ""
        if self.regions is not None:
            boxed = f", {len(self.regions)} region{'' if len(self.regions) == 1 else 's'}"
        axes.set_title(f"in red: map >= {cut:.4g}{boxed}")
        return axes.imshow(overlay, extent=extent, interpolation="nearest")

    def _plot_box(self, axes, region, scale):
        """A region's box (in image pixels) and its peak's relative score."""
        from matplotlib.patches import Rectangle

        top = region.row_min * scale[0] - 0.5
        left = region.col_min * scale[1] - 0.5
        box = Rectangle(
            (left, top),
            (region.col_max - region.col_min) * scale[1],
            (region.row_max - region.row_min) * scale[0],
            fill=False,
            edgecolor=_BOX_COLOR,
            linewidth=1.2,
        )
        axes.add_patch(box)
        axes.text(
            left,
            top - 1,
            f"{region.peak_relative:.2g}x",
            color=_BOX_COLOR,
            fontsize=7,
            va="bottom",
            clip_on=True,
        )
        return box

    def _plot_truth(self, axes, height: int, width: int):
        """The ground-truth outline, ``_TRUTH_OFFSET`` image pixels outside the defect."""
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (H, W); got {mask.shape}.")
        rows = _pixel_centres(mask.shape[0], height)
        cols = _pixel_centres(mask.shape[1], width)
        # Distance (in image pixels) of each mask pixel's centre to the defect's nearest
        # pixel centre; the outline is the level at which that distance is the offset.
        scale = (height / mask.shape[0], width / mask.shape[1])
        distance = ndimage.distance_transform_edt(mask == 0, sampling=scale)
        return axes.contour(
            cols,
            rows,
            distance,
            levels=[_TRUTH_OFFSET],
            colors=_TRUTH_COLOR,
            linewidths=1.0,
            linestyles="--",
        )

    @classmethod
    def from_predictions(
        cls,
        image,
        anomaly_map: ArrayLike,
        *,
        mask: ArrayLike | None = None,
        threshold: float | None = None,
        score: float | None = None,
        threshold_source: str | None = None,
        vmin: float | None = None,
        vmax: float | None = None,
        pixel_threshold: float | None = None,
        regions=None,
        ax=None,
        cmap: str = "jet",
        alpha: float = 0.7,
    ) -> AnomalyMapDisplay:
        """Draw an anomaly map that was already computed.

        Parameters
        ----------
        image : ndarray of shape (H, W) or (H, W, 3), file path or PIL image
            The image.
        anomaly_map : ndarray of shape (H', W')
            Its anomaly map.
        mask : ndarray of shape (H'', W''), default=None
            Ground-truth defect mask, outlined (see :class:`AnomalyMapDisplay`).
        threshold : float, default=None
            The image threshold of the verdict (see :class:`AnomalyMapDisplay`).
        score : float, default=None
            The image anomaly score, shown in the titles.
        threshold_source : str, default=None
            Where ``threshold`` came from, shown in the verdict.
        vmin, vmax : float, default=None
            Scores mapped to the ends of the colour map (see :class:`AnomalyMapDisplay`).
        pixel_threshold : float, default=None
            Pixels scoring ``>=`` it are predicted defective (third panel).
        regions : sequence of sk_padim.regions.Region, default=None
            Defect regions, drawn as boxes.
        ax : sequence of matplotlib Axes, default=None
            Where to draw (see :meth:`plot`).
        cmap : str, default="jet"
            The colour map of the overlay.
        alpha : float, default=0.7
            The overlay's opacity at the highest scores.

        Returns
        -------
        display : AnomalyMapDisplay
            The display, drawn.
        """
        display = cls(
            image,
            anomaly_map,
            mask=mask,
            threshold=threshold,
            score=score,
            threshold_source=threshold_source,
            vmin=vmin,
            vmax=vmax,
            pixel_threshold=pixel_threshold,
            regions=regions,
        )
        return display.plot(ax=ax, cmap=cmap, alpha=alpha)

    @classmethod
    def from_estimator(
        cls,
        estimator,
        image,
        *,
        mask: ArrayLike | None = None,
        threshold: float | None = None,
        threshold_source: str | None = None,
        vmin: float | None = None,
        vmax: float | None = None,
        ax=None,
        cmap: str = "jet",
        alpha: float = 0.7,
    ) -> AnomalyMapDisplay:
        """Score one image with a fitted detector and draw its anomaly map.

        Parameters
        ----------
        estimator : fitted estimator
            A Pipeline of ``PatchFeatureTransformer`` and ``PadimDetector`` (or any
            estimator whose ``score_samples`` maps images to anomaly maps).
        image : ndarray of shape (H, W) or (H, W, 3), file path or PIL image
            The image.
        mask : ndarray of shape (H'', W''), default=None
            Ground-truth defect mask, outlined (see :class:`AnomalyMapDisplay`).
        threshold : float, default=None
            The image threshold of the verdict (see :class:`AnomalyMapDisplay`).
        threshold_source : str, default=None
            Where ``threshold`` came from, shown in the verdict.
        vmin, vmax : float, default=None
            Scores mapped to the ends of the colour map (see :class:`AnomalyMapDisplay`).
        ax : sequence of matplotlib Axes, default=None
            Where to draw (see :meth:`plot`).
        cmap : str, default="jet"
            The colour map of the overlay.
        alpha : float, default=0.7
            The overlay's opacity at the highest scores.

        Returns
        -------
        display : AnomalyMapDisplay
            The display, drawn; the image score shown is the map's maximum.
        """
        anomaly_map = estimator.score_samples([image])[0]
        return cls.from_predictions(
            image,
            anomaly_map,
            mask=mask,
            threshold=threshold,
            score=float(anomaly_map.max()),
            threshold_source=threshold_source,
            vmin=vmin,
            vmax=vmax,
            ax=ax,
            cmap=cmap,
            alpha=alpha,
        )


class ImageScoreDisplay:
    """Image-level evaluation: the ROC curve and the score histograms by class.

    Use :meth:`from_estimator` or :meth:`from_predictions` to make one; all parameters
    are stored as attributes.

    Parameters
    ----------
    y_true : array-like of shape (n,) or (n, H, W)
        Image labels (1 = anomalous) or pixel masks (an image is anomalous if its mask
        has a nonzero pixel).
    scores : array-like of shape (n,)
        Image anomaly scores, higher = more anomalous.
    threshold : float, default=None
        A decision threshold, drawn on the histograms and as a point on the ROC curve
        (images scoring ``>=`` it are anomalous).

    Attributes
    ----------
    fpr_, tpr_ : ndarray
        The ROC curve, from :func:`sklearn.metrics.roc_curve`.
    roc_auc_ : float
        Image AUROC.
    roc_line_ : matplotlib Line2D
        The ROC curve.
    hist_ : dict of str to matplotlib BarContainer
        The histograms, keys ``"normal"`` and ``"anomalous"``.
    threshold_lines_ : list of matplotlib Artists
        The threshold point on the ROC curve and line on the histograms; empty
        without ``threshold``.
    ax_ : ndarray of matplotlib Axes
        The ROC panel and the histogram panel.
    figure_ : matplotlib Figure
        The figure holding them.

    See Also
    --------
    sklearn.metrics.RocCurveDisplay : The ROC curve alone.
    AnomalyMapDisplay : Pixel-level pictures of one image.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sk_padim.plotting import ImageScoreDisplay
    >>> display = ImageScoreDisplay.from_predictions(
    ...     [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], threshold=0.5)
    >>> display.roc_auc_
    0.75
    """

    def __init__(self, y_true: ArrayLike, scores: ArrayLike, *, threshold: float | None = None):
        self.y_true = y_true
        self.scores = scores
        self.threshold = threshold

    def plot(self, ax=None, *, bins: int = 20) -> ImageScoreDisplay:
        """Draw the ROC curve and the histograms.

        Parameters
        ----------
        ax : sequence of two matplotlib Axes, default=None
            Where to draw the ROC curve and the histograms. ``None`` makes a new pyplot
            figure.
        bins : int, default=20
            Number of histogram bins, shared by both classes.

        Returns
        -------
        display : ImageScoreDisplay
            This object, with the artists stored as attributes.
        """
        labels = image_labels(self.y_true)
        scores = np.asarray(self.scores, dtype=float)
        self.roc_auc_ = image_auroc(labels, scores)
        self.fpr_, self.tpr_, _ = roc_curve(labels, scores)
        self.ax_ = (
            _new_axes("ImageScoreDisplay", 2, _PLOT_LAYOUT, pyplot=True)
            if ax is None
            else _check_axes(ax, 2, "ImageScoreDisplay")
        )
        self.figure_ = self.ax_[0].figure
        roc_ax, hist_ax = self.ax_

        (self.roc_line_,) = roc_ax.plot(self.fpr_, self.tpr_, label=f"AUROC {self.roc_auc_:.3f}")
        roc_ax.plot([0, 1], [0, 1], "k:", linewidth=1)
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
        roc_ax.set_aspect("equal")

        edges = np.histogram_bin_edges(scores, bins=bins)
        self.hist_ = {
            name: hist_ax.hist(scores[selected], bins=edges, alpha=0.6, label=name)[2]
            for name, selected in (("normal", ~labels), ("anomalous", labels))
        }
        hist_ax.set(xlabel="image anomaly score", ylabel="images", title="image scores")

        self.threshold_lines_ = []
        if self.threshold is not None:
            predicted = scores >= self.threshold
            point = (predicted[~labels].mean(), predicted[labels].mean())
            self.threshold_lines_ = [
                roc_ax.plot(*point, "o", color="k", label=f"threshold {self.threshold:.3g}")[0],
                hist_ax.axvline(self.threshold, color="k", linestyle="--", label="threshold"),
            ]
        roc_ax.legend(loc="lower right")
        hist_ax.legend()
        return self

    @classmethod
    def from_predictions(
        cls,
        y_true: ArrayLike,
        scores: ArrayLike,
        *,
        threshold: float | None = None,
        ax=None,
        bins: int = 20,
    ) -> ImageScoreDisplay:
        """Draw image scores that were already computed.

        Parameters
        ----------
        y_true : array-like of shape (n,) or (n, H, W)
            Image labels (1 = anomalous) or pixel masks.
        scores : array-like of shape (n,)
            Image anomaly scores, higher = more anomalous.
        threshold : float, default=None
            A decision threshold to draw (see :class:`ImageScoreDisplay`).
        ax : sequence of two matplotlib Axes, default=None
            Where to draw (see :meth:`plot`).
        bins : int, default=20
            Histogram bins.

        Returns
        -------
        display : ImageScoreDisplay
            The display, drawn.
        """
        return cls(y_true, scores, threshold=threshold).plot(ax=ax, bins=bins)

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X,
        y: ArrayLike,
        *,
        threshold: float | None = None,
        ax=None,
        bins: int = 20,
    ) -> ImageScoreDisplay:
        """Score images with a fitted detector and draw the image-level evaluation.

        Parameters
        ----------
        estimator : fitted estimator
            Anything with ``decision_function(X) -> (n,)`` image anomaly scores, e.g. a
            Pipeline of ``PatchFeatureTransformer`` and ``PadimDetector``.
        X : array-like or list
            The images, whatever ``estimator`` takes.
        y : array-like of shape (n,) or (n, H, W)
            Image labels or pixel masks.
        threshold : float, default=None
            A decision threshold to draw (see :class:`ImageScoreDisplay`).
        ax : sequence of two matplotlib Axes, default=None
            Where to draw (see :meth:`plot`).
        bins : int, default=20
            Histogram bins.

        Returns
        -------
        display : ImageScoreDisplay
        """
        scores = estimator.decision_function(X)
        return cls.from_predictions(y, scores, threshold=threshold, ax=ax, bins=bins)
