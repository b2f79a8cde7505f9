"""The shape of a PaDiM pipeline (a feature transformer, then a detector), checked once
for every caller, and the torch model of a fitted one."""

from __future__ import annotations

import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from sk_padim.core.model import PadimModel
from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer

__all__ = ["padim_model", "padim_steps"]


def padim_steps(pipeline, caller: str, fitted: bool = False) -> tuple[tuple, tuple]:
    """The ``(name, transformer)`` and ``(name, detector)`` steps of a PaDiM pipeline.

    Parameters
    ----------
    pipeline : object
        What the caller was given.
    caller : str
        Who needs the pipeline, named in the errors.
    fitted : bool, default=False
        Whether both steps must be fitted.

    Returns
    -------
    transformer_step, detector_step : tuple of (str, estimator)
        The pipeline's two steps.

    Raises
    ------
    TypeError
        For anything else than ``Pipeline([(name, PatchFeatureTransformer(...)), (name,
        PadimDetector(...))])``, naming ``caller``.
    sklearn.exceptions.NotFittedError
        When ``fitted`` and a step is not fitted.

    Examples
    --------
    >>> from sklearn.pipeline import Pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer
    >>> from sk_padim.pipelines import padim_steps
    >>> pipe = Pipeline([("feat", PatchFeatureTransformer()), ("padim", PadimDetector())])
    >>> [name for name, _ in padim_steps(pipe, "example")]
    ['feat', 'padim']
    """
    steps = getattr(pipeline, "steps", None)
    if (
        not isinstance(pipeline, Pipeline)
        or len(steps) != 2
        or not isinstance(steps[0][1], PatchFeatureTransformer)
        or not isinstance(steps[1][1], PadimDetector)
    ):
        raise TypeError(
            f"{caller} needs Pipeline([(name, PatchFeatureTransformer(...)), "
            f"(name, PadimDetector(...))]); got {type(pipeline).__name__}."
        )
    if fitted:
        check_is_fitted(steps[0][1])
        check_is_fitted(steps[1][1])
    return steps[0], steps[1]


def padim_model(pipeline, device: str | torch.device = "cpu") -> PadimModel:
    """Make the torch model of a fitted pipeline: pixels -> anomaly maps and scores.

    Each step's ``to_module(device)`` is a stage; the model scores as the pipeline does.

    Parameters
    ----------
    pipeline : Pipeline
        A fitted ``[PatchFeatureTransformer, PadimDetector]`` pipeline.
    device : str or torch.device, default="cpu"
        Where the model runs.

    Returns
    -------
    model : sk_padim.core.model.PadimModel
        In eval mode, on ``device``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.pipeline import make_pipeline
    >>> from sk_padim import PadimDetector, PatchFeatureTransformer
    >>> from sk_padim.pipelines import padim_model
    >>> X = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    >>> feat = PatchFeatureTransformer(weights=None, image_size=32, n_features=8)
    >>> model = padim_model(make_pipeline(feat, PadimDetector()).fit(X))
    >>> [type(stage).__name__ for stage in model.children()]
    ['PatchEmbedding', 'PatchScorer']
    """
    (_, feat), (_, detector) = padim_steps(pipeline, "padim_model", fitted=True)
    return PadimModel(feat.to_module(device), detector.to_module(device)).eval()
