"""PaDiM image anomaly detection and localisation as scikit-learn estimators."""

from sk_padim._version import __version__
from sk_padim.calibration import F1ThresholdCalibrator, f1_optimal_threshold
from sk_padim.datasets import load_mvtec_ad, make_defect_textures, write_mvtec_layout
from sk_padim.detector import PadimDetector
from sk_padim.devices import DeviceFeatures
from sk_padim.export import export_onnx
from sk_padim.feature_cache import clear_feature_cache
from sk_padim.features import PatchFeatureTransformer
from sk_padim.metrics import (
    aupro,
    aupro_scorer,
    image_auroc,
    image_auroc_scorer,
    pixel_auroc,
    pixel_auroc_scorer,
)
from sk_padim.model import PadimModel
from sk_padim.model_selection import NormalTrainSplit
from sk_padim.persistence import load_model, load_npz, save_model, save_npz
from sk_padim.streaming import fit_streaming

__all__ = [
    "DeviceFeatures",
    "F1ThresholdCalibrator",
    "NormalTrainSplit",
    "PadimDetector",
    "PadimModel",
    "PatchFeatureTransformer",
    "__version__",
    "aupro",
    "aupro_scorer",
    "clear_feature_cache",
    "export_onnx",
    "f1_optimal_threshold",
    "fit_streaming",
    "image_auroc",
    "image_auroc_scorer",
    "pixel_auroc",
    "pixel_auroc_scorer",
    "load_mvtec_ad",
    "make_defect_textures",
    "write_mvtec_layout",
    "load_model",
    "load_npz",
    "save_model",
    "save_npz",
]
