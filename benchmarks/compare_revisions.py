"""Two revisions of sk-padim side by side in one run: the ratios ``benchmarks/run.py`` reports.

This machine's speed drifts between runs, so a change is judged by ratios (PaDiM's fit
and scoring rates to the bare backbone's) measured alternately for both revisions under
the same conditions. Each round runs ``benchmarks/run.py`` of the ``--before`` revision
(checked out into a temporary git worktree) and then of the working tree, each in its
own process with its own ``sk_padim`` on ``PYTHONPATH``; the table gives the median of
the rounds. Example (the figures in docs/performance.md)::

    python benchmarks/compare_revisions.py --before c898cd2 --rounds 3 -- \
        --n-train 64 --n-test 32 --repeats 2

Arguments after ``--`` go to ``benchmarks/run.py`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATIOS = ("fit_to_backbone_ratio", "score_to_backbone_ratio")
RATES = ("fit_images_per_s", "score_images_per_s", "bare_backbone_images_per_s", "peak_rss_mb")


def run_benchmark(tree: Path, run_args: list[str], out: Path) -> dict:
    """``tree``'s benchmarks/run.py with ``tree``'s sk_padim; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(tree / "benchmarks" / "run.py"), *run_args, "--out", str(out)]
    subprocess.run(command, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    return json.loads(next(out.glob("*.json")).read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a git revision, e.g. a commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("run_args", nargs="*", help="arguments for benchmarks/run.py")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        try:
            for index in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    out = Path(folder) / f"{name}-{index}"
                    results[name].append(run_benchmark(tree, args.run_args, out))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT)
    print(f"| measure (median of {args.rounds} rounds) | {args.before} | working tree |")
    print("|---|---:|---:|")
    for key in (*RATIOS, *RATES):
        values = [statistics.median(_value(r, key) for r in results[n]) for n in results]
        print(f"| {key} | {values[0]:.3f} | {values[1]:.3f} |")


def _value(result: dict, key: str) -> float:
    """``key`` anywhere in a benchmark's (nested) JSON result."""
    if key in result:
        return float(result[key])
    for value in result.values():
        if isinstance(value, dict):
            try:
                return _value(value, key)
            except KeyError:
                continue
    raise KeyError(key)


if __name__ == "__main__":
    main()
