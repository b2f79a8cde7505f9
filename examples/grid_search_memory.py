"""
============================================
Grid search with one backbone pass per image
============================================

Grid-search ``n_features`` and layer sets, with the backbone's outputs cached.

Without ``memory``, every candidate and every fold of a grid search runs the CNN over its
images again. ``PatchFeatureTransformer(memory=folder)`` stores each image's layer
outputs once; candidates that differ in ``n_features`` or in layers already stored read
them back. The scores are the same either way. List the largest layer set first, so that
its candidates store every layer the others need. Run it as a script with
``python examples/grid_search_memory.py``.
"""

import os
import tempfile
import time

import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline

from sk_padim import (
    NormalTrainSplit,
    PadimDetector,
    PatchFeatureTransformer,
    clear_feature_cache,
    pixel_auroc_scorer,
)
from sk_padim.synthetic import make_defect_textures

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
SMALL = bool(os.environ.get("SK_PADIM_EXAMPLES_SMALL"))
IMAGE_SIZE = 64 if SMALL else 128

sizes = {"n_train": 9, "n_test_good": 3, "n_test_defective": 6} if SMALL else {"n_train": 30}
brick = make_defect_textures("brick", image_size=IMAGE_SIZE, random_state=0, **sizes).brick
# Pool the normal training images with the labelled test images: the splitter keeps
# every anomalous image out of training.
X = np.concatenate([brick.X_train, brick.X_test])
normal_masks = np.zeros((len(brick.X_train), IMAGE_SIZE, IMAGE_SIZE), bool)
masks = np.concatenate([normal_masks, brick.masks_test])

grid = {
    "feat__layers": [("_blocks.2", "_blocks.4", "_blocks.10"), ("_blocks.2", "_blocks.10")],
    "feat__n_features": [25, 50] if SMALL else [25, 50, 100],
}


def search(memory):
    feat = PatchFeatureTransformer(
        backbone="efficientnet_lite0", image_size=IMAGE_SIZE, random_state=0, memory=memory
    )
    pipe = Pipeline([("feat", feat), ("padim", PadimDetector())])
    cv = NormalTrainSplit(n_splits=3, shuffle=True, random_state=0)
    start = time.perf_counter()
    fitted = GridSearchCV(pipe, grid, scoring=pixel_auroc_scorer, cv=cv).fit(X, masks)
    return fitted, time.perf_counter() - start


plain, plain_seconds = search(memory=None)
with tempfile.TemporaryDirectory() as folder:
    cached, cached_seconds = search(memory=folder)
    clear_feature_cache(folder)  # or delete the folder

print(f"without memory {plain_seconds:.1f} s, with memory {cached_seconds:.1f} s")
print(f"best {cached.best_params_}, pixel AUROC {cached.best_score_:.3f}")
# Layer outputs read back from the cache equal the backbone's to float32 rounding (oneDNN
# may round an image's convolutions differently in a batch of another size), so the
# scores agree to that rounding, not bit for bit: 5e-9 apart at the default size.
assert cached.best_params_ == plain.best_params_
np.testing.assert_allclose(
    cached.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"], atol=1e-6
)
