"""Paired bootstrap differences between rows of two evaluations of the same test split, e.g. every peer of a
comparison against a TSGM model evaluated later on the same subjects:

    python benchmarks/paired_differences.py --rows benchmarks/results/compare_real_summary.json \
        --reference benchmarks/results/real_test_cpu_summary.json --reference_method tsgm --out compare_real_vs_shipped

Reads each evaluation's ``summary.json`` (``per_subject_volume_dice`` and ``per_subject_auprc``) and gives, per row
method, the mean difference row − reference over the subjects both scored, with the harness's paired bootstrap CI
(:func:`tsgm_components.evaluation.metrics.paired_bootstrap`: 10,000 resamples, seed 0). Reads recorded results only:
no split is detected or scored again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, command_line, save_report  # noqa: E402

from tsgm_components.evaluation.metrics import paired_bootstrap  # noqa: E402

METRICS = {"volume DSC": "per_subject_volume_dice", "AUPRC": "per_subject_auprc"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, required=True, help="summary.json whose methods are the rows")
    parser.add_argument("--reference", type=Path, required=True, help="summary.json holding the reference method")
    parser.add_argument("--reference_method", default="tsgm")
    parser.add_argument("--skip", nargs="*", default=[], help="row methods left out")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", required=True, help="NAME of benchmarks/results/NAME.{md,json}")
    args = parser.parse_args()

    rows = json.loads(args.rows.read_text())
    reference = json.loads(args.reference.read_text())[args.reference_method]
    header = " | ".join(f"{name} − {args.reference_method} [95 % CI]" for name in METRICS)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(METRICS)]
    record: dict = {"command": command_line(__file__), "rows": str(args.rows), "reference": str(args.reference), "differences": {}}
    for method, summary in rows.items():
        if method in args.skip:
            continue
        cells = []
        for name, key in METRICS.items():
            difference = paired_bootstrap(summary[key], reference[key])
            record["differences"].setdefault(method, {})[name] = difference
            cells.append(f"{difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}] (n={difference['n']})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    title = f"# Paired differences against `{args.reference_method}` of {args.reference.name}\n\n"
    text = title + f"`{record['command']}`\n\n" + (args.note + "\n\n" if args.note else "") + "\n".join(lines) + "\n"
    print(text)
    print(save_report(text, record, RESULTS, args.out))


if __name__ == "__main__":
    main()
