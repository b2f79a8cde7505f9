"""Checks of the features a detector takes: shapes, dtypes, finite values, batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from sk_padim.core.devices import as_tensor
from sk_padim.core.statistics import all_finite

__all__ = [
    "check_feature_shape_matches",
    "check_features",
    "feature_batches",
    "stream_feature_batches",
]

_TRANSFORMER_HINT = (
    "PadimDetector takes patch features (n, d, h, w), not images: put a "
    "PatchFeatureTransformer before it, e.g. Pipeline([('feat', PatchFeatureTransformer()), "
    "('padim', PadimDetector())])."
)


def check_features(X) -> torch.Tensor:
    """Give features ``(n, d, h, w)`` as a tensor (a view of a NumPy array), checked."""
    features = as_tensor(X)
    if features is None:
        features = torch.from_numpy(_feature_array(X))
    elif not features.dtype.is_floating_point:
        raise TypeError(
            f"Features must be floating point; got a tensor of dtype {features.dtype}. "
            f"{_TRANSFORMER_HINT}"
        )
    _check_feature_shape(tuple(features.shape))
    return features


def check_feature_shape_matches(features: torch.Tensor, fitted_shape) -> None:
    """Raise a ``ValueError`` unless features ``(n, d, h, w)`` have the fitted ``(d, h, w)``."""
    shape = tuple(features.shape[1:])
    if shape == tuple(fitted_shape):
        return
    count = ""
    if shape[0] != fitted_shape[0]:  # scikit-learn's wording for the feature count
        count = f"X has {shape[0]} features, but PadimDetector is expecting {fitted_shape[0]} "
        count += "features as input. "
    raise ValueError(
        f"{count}Features have shape (d, h, w) = {shape} but the detector was fitted on "
        f"{tuple(fitted_shape)}; use the same transformer settings (n_features, layers, "
        "image_size) as for fitting."
    )


def _feature_array(X) -> np.ndarray:
    """A NumPy array of features: float (float64 is narrowed per batch), writable."""
    try:
        features = np.asarray(X)
    except ValueError as error:
        raise ValueError(
            "Features must be one array of shape (n, d, h, w); the items given have "
            "different shapes. Use PatchFeatureTransformer to make them."
        ) from error
    if features.dtype.kind in "iub":
        raise TypeError(
            f"Features must be floating point; got dtype {features.dtype}. {_TRANSFORMER_HINT}"
        )
    if features.dtype.kind != "f":
        raise TypeError(f"Features must be numeric; got dtype {features.dtype}.")
    if features.dtype == np.float16 or not features.flags.writeable:
        features = features.astype(np.float32)  # torch cannot wrap read-only arrays
    return features


def _check_feature_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 4:
        raise ValueError(
            f"Expected features of shape (n, d, h, w); got shape {shape}. "
            "Pass images through PatchFeatureTransformer first."
        )
    if shape[0] == 0:
        raise ValueError("Got no feature maps (n = 0); pass at least one image's features.")
    if 0 in shape[1:]:
        raise ValueError(
            f"Features of shape {shape} have an empty axis (size 0); make "
            "them with PatchFeatureTransformer."
        )
    # Images (n, H, W, C): a last axis of 1, 3 or 4 after two large ones. A feature grid
    # 4 or fewer patches wide under 16 or more channels and rows is not a PaDiM layout.
    if shape[3] in (1, 3, 4) and min(shape[1:3]) >= 16:
        raise ValueError(
            f"Features of shape {shape} look like images (n, H, W, channels). {_TRANSFORMER_HINT}"
        )


def feature_batches(
    features: torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Yield ``batch_size`` rows of the features at a time, float32 on ``device``, checked.

    Raises ``ValueError`` for NaN or infinite values, or values beyond float32's range.
    """
    for start in range(0, len(features), batch_size):
        rows = features[start : start + batch_size]
        batch = rows.to(device=device, dtype=torch.float32)
        if not all_finite(batch):
            if bool(torch.isfinite(rows).all()):
                raise ValueError("Features reach values beyond float32's range; scale them down.")
            raise ValueError(
                "Features contain NaN or infinite values; check the images and the backbone."
            )
        yield batch


def stream_feature_batches(
    make_arrays: Callable[[], Iterable], batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """:func:`feature_batches` of each feature array that ``make_arrays()`` gives, all of
    the first one's ``(d, h, w)``; an array is not held while the next one is made."""
    shape = None
    for features in make_arrays():
        features = check_features(features)
        shape = shape or tuple(features.shape[1:])
        check_feature_shape_matches(features, shape)
        yield from feature_batches(features, batch_size, device)
        del features
