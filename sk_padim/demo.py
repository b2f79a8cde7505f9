"""The built-in demo: PaDiM on the built-in defect textures, offline.

``sk-padim demo`` is a thin wrapper around :func:`run_demo`, which runs the evaluation
harness of :mod:`sk_padim.evaluation` on :func:`~sk_padim.make_defect_textures`.
This module sits on top of the estimators: the core never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sk_padim.evaluation import Category, CategoryResult, evaluate, padim_pipeline
from sk_padim.heatmaps import heatmap_writer
from sk_padim.synthetic import make_defect_textures

__all__ = ["DEMO_BACKBONE", "run_demo"]

DEMO_BACKBONE = "efficientnet_lite0"
"""The demo's backbone: its ImageNet weights ship with the ``lite`` extra, no download."""


def run_demo(
    output: str | os.PathLike | None = "sk-padim-demo",
    *,
    categories: str | Iterable[str] = ("brick", "grass", "gravel"),
    image_size: int = 128,
    n_train: int = 40,
    n_heatmaps: int = 2,
    random_state: int = 0,
    device: str = "auto",
    progress: bool = False,
    precision: str = "float32",
    runtime: str = "eager",
) -> list[CategoryResult]:
    """Fit and evaluate PaDiM on the built-in defect textures; the ``sk-padim demo`` command.

    Fits :func:`padim_pipeline` with the ``efficientnet_lite0`` backbone (ImageNet
    weights shipped in the ``lite`` extra, no download) on
    :func:`~sk_padim.make_defect_textures`, with maps at the images' size so that pixel
    metrics compare maps and masks pixel for pixel.

    Parameters
    ----------
    output : str or path-like or None, default="sk-padim-demo"
        Folder for the results table and the heat maps; None writes nothing.
    categories : str or iterable of str, default=("brick", "grass", "gravel")
        Texture categories.
    image_size : int, default=128
        Side of the images and of the anomaly maps, 32 to 256.
    n_train : int, default=40
        Normal training images per category.
    n_heatmaps : int, default=2
        Heat-map PNGs per defect type and category (needs matplotlib), with the defect
        regions boxed, and each category's ``regions.jsonl``
        (:func:`sk_padim.heatmaps.heatmap_writer`); 0 for none.
    random_state : int, default=0
        Seeds the dataset and the channel draw.
    device : str, default="auto"
        Where the model runs.
    progress : bool, default=False
        Show progress bars.
    precision, runtime : str, default="float32", "eager"
        How the backbone runs (see :class:`~sk_padim.PatchFeatureTransformer`).

    Returns
    -------
    results : list of CategoryResult
        One per category: image AUROC, pixel AUROC, AUPRO and times.

    Examples
    --------
    >>> from sk_padim.demo import run_demo
    >>> results = run_demo(None, categories="brick", image_size=64, n_train=10)
    >>> [result.category for result in results]
    ['brick']
    """
    dataset = make_defect_textures(
        categories, image_size=image_size, n_train=n_train, random_state=random_state
    )
    pictures = output is not None and n_heatmaps > 0
    return evaluate(
        padim_pipeline(
            backbone=DEMO_BACKBONE,
            image_size=image_size,
            random_state=random_state,
            device=device,
            verbose=progress,
            precision=precision,
            runtime=runtime,
        ),
        list(dataset),
        lambda name: Category.from_textures(name, dataset[name]),
        output=output,
        on_scored=heatmap_writer(Path(output) / "heatmaps", n_heatmaps) if pictures else None,
        progress=progress,
    )
