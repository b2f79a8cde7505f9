"""Heat-map pictures written to files: an anomaly map over its image, one PNG per image.

- :func:`save_heatmaps`: an :class:`~sk_padim.plotting.AnomalyMapDisplay` PNG file per
  image, all on one colour scale.
- :func:`heatmap_writer`: pictures and defect regions of each category that
  :func:`sk_padim.evaluation.evaluate` scores.

The drawing is :mod:`sk_padim.plotting`'s; matplotlib is needed (the ``plot`` extra,
``pip install 'sk-padim[plot]'``). The files are written whole or not at all
(:func:`sk_padim.files.atomic_file`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from sk_padim.calibration import f1_optimal_threshold
from sk_padim.core.images import check_images
from sk_padim.evaluation import Category
from sk_padim.files import atomic_file
from sk_padim.plotting import AnomalyMapDisplay, check_matplotlib, new_map_axes
from sk_padim.regions import defect_regions

__all__ = ["heatmap_writer", "save_heatmaps"]


def save_heatmaps(
    images,
    maps: ArrayLike,
    folder: str | os.PathLike,
    *,
    masks: ArrayLike | Sequence[ArrayLike] | None = None,
    threshold: float | None = None,
    threshold_source: str | None = None,
    names: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    dpi: int = 100,
    pixel_threshold: float | None = None,
    regions: Sequence | None = None,
) -> list[Path]:
    """Write one :class:`~sk_padim.plotting.AnomalyMapDisplay` PNG file per image.

    All pictures share one colour scale, so a normal image looks cool and a defect
    stands out hot: by default from the median of all the maps' pixels (a typical
    normal pixel, drawn transparent) to their maximum. The image score shown is the
    map's maximum (PaDiM's image score); with a threshold, each picture says whether the
    image is flagged (``score >= threshold``). Each PNG is 3 inches per panel by 3.6
    inches at ``dpi``, whatever the image size: 900 x 360 pixels for three panels at
    the default 100 dpi.

    Parameters
    ----------
    images : ndarray of shape (n, H, W[, C]) or list
        The images: an array, or a list of arrays, file paths or PIL images.
    maps : array-like of shape (n, H', W')
        Their anomaly maps, e.g. ``score_samples(images)``.
    folder : str or path-like
        Where to write; created if needed. Existing files of the same names are
        replaced.
    masks : array-like of shape (n, H'', W'') or list of (H_i, W_i) arrays, default=None
        Ground-truth defect masks, outlined in the pictures.
    threshold : float, default=None
        Threshold of the verdict and of the predicted-defect panel; ``None`` leaves
        them out. An image is flagged when its score, the maximum of its map, is
        ``>=`` it, so exactly the flagged images have red pixels.
    threshold_source : str, default=None
        Where ``threshold`` came from, shown in the verdict.
    names : sequence of str, default=None
        File names without the ``.png`` suffix; by default ``000``, ``001``, ...
    vmin, vmax : float, default=None
        Colour scale of the maps; by default the median and the maximum of all ``maps``.
    dpi : int, default=100
        Resolution of the PNG files.
    pixel_threshold : float, default=None
        The pixel threshold of the predicted-defect panel, when it differs from
        ``threshold`` (e.g. ``PadimDetector.pixel_threshold_``).
    regions : sequence of lists of sk_padim.regions.Region, default=None
        Each image's defect regions (:func:`sk_padim.regions.defect_regions`), boxed.

    Returns
    -------
    paths : list of pathlib.Path
        The files written, in the order of ``images``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from sk_padim.heatmaps import save_heatmaps
    >>> images = np.full((2, 32, 32), 100, dtype=np.uint8)
    >>> maps = np.zeros((2, 32, 32))
    >>> maps[1, 10:20, 10:20] = 1.0
    >>> paths = save_heatmaps(images, maps, tempfile.mkdtemp(), names=["good", "bad"])
    >>> [path.name for path in paths], Image.open(paths[0]).size
    (['good.png', 'bad.png'], (600, 360))
    """
    check_matplotlib("save_heatmaps")
    images = check_images(images)
    maps = np.asarray(maps, dtype=float)
    names = [f"{i:03d}" for i in range(len(images))] if names is None else list(names)
    if not len(images) == len(maps) == len(names) or (
        masks is not None and len(masks) != len(maps)
    ):
        raise ValueError(
            f"Got {len(images)} images, {len(maps)} maps, {len(names)} names"
            + ("" if masks is None else f" and {len(masks)} masks")
            + "; pass one of each per image."
        )
    vmin = np.median(maps) if vmin is None else vmin
    vmax = maps.max() if vmax is None else vmax
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_panels = 2 if threshold is None and pixel_threshold is None else 3
    paths = []
    for i, (image, anomaly_map, name) in enumerate(zip(images, maps, names, strict=True)):
        axes = new_map_axes(n_panels, pyplot=False)
        display = AnomalyMapDisplay.from_predictions(
            image,
            anomaly_map,
            mask=None if masks is None else masks[i],
            threshold=threshold,
            score=float(anomaly_map.max()),
            threshold_source=threshold_source,
            vmin=vmin,
            vmax=vmax,
            ax=axes,
            pixel_threshold=pixel_threshold,
            regions=None if regions is None else regions[i],
        )
        paths.append(folder / f"{name}.png")
        with atomic_file(paths[-1]) as file:
            display.figure_.savefig(file, dpi=dpi, format="png")
    return paths


def heatmap_writer(
    folder: str | os.PathLike, n_per_type: int = 2
) -> Callable[[Category, np.ndarray, np.ndarray], list[Path]]:
    """Draw each evaluated category: ``evaluate(..., on_scored=heatmap_writer(...))``.

    For each category that :func:`sk_padim.evaluation.evaluate` scores, the returned
    function writes :func:`save_heatmaps` pictures of the first ``n_per_type`` test
    images of each defect type (``good`` included) to ``<folder>/<category>/``, named
    ``<type>_000.png``, ``<type>_001.png``, ... The predicted-defect panel and the
    verdicts use the pixel threshold with the best F1 on that category's test images
    (:func:`~sk_padim.f1_optimal_threshold`); the pictures box the defect regions at
    that threshold (:func:`sk_padim.regions.defect_regions`), and the regions of every
    test image go to ``<folder>/<category>/regions.jsonl``, one JSON record per region,
    its image named ``<type>_<i>`` as the pictures are.

    Parameters
    ----------
    folder : str or path-like
        Where the categories' folders go.
    n_per_type : int, default=2
        Pictures per defect type and category.

    Returns
    -------
    on_scored : callable
        ``on_scored(category, maps, masks) -> paths``, the pictures written.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sk_padim.evaluation import Category
    >>> from sk_padim.heatmaps import heatmap_writer
    >>> maps = np.zeros((3, 16, 16))
    >>> masks = np.zeros((3, 16, 16), dtype=bool)
    >>> maps[2, 4:8, 4:8] = masks[2, 4:8, 4:8] = 1
    >>> kinds = np.array(["good", "good", "hole"])
    >>> category = Category("tile", maps, maps, kinds != "good", masks, kinds)
    >>> paths = heatmap_writer(tempfile.mkdtemp(), 1)(category, maps, masks)
    >>> [path.relative_to(path.parents[1]).as_posix() for path in paths]
    ['tile/good_000.png', 'tile/hole_000.png']
    """

    def on_scored(category: Category, maps: np.ndarray, masks: np.ndarray) -> list[Path]:
        types = np.asarray(category.defect_types_test)
        all_names = [""] * len(types)
        selected, names = [], []
        for kind in np.unique(types):
            indices = np.flatnonzero(types == kind)
            for i, index in enumerate(indices):
                all_names[index] = f"{kind}_{i:03d}"
            selected += indices[:n_per_type].tolist()
            names += [all_names[index] for index in indices[:n_per_type]]
        threshold = f1_optimal_threshold(masks, maps)
        regions = defect_regions(maps, threshold)
        category_folder = Path(folder) / category.name
        category_folder.mkdir(parents=True, exist_ok=True)
        records = (
            json.dumps({"image": all_names[region.image], "index": region.image, **region.record()})
            for image_regions in regions
            for region in image_regions
        )
        with atomic_file(category_folder / "regions.jsonl") as file:
            file.write("".join(record + "\n" for record in records).encode())
        return save_heatmaps(
            [category.X_test[i] for i in selected],
            maps[selected],
            category_folder,
            masks=[category.masks_test[i] for i in selected],
            threshold=threshold,
            threshold_source="best pixel F1 on tests",
            names=names,
            regions=[regions[i] for i in selected],
        )

    return on_scored
