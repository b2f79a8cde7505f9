"""PaDiM image anomaly detection and localisation as scikit-learn estimators."""

# The public names are imported on first use (PEP 562), so that ``import sk_padim.cli``
# (``sk-padim --help``) does not import torch; ``from sk_padim import X`` imports X's module.
import importlib

from sk_padim._version import __version__

_SOURCES = {
    "DeviceFeatures": "core.devices",
    "F1ThresholdCalibrator": "calibration",
    "NormalTrainSplit": "model_selection",
    "PadimDetector": "detector",
    "PadimModel": "core.model",
    "PatchFeatureTransformer": "features",
    "QuantileThresholdCalibrator": "calibration",
    "aupro": "metrics",
    "aupro_scorer": "metrics",
    "clear_feature_cache": "feature_cache",
    "defect_regions": "regions",
    "drift_report": "conformal",
    "export_onnx": "export",
    "f1_optimal_threshold": "calibration",
    "fit_streaming": "streaming",
    "good_pixel_threshold": "calibration",
    "image_auroc": "metrics",
    "image_auroc_scorer": "metrics",
    "iter_scores": "streaming",
    "load_model": "persistence",
    "load_mvtec_ad": "datasets",
    "load_npz": "persistence",
    "make_defect_textures": "synthetic",
    "make_high_resolution_textures": "synthetic",
    "normalized_score": "regions",
    "p_values": "conformal",
    "pixel_auroc": "metrics",
    "pixel_auroc_scorer": "metrics",
    "predict_regions": "regions",
    "relative_score": "regions",
    "save_model": "persistence",
    "save_npz": "persistence",
    "write_mvtec_layout": "datasets",
}

__all__ = ["__version__", *sorted(_SOURCES)]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'sk_padim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sk_padim.{_SOURCES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
