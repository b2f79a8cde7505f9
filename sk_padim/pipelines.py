"""The shape of a PaDiM pipeline: a feature transformer, then a detector."""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer

__all__ = ["padim_steps"]


def padim_steps(pipeline, caller: str, fitted: bool = False) -> tuple[tuple, tuple]:
    """The ``(name, transformer)`` and ``(name, detector)`` steps of a PaDiM pipeline.

    Raises a ``TypeError`` naming ``caller`` for anything else than
    ``Pipeline([(name, PatchFeatureTransformer(...)), (name, PadimDetector(...))])``,
    and ``NotFittedError`` when ``fitted`` and a step is not fitted.

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
