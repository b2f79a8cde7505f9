"""Evaluate PaDiM on a dataset in the MVTec AD layout, category by category.

    python examples/mvtec_evaluation.py /data/mvtec_anomaly_detection [category ...]

Each category is fitted on ``train/good`` and evaluated on ``test`` with image AUROC,
pixel AUROC and AUPRO. With no path, the built-in defect textures are written in the
MVTec AD layout to a temporary folder and evaluated instead, so the example runs
anywhere. ``sk-padim evaluate ROOT`` does the same from the command line.

The backbone is EfficientNet-Lite0, whose weights ship with ``sk-padim[lite]``. For the
paper's setting use ``backbone="wide_resnet50_2"`` with ``image_size=224`` (its
weights download once from torchvision).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from sklearn.pipeline import Pipeline

from sk_padim import (
    PadimDetector,
    PatchFeatureTransformer,
    aupro,
    image_auroc,
    load_mvtec_ad,
    make_defect_textures,
    pixel_auroc,
    write_mvtec_layout,
)

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
SMALL = bool(os.environ.get("SK_PADIM_EXAMPLES_SMALL"))
IMAGE_SIZE = 64 if SMALL else 224


def evaluate_category(root: Path, category: str) -> dict:
    X_train, _ = load_mvtec_ad(root, category, return_X_y=True)  # file paths
    test = load_mvtec_ad(root, category, split="test")  # paths, labels, masks
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
    start = time.perf_counter()
    pipe.fit(X_train)
    maps = pipe.score_samples(test.images)  # (n, IMAGE_SIZE, IMAGE_SIZE)
    scores = pipe.decision_function(test.images)  # (n,), the maximum of each map
    # Masks come at the images' size; the metrics resize them to the maps (nearest).
    return {
        "category": category,
        "image AUROC": image_auroc(test.target, scores),
        "pixel AUROC": pixel_auroc(test.masks, maps),
        "AUPRO": aupro(test.masks, maps),
        "seconds": time.perf_counter() - start,
    }


def built_in_dataset(folder: str) -> Path:
    sizes = {"n_train": 5, "n_test_good": 2, "n_test_defective": 4} if SMALL else {}
    dataset = make_defect_textures(random_state=0, **sizes)  # brick, grass, gravel
    return write_mvtec_layout(dataset, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", help="dataset root (default: the built-in textures)")
    parser.add_argument("categories", nargs="*", help="categories (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else built_in_dataset(scratch)
        categories = args.categories or sorted(
            p.name for p in root.iterdir() if (p / "train" / "good").is_dir()
        )
        print(f"{'category':<12} image AUROC  pixel AUROC  AUPRO  seconds")
        for category in categories:
            row = evaluate_category(root, category)
            print(
                f"{category:<12} {row['image AUROC']:11.3f}  {row['pixel AUROC']:11.3f}  "
                f"{row['AUPRO']:5.3f}  {row['seconds']:7.1f}"
            )


if __name__ == "__main__":
    main()
