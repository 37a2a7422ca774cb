"""What each set of modalities is worth to an ensemble, on the VALIDATION split, and what the calibration picks.

    python benchmarks/modality_sets.py --work_dir runs/demo --detection_dir runs/demo/detections/tsgm [--out modality_sets_cpu]

For every non-empty subset of the four modalities: the best validation volume Dice over the evaluation bundle's
simplex grid restricted to weights > 0 exactly on that subset (threshold chosen on validation, as the bundle does),
then what ``evaluation.calibrate`` picks with the CPU configuration's ``modality_tolerance`` (and with 0). A detection
samples only the weighted modalities (``reconstruct_modalities: weighted``), so the number of modalities is the
sampling cost. Reads ``DETECTION_DIR/validation`` (all four maps) and the validation ground truth only.

Writes ``benchmarks/results/<--out>.{md,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


from common import RESULTS, command_line, evaluation_settings, save_report
from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.prepare import read_volumes_split
from tsgm_components.detection.ensembling import simplex_grid
from tsgm_components.evaluation.harness import calibrate, load_cases, read_prepared


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work_dir", required=True, type=Path)
    ap.add_argument("--detection_dir", required=True, type=Path)
    ap.add_argument(
        "--tolerances",
        type=float,
        nargs="+",
        default=None,
        help="modality_tolerance values to show the picks of (default: 0 and the CPU configuration's)",
    )
    ap.add_argument("--out", default="modality_sets_cpu")
    ap.add_argument("--out_dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    volumes, preprocess, _ = read_prepared(args.work_dir / "prepared")
    cases = load_cases(args.detection_dir / "validation", read_volumes_split(volumes, "validation"), preprocess)
    settings = evaluation_settings()
    grid = simplex_grid(len(MODALITIES), settings["weight_step"])
    rows = []
    for size in range(1, len(MODALITIES) + 1):
        for subset in itertools.combinations(MODALITIES, size):
            inside = [MODALITIES.index(m) for m in subset]
            points = [w for w in grid if (w[inside] > 0).all() and w.sum() - w[inside].sum() < 1e-9]
            best = max(
                (
                    calibrate(cases, "fixed", fixed_weights=dict(zip(MODALITIES, map(float, w))), threshold_bins=settings["threshold_bins"])
                    for w in points
                ),
                key=lambda c: c["validation_dice"],
            )
            rows.append({"modalities": list(subset), "validation_dice": best["validation_dice"], "weights": best["weights"]})
    picks = {}
    for tolerance in sorted(set(args.tolerances or [0.0, float(settings["modality_tolerance"])])):
        chosen = calibrate(cases, **{**settings, "modality_tolerance": tolerance})
        picks[tolerance] = {"weights": chosen["weights"], "validation_dice": chosen["validation_dice"]}
    command = command_line(__file__, argv)
    lines = [
        "# Modality sets on the validation split (what an ensemble of each is worth; the test split is not read)",
        "",
        f"`{command}`",
        "",
        f"Detections: `{args.detection_dir}`; {len(cases)} validation subjects; weight grid step {settings['weight_step']}; "
        "threshold chosen on validation for every weight vector.",
        "",
        "| modalities (sampling passes) | best validation volume Dice | its weights (T1, T1ce, T2, FLAIR) |",
        "|---|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: (len(r["modalities"]), -r["validation_dice"])):
        weights = ", ".join(f"{row['weights'][m]:.1f}" for m in MODALITIES)
        lines.append(f"| {' + '.join(row['modalities'])} ({len(row['modalities'])}) | {row['validation_dice']:.3f} | {weights} |")
    lines += [
        "",
        "What `evaluation.calibrate` picks (the evaluation bundle's CPU settings; the weight search runs on its voxel "
        "sample, the Dice here is exact):",
        "",
    ]
    for tolerance, pick in picks.items():
        weights = ", ".join(f"{pick['weights'][m]:.2f}" for m in MODALITIES)
        n = sum(pick["weights"][m] > 0 for m in MODALITIES)
        lines.append(f"- `modality_tolerance` {tolerance:g}: weights ({weights}), {n} modalities, validation Dice {pick['validation_dice']:.3f}")
    table = "\n".join(lines) + "\n"
    save_report(table, {"command": command, "rows": rows, "picks": {str(k): v for k, v in picks.items()}}, args.out_dir, args.out)
    print(table)


if __name__ == "__main__":
    main()
