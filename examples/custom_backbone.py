"""
====================
Use another backbone
====================

Other layers, your own ``nn.Module``, weights from a file.

PaDiM needs convolutional feature maps from a few layers of a CNN, shallowest first.
``PatchFeatureTransformer`` takes ``backbone`` as a registered name (``resnet18``,
``wide_resnet50_2``, ``efficientnet_b0`` ..., ``efficientnet_lite0``), any torchvision
classification model name, or any ``torch.nn.Module``; ``layers`` names the modules
whose outputs form the embedding (``model.named_modules()`` lists them). Everything
here runs offline. Run it as a script with ``python examples/custom_backbone.py``.
"""

import os
import tempfile

import torch
from sklearn.pipeline import Pipeline
from torch import nn

from sk_padim import PadimDetector, PatchFeatureTransformer, image_auroc, make_defect_textures

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
IMAGE_SIZE = 64 if os.environ.get("SK_PADIM_EXAMPLES_SMALL") else 128
gravel = make_defect_textures("gravel", image_size=IMAGE_SIZE, random_state=0).gravel


def image_auroc_of(features: PatchFeatureTransformer) -> float:
    pipe = Pipeline([("feat", features), ("padim", PadimDetector())]).fit(gravel.X_train)
    return image_auroc(gravel.y_test, pipe.decision_function(gravel.X_test))


# %%
# A registered backbone with other layers
# ---------------------------------------
# EfficientNet-Lite0 (weights in the ``lite`` extra), its stride-4 and stride-8 stages
# only, all their 64 channels.

lite = PatchFeatureTransformer(
    backbone="efficientnet_lite0",
    layers=("_blocks.2", "_blocks.4"),
    n_features=64,
    image_size=IMAGE_SIZE,
    random_state=0,
)
print(f"efficientnet_lite0, 2 layers: image AUROC {image_auroc_of(lite):.3f}")


# %%
# Your own module
# ---------------
# The first layer sets the feature grid; the anomaly maps are 4x that grid unless
# ``PadimDetector(map_size=...)`` says otherwise, so a stride-4 first layer gives maps
# at the image size. Inputs are RGB normalised with ImageNet's mean and std.
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(64, 10)  # never runs: PaDiM stops after block2

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


torch.manual_seed(0)
model = SmallCNN()  # random weights here; train or load yours
own = PatchFeatureTransformer(
    backbone=model,
    layers=("block1", "block2"),
    n_features=48,
    image_size=IMAGE_SIZE,
    random_state=0,
)
print(f"SmallCNN (random weights): image AUROC {image_auroc_of(own):.3f}")
print("layers of SmallCNN:", [name for name, _ in model.named_modules() if name])

# %%
# Weights from a state-dict file
# ------------------------------
# A file written by ``torch.save(model.state_dict(), path)``: for a module, or for a
# torchvision name such as ``backbone="resnet18"`` offline.

with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "small_cnn.pth")
    torch.save(model.state_dict(), path)
    from_file = PatchFeatureTransformer(
        backbone=SmallCNN(),  # fresh random weights, replaced by the file's
        weights=path,
        layers=("block1", "block2"),
        n_features=48,
        image_size=IMAGE_SIZE,
        random_state=0,
    )
    # The same weights and channels as the SmallCNN above: the same result.
    print(f"SmallCNN (weights from file): image AUROC {image_auroc_of(from_file):.3f}")
