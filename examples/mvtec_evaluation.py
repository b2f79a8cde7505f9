"""
=======================================
Evaluate per category (MVTec AD layout)
=======================================

Evaluate PaDiM on a dataset in the MVTec AD layout, category by category::

    python examples/mvtec_evaluation.py /data/mvtec_anomaly_detection [category ...]

Each category is fitted on ``train/good`` and evaluated on ``test`` with image AUROC,
pixel AUROC and AUPRO, by the evaluation harness of ``sk_padim.evaluation``. With no
path, the built-in defect textures are written in the MVTec AD layout to a temporary
folder and evaluated instead, so the example runs anywhere. ``sk-padim evaluate ROOT``
does the same from the command line.

The backbone is EfficientNet-Lite0, whose weights ship with ``sk-padim[lite]``. For the
paper's setting use ``backbone="wide_resnet50_2"`` with ``image_size=224`` (its
weights download once from torchvision). This documentation site is built offline, so
its copy of the example ran with no path, on the built-in textures.
"""

import argparse
import os
import tempfile
from pathlib import Path

from sk_padim import make_defect_textures, write_mvtec_layout
from sk_padim.datasets import find_mvtec_categories, load_mvtec_category
from sk_padim.evaluation import evaluate, padim_pipeline, results_table

# The tests run every example with SK_PADIM_EXAMPLES_SMALL=1, at a smaller size.
SMALL = bool(os.environ.get("SK_PADIM_EXAMPLES_SMALL"))
IMAGE_SIZE = 64 if SMALL else 224


def built_in_dataset(folder: str) -> Path:
    sizes = {"n_train": 5, "n_test_good": 2, "n_test_defective": 4} if SMALL else {}
    dataset = make_defect_textures(random_state=0, **sizes)  # brick, grass, gravel
    return write_mvtec_layout(dataset, folder)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Evaluate PaDiM on a dataset in the MVTec AD layout, category by category."
    )
    parser.add_argument("root", nargs="?", help="dataset root (default: the built-in textures)")
    parser.add_argument("categories", nargs="*", help="categories (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.root) if args.root else built_in_dataset(scratch)
        root, found = find_mvtec_categories(folder)  # a dataset root or one category
        pipe = padim_pipeline(backbone="efficientnet_lite0", image_size=IMAGE_SIZE, random_state=0)
        # One category at a time: fit a clone on train/good, score test/ once (maps and
        # image scores), compare with ground_truth/ (masks resized to the maps, nearest).
        results = evaluate(
            pipe, args.categories or found, lambda name: load_mvtec_category(root, name)
        )
        print(results_table(results))


if __name__ == "__main__":
    main()
