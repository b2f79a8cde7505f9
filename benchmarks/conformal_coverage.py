"""Decisions from good images: measured false-alarm rates, p-values and suspects.

Example (the figures in docs/evaluation.md, "Decisions from good images"; writes
docs/benchmark-results/conformal_coverage-<size>.md and .json)::

    python benchmarks/conformal_coverage.py --splits 20 --suspect-splits 100
    python benchmarks/conformal_coverage.py --splits 20 --suspect-splits 100 --image-size 128

Good images: random crops of the real texture photographs of ``make_defect_textures``
(brick, grass, gravel; ``--pool`` crops per category from the training strip, so
independent draws), features from ``efficientnet_lite0`` with its shipped ImageNet
weights (the ``lite`` extra), computed once. For each category and random split,
``--n-train`` images fit a ``PadimDetector`` and the others are unseen good images:

- coverage: the fraction of unseen good images flagged at ``false_alarm_rate`` 0.1 and
  0.05 (and under the default rule, the highest training score), against the promise
  ``(n + 1 - k) / (n + 1)``;
- p-values: the Kolmogorov-Smirnov distance of the unseen images' p-values to the
  uniform law;
- suspects: how often ``sk_padim.conformal.suspect_indices`` names a good image of a
  clean training set (``--suspect-splits`` sets per category), at several cut-offs;
  and whether it names defective crops (``make_defect_textures``' test defects) mixed
  into the training set.

Prints Markdown tables and writes them with the raw numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from sk_padim import PadimDetector, PatchFeatureTransformer, make_defect_textures
from sk_padim.conformal import (
    SuspectTrainingImagesWarning,
    conformal_rank,
    conformal_threshold,
    p_values_from_scores,
    suspect_indices,
)

RATES = (0.1, 0.05)
CUTOFFS = (3.0, 3.5, 4.0, 5.0)


def features_of(args) -> dict:
    """Per category: good features ``(pool, d, h, w)`` and defective ones."""
    data = make_defect_textures(
        image_size=args.image_size,
        n_train=args.pool,
        n_test_good=0,
        n_test_defective=args.n_defective,
        random_state=args.seed,
    )
    out = {}
    for name, category in data.items():
        feat = PatchFeatureTransformer(
            backbone="efficientnet_lite0", image_size=args.image_size, random_state=0
        ).fit(category.X_train)
        out[name] = (feat.transform(category.X_train), feat.transform(category.X_test))
    return out


def coverage(features: dict, args) -> dict:
    """Flagged fraction of unseen good images per category, rule and split."""
    rows = {}
    for name, (good, _) in features.items():
        rng = np.random.default_rng(args.seed)
        flagged = {rate: [] for rate in (*RATES, None)}
        ks = []
        for _ in range(args.splits):
            order = rng.permutation(len(good))
            train, test = good[order[: args.n_train]], good[order[args.n_train :]]
            detector = PadimDetector().fit(train)
            scores = detector.decision_function(test)
            for rate in flagged:
                threshold = (
                    detector.threshold_  # the default rule
                    if rate is None
                    else conformal_threshold(detector.training_scores_, rate)
                )
                flagged[rate].append(float(np.mean(scores >= threshold)))
            p = np.sort(p_values_from_scores(detector.training_scores_, scores))
            ks.append(float(np.max(np.abs(p - (np.arange(len(p)) + 0.5) / len(p)))))
        rows[name] = {"flagged": {str(k): v for k, v in flagged.items()}, "p_value_ks": ks}
    return rows


def suspects(features: dict, args) -> dict:
    """How often clean training sets get a suspect, per cut-off; defects mixed in."""
    rows = {}
    for name, (good, defective) in features.items():
        rng = np.random.default_rng(args.seed + 1)
        named = {cutoff: 0 for cutoff in CUTOFFS}
        for _ in range(args.suspect_splits):
            train = good[rng.permutation(len(good))[: args.n_train]]
            scores = PadimDetector().fit(train).training_scores_
            for cutoff in CUTOFFS:
                named[cutoff] += bool(len(suspect_indices(scores, cutoff)))
        mixed = np.concatenate([good[: args.n_train - len(defective)], defective])
        scores = PadimDetector().fit(mixed).training_scores_
        first_bad = args.n_train - len(defective)
        found = {
            cutoff: sorted(int(i) - first_bad for i in suspect_indices(scores, cutoff))
            for cutoff in CUTOFFS
        }
        rows[name] = {"clean_sets_with_a_suspect": named, "defects_named": found}
    return rows


def report(cov: dict, sus: dict, args) -> str:
    n = args.n_train
    lines = [
        f"Coverage: {args.splits} random splits per category, {n} training and "
        f"{args.pool - n} unseen good images, {args.image_size} px, efficientnet_lite0.",
        "",
        "| category | rule | promise | mean flagged | max over splits |",
        "|---|---|---|---|---|",
    ]
    for name, row in cov.items():
        for rate in (*RATES, None):
            k = n if rate is None else conformal_rank(n, rate)
            values = row["flagged"][str(rate)]
            rule = "highest training score" if rate is None else f"false_alarm_rate={rate}"
            lines.append(
                f"| {name} | {rule} | {(n + 1 - k) / (n + 1):.3f} | {np.mean(values):.3f} | "
                f"{np.max(values):.3f} |"
            )
    lines += ["", "| category | mean KS distance of unseen p-values to uniform | max |"]
    lines += ["|---|---|---|"]
    for name, row in cov.items():
        ks = row["p_value_ks"]
        lines.append(f"| {name} | {np.mean(ks):.3f} | {np.max(ks):.3f} |")
    lines += [
        "",
        f"Suspects: clean training sets of {n} good images with at least one named, of "
        f"{args.suspect_splits} per category; defective images mixed in (of "
        f"{args.n_defective}) that were named.",
        "",
        "| category | " + " | ".join(f"cut-off {c}" for c in CUTOFFS) + " |",
        "|---|" + "---|" * len(CUTOFFS),
    ]
    for name, row in sus.items():
        cells = [
            f"{row['clean_sets_with_a_suspect'][c]} sets; {len(row['defects_named'][c])} "
            f"of {args.n_defective} defects"
            for c in CUTOFFS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=120, help="good crops per category")
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-defective", type=int, default=4)
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--suspect-splits", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmark-results", help="folder for the tables")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SuspectTrainingImagesWarning)
    features = features_of(args)
    cov, sus = coverage(features, args), suspects(features, args)
    table = report(cov, sus, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"conformal_coverage-{args.image_size}"
    (out / f"{stem}.md").write_text(table + "\n")
    raw = {"args": vars(args), "coverage": cov, "suspects": sus}
    (out / f"{stem}.json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
