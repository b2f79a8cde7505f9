"""
=====================================
Calibrate a threshold for the best F1
=====================================

Choose a decision threshold on labelled validation images, then label new images.

PaDiM trains on normal images only, so its scores have no natural cut-off.
``F1ThresholdCalibrator`` picks the threshold with the best F1 on a few labelled
validation images, at the image level (is the image defective?) or the pixel level
(which pixels are?). Judge it on other images: the F1 on the validation images is
optimistic. Run it as a script with ``python examples/calibration.py``.
"""

import os

import matplotlib.pyplot as plt
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from sk_padim import F1ThresholdCalibrator, PadimDetector, PatchFeatureTransformer
from sk_padim.plotting import AnomalyMapDisplay, ImageScoreDisplay
from sk_padim.synthetic import make_defect_textures

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
IMAGE_SIZE = 64 if os.environ.get("SK_PADIM_EXAMPLES_SMALL") else 128

brick = make_defect_textures(
    "brick", image_size=IMAGE_SIZE, n_test_good=20, n_test_defective=40, random_state=0
).brick
# Half of the labelled images to calibrate, half to judge the threshold.
X_val, X_test, y_val, y_test, masks_val, masks_test = train_test_split(
    brick.X_test,
    brick.y_test,
    brick.masks_test,
    test_size=0.5,
    stratify=brick.y_test,
    random_state=0,
)

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
).fit(brick.X_train)  # normal images only

# %%
# Image level
# -----------
# Is the image defective? ``y`` holds image labels (1 = defective); masks would do as
# well.

images = F1ThresholdCalibrator(pipe).fit(X_val, y_val)  # pipe is fitted: used as is
predicted = images.predict(X_test)  # +1 normal, -1 anomalous, as in scikit-learn
print(
    f"image threshold {images.threshold_:.4g}: validation F1 {images.best_score_:.3f}, "
    f"test F1 {f1_score(y_test, predicted == -1):.3f}"
)

# %%
# The held-out test images' scores against the calibrated threshold (dashed).

ImageScoreDisplay.from_estimator(pipe, X_test, y_test, threshold=images.threshold_)

# %%
# Pixel level
# -----------
# Which pixels are defective? ``y`` holds masks, and ``predict_masks`` gives a boolean
# mask per image.

pixels = F1ThresholdCalibrator(pipe, level="pixel").fit(X_val, masks_val)
predicted_masks = pixels.predict_masks(X_test)  # (n, H, W), the maps' size
pixel_f1 = f1_score(masks_test.ravel(), predicted_masks.ravel())
print(
    f"pixel threshold {pixels.threshold_:.4g}: validation F1 {pixels.best_score_:.3f}, "
    f"test F1 {pixel_f1:.3f}"
)

# %%
# A defective test image with the pixels at or above the calibrated pixel threshold in
# red, and the true defect outlined.

defective = int(y_test.argmax())
AnomalyMapDisplay.from_estimator(
    pipe,
    X_test[defective],
    mask=masks_test[defective],
    threshold=pixels.threshold_,
    threshold_source="calibrated, best pixel F1",
)
plt.show()
