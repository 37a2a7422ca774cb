"""How much a pseudo-pair's condition differs from its healthy slice: the measure that lesion blending changes.

    python benchmarks/pseudo_pair_change.py --pairs runs/demo/pseudo_pairs runs/blend/pseudo_pairs --out NAME

Per pairs folder, over every 7th training pair: the mean over pairs of the median |x_B~ − x_A| inside the brain
(x_A > 0), and the mean fraction of brain pixels changed by more than 0.05 (a 64² FLAIR brain median is 0.4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tsgm_components.data.pseudo_pairs import load_pseudo_pairs

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

CHANGED = 0.05
EVERY = 7


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, help="pseudo-pairs folders (with pseudo_pairs.json)")
    parser.add_argument("--out", default=None, help="also write benchmarks/results/OUT.md and .json")
    args = parser.parse_args(argv)
    rows = []
    for folder in args.pairs:
        items = load_pseudo_pairs(folder)[::EVERY]
        medians, changed = [], []
        for item in items:
            healthy, condition = np.load(item["image"]), np.load(item["condition"])
            brain = healthy > 0
            difference = np.abs(condition - healthy)[brain]
            medians.append(float(np.median(difference)))
            changed.append(float((difference > CHANGED).mean()))
        rows.append(
            {
                "pairs": folder,
                "n_pairs": len(items),
                "median_change_in_brain": float(np.mean(medians)),
                f"fraction_changed_over_{CHANGED}": float(np.mean(changed)),
            }
        )
    lines = [
        "# Pseudo-pair conditions against their healthy slices",
        "",
        f"Command: `python benchmarks/pseudo_pair_change.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        f"| pairs | training pairs used | mean median abs(x_B~ − x_A) in the brain | brain fraction changed > {CHANGED} |",
        "|---|---|---|---|",
        *(f"| {r['pairs']} | {r['n_pairs']} | {r['median_change_in_brain']:.4f} | {r[f'fraction_changed_over_{CHANGED}']:.3f} |" for r in rows),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        print(f"wrote {save_report(table, rows, Path(__file__).resolve().parent / 'results', args.out)}.md")


if __name__ == "__main__":
    main()
