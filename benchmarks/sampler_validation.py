"""Sampler settings compared on the VALIDATION split by the whole detection pipeline: the cheapest that keeps Dice.

    python benchmarks/sampler_validation.py --work_dir runs/demo --settings heun:n_steps=4,n_draws=2 heun:n_steps=4,n_draws=1 ...

For every setting (``sampler:key=value,...``, keys of ``bundles/vejp_anomaly/configs/inference.yaml``), in one
process, side by side: VE-JP detection of every validation subject of ``WORK_DIR/prepared/volumes.json`` through the
bundle's own inference config (``--checkpoint``, default the shipped model; all four modalities, as a weight search
needs), written to ``WORK_DIR/sampler_validation/<checkpoint stem>/<setting>/validation`` (reused when complete: ``skip_existing``), then
the evaluation bundle's calibration on those maps (``evaluation.calibrate`` with the settings of
``tsgm_evaluation/configs/evaluate.yaml`` + ``cpu.yaml``): ensemble weights and threshold chosen on validation, and
the validation volume Dice of that rule. The test split is never read. Seconds per volume: the sampler's mean
reconstruction time as recorded in each volume's ``_detection.json``, all four modalities
(a reused folder keeps the time of the run that wrote it). ``--subjects``: a stated subset of the validation split
for samplers too costly for all of it (every setting of the run is scored on the same subset).

Writes ``benchmarks/results/<--out>.{md,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser

from common import RESULTS, command_line, evaluation_settings, parse_setting, save_report, setting_label
from tsgm_components import bundle_dir
from tsgm_components.data.brats import MODALITIES
from tsgm_components.evaluation.harness import calibrate, load_cases, read_prepared
from tsgm_components.data.prepare import read_volumes_split


def detect(work_dir: Path, checkpoint: str, label: str, setting: dict[str, Any], subjects: list[str] | None) -> tuple[Path, int]:
    """Validation detection (of ``subjects`` only, when given) with ``setting`` through the bundle's inference config;
    (folder, NFE per slice)."""
    out = work_dir / "sampler_validation" / Path(checkpoint).stem / label / "validation"
    parser = ConfigParser()
    parser.read_config(bundle_dir("vejp_anomaly") + "/configs/inference.yaml")
    parser.update(
        {
            "work_dir": str(work_dir),
            "checkpoint": checkpoint,
            "datalist": str(work_dir / "prepared" / "volumes.json"),
            "split": "validation",
            "subjects": subjects,
            "detection_dir": str(out),
            "skip_existing": True,
            "reconstruct_modalities": "all",
            "calibration_file": None,
            **setting,
        }
    )
    parser.get_parsed_content("inference")
    return out, int(parser.get_parsed_content("slice_inferer").nfe_per_slice)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work_dir", required=True, type=Path)
    ap.add_argument("--checkpoint", default=str(Path(bundle_dir("vejp_anomaly")) / "models" / "model.pt"))
    ap.add_argument("--settings", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--subjects", nargs="+", default=None, help="validation subjects to score (default: all)")
    ap.add_argument("--out", default="sampler_validation_cpu")
    ap.add_argument("--out_dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = args.work_dir.resolve()
    volumes, preprocess, _ = read_prepared(work_dir / "prepared")
    items = read_volumes_split(volumes, "validation")
    if args.subjects:
        unknown = sorted(set(args.subjects) - {item["subject"] for item in items})
        if unknown:
            raise SystemExit(f"not validation subjects of {work_dir / 'prepared' / 'volumes.json'}: {unknown}")
        items = [item for item in items if item["subject"] in args.subjects]
    calibration_kwargs = evaluation_settings()
    truths: dict = {}
    rows = []
    for text in args.settings:
        folder, nfe = detect(work_dir, args.checkpoint, setting_label(text), parse_setting(text), args.subjects)
        seconds = [json.loads(p.read_text())["seconds"]["reconstruction"] for p in sorted(folder.glob("*/*_detection.json"))]
        calibration = calibrate(load_cases(folder, items, preprocess, truths), **calibration_kwargs)
        rows.append(
            {
                "setting": text,
                "nfe_per_slice": nfe,
                "seconds_per_volume": float(np.mean(seconds)),
                "validation_volume_dice": calibration["validation_dice"],
                "weights": calibration["weights"],
                "threshold": calibration["threshold"],
                "detection_dir": str(folder),
            }
        )
        print(f"{text}: NFE {nfe}, {rows[-1]['seconds_per_volume']:.1f} s/volume, validation Dice {calibration['validation_dice']:.3f}", flush=True)
    base = rows[0]
    command = command_line(__file__, argv)
    lines = [
        "# Sampler settings on the validation split (calibrated on validation; the test split is not read)",
        "",
        f"`{command}`",
        "",
        f"Checkpoint: `{args.checkpoint}`; {len(items)} validation subjects ({', '.join(i['subject'] for i in items)}); "
        "all four modalities reconstructed; "
        f"torch threads {torch.get_num_threads()}. Speed-up against the first row; seconds are each folder's recorded "
        "reconstruction time (a reused folder keeps that of the run that wrote it, and other load on the machine "
        "changes them): NFE is the cost measure.",
        "",
        "| setting | NFE / slice | s / volume (4 modalities) | speed-up | validation volume Dice | Δ Dice | weights (T1, T1ce, T2, FLAIR) | threshold |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        weights = ", ".join(f"{row['weights'][m]:.2f}" for m in MODALITIES)
        lines.append(
            f"| {row['setting']} | {row['nfe_per_slice']} | {row['seconds_per_volume']:.1f} | "
            f"{base['seconds_per_volume'] / row['seconds_per_volume']:.2f}× | {row['validation_volume_dice']:.3f} | "
            f"{row['validation_volume_dice'] - base['validation_volume_dice']:+.3f} | {weights} | {row['threshold']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    save_report(table, {"command": command, "checkpoint": args.checkpoint, "rows": rows}, args.out_dir, args.out)
    print(table)


if __name__ == "__main__":
    main()
