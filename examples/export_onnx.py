"""
=======================
Deploy as one ONNX file
=======================

Export a fitted pipeline to ONNX and score with onnxruntime alone.

Fits PaDiM on the built-in brick textures (EfficientNet-Lite0, ``sk-padim[lite]``),
writes ``padim.onnx`` (``sk-padim[export]``), then scores the test images with
onnxruntime in a separate process that never imports torch or sk-padim, and checks that
its scores and verdicts equal the pipeline's. Run it as a script with
``python examples/export_onnx.py``; it writes its files in the current folder.
"""

import os
import subprocess
import sys

import numpy as np
from sklearn.pipeline import Pipeline

from sk_padim import PadimDetector, PatchFeatureTransformer, export_onnx, make_defect_textures

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
IMAGE_SIZE = 64 if os.environ.get("SK_PADIM_EXAMPLES_SMALL") else 128

brick = make_defect_textures("brick", image_size=IMAGE_SIZE, random_state=0).brick
pipe = Pipeline(
    [
        ("feat", PatchFeatureTransformer(backbone="efficientnet_lite0", image_size=IMAGE_SIZE)),
        ("padim", PadimDetector()),
    ]
).fit(brick.X_train)

# %%
# Export
# ------
# One file: uint8 images in; anomaly maps, image scores and the verdict out.

path = export_onnx(pipe, "padim.onnx")
np.save("test_images.npy", brick.X_test)  # uint8 (n, H, W, 3), already at IMAGE_SIZE

# %%
# Score without torch or sk-padim
# -------------------------------
# What an inspection line runs: onnxruntime and NumPy only, here in a separate process.

SCORING = """
import sys
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession(sys.argv[1])
threshold = session.get_modelmeta().custom_metadata_map["threshold"]
anomaly_map, score, is_anomalous = session.run(None, {"images": np.load(sys.argv[2])})
np.save("onnx_scores.npy", score)
np.save("onnx_verdicts.npy", is_anomalous)
assert "torch" not in sys.modules
print(f"threshold {float(threshold):.4g}: {int(is_anomalous.sum())} of {len(score)} flagged")
"""
result = subprocess.run(
    [sys.executable, "-c", SCORING, str(path), "test_images.npy"],
    capture_output=True,
    text=True,
    check=True,
)
print(result.stdout.strip())

# %%
# The ONNX scores and verdicts equal the pipeline's.

scores = pipe.decision_function(brick.X_test)
onnx_scores = np.load("onnx_scores.npy")
print(f"largest relative score difference {np.max(np.abs(onnx_scores / scores - 1)):.1e}")
np.testing.assert_allclose(onnx_scores, scores, rtol=1e-4)
near = np.isclose(scores, pipe[-1].threshold_, rtol=1e-4)  # rounding may tip those
verdicts = np.load("onnx_verdicts.npy")
np.testing.assert_array_equal(verdicts[~near], (pipe.predict(brick.X_test) == -1)[~near])
print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
