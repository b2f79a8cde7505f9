"""PaDiM image anomaly detection and localisation as scikit-learn estimators."""

from sk_padim.detector import PadimDetector
from sk_padim.features import PatchFeatureTransformer

__version__ = "0.1.0.dev0"

__all__ = ["PadimDetector", "PatchFeatureTransformer", "__version__"]
