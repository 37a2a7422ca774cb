"""Best-possible FLAIR-thresholding Dice of a BraTS-layout dataset: how hard the data is for intensity thresholding.

    python benchmarks/flair_best_possible.py --dataset_dir runs/demo/phantom

The field anchor (Meissen et al. 2021): on BraTS, thresholding the FLAIR intensity reaches at best 0.738 Dice. The
default phantom is calibrated against that figure only (never against a learned method). Here: every subject with
tumour in the processed axial range (default 80-128), FLAIR normalised as ``tsgm prepare`` does (default
``brain_median``), at native resolution; one global threshold maximising the mean per-volume Dice over all of them
(an upper bound: the threshold is chosen on the very volumes it scores), and each subject's own best threshold.
Writes ``benchmarks/results/flair_best_possible_<dataset folder>.{md,json}`` and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tsgm_components.data.brats import find_dataset, load_subject
from tsgm_components.data.preprocessing import NORMALIZATIONS, PreprocessConfig, normalize_volume
from tsgm_components.detection.ensembling import BrainVoxels, select_threshold

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

RESULTS = Path(__file__).resolve().parent / "results"
BRATS_ANCHOR = 0.738


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--normalization", default="brain_median", choices=NORMALIZATIONS)
    parser.add_argument("--z_min", type=int, default=80)
    parser.add_argument("--z_max", type=int, default=128)
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subject ids (default: all)")
    args = parser.parse_args(argv)
    dataset = Path(args.dataset_dir)
    preprocess = PreprocessConfig(z_min=args.z_min, z_max=args.z_max, normalization=args.normalization)
    z = slice(preprocess.z_min, preprocess.z_max + 1)
    volumes, names, lesion_fraction = [], [], []
    found = find_dataset(dataset).subjects
    for subject in args.subjects or list(found):
        loaded = load_subject(found[subject], preprocess)
        brain = loaded.brain_mask[:, :, z]
        target = (loaded.seg > 0)[:, :, z][brain]
        if not target.any():
            continue
        flair = normalize_volume(loaded.arrays["flair"], loaded.brain_mask, preprocess)[:, :, z][brain]
        volumes.append(BrainVoxels(flair[:, None], target))
        names.append(subject)
        lesion_fraction.append(float(target.mean()))
    threshold, dice = select_threshold(volumes, np.ones(1))
    rows = []
    for name, voxels, fraction in zip(names, volumes, lesion_fraction):
        predicted = voxels.maps[:, 0] > threshold
        at_global = 2 * np.count_nonzero(predicted & voxels.target) / (np.count_nonzero(predicted) + np.count_nonzero(voxels.target))
        rows.append(
            {
                "subject": name,
                "lesion_percent_of_brain": round(100 * fraction, 2),
                "dice_at_global_threshold": round(float(at_global), 3),
                "dice_at_own_best_threshold": round(select_threshold([voxels], np.ones(1))[1], 3),
            }
        )
    command = f"python benchmarks/flair_best_possible.py --dataset_dir {args.dataset_dir}" + (
        f" --normalization {args.normalization}" if args.normalization != "brain_median" else ""
    )
    lines = [
        f"# Best-possible FLAIR thresholding on {dataset.name}",
        "",
        f"`{command}`: {len(volumes)} volumes with tumour in z {preprocess.z_min}-{preprocess.z_max}, FLAIR normalised "
        f"with `{args.normalization}`, native resolution.",
        "",
        f"**Best-possible mean volume Dice (one global threshold, chosen on these volumes): {dice:.3f}** "
        f"(threshold {threshold:.3f}); BraTS anchor {BRATS_ANCHOR} (Meissen et al. 2021).",
        "",
        "| subject | lesion % of brain (evaluated slices) | Dice at the global threshold | Dice at its own best threshold |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['subject']} | {r['lesion_percent_of_brain']} | {r['dice_at_global_threshold']} | {r['dice_at_own_best_threshold']} |" for r in rows
    ]
    record = {"command": command, "best_possible_mean_volume_dice": dice, "threshold": threshold, "anchor": BRATS_ANCHOR, "rows": rows}
    save_report("\n".join(lines) + "\n", record, RESULTS, f"flair_best_possible_{dataset.name}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
