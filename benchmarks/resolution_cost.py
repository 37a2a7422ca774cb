"""What the slice size costs on real data, before any model: a perfect anomaly map (the expert mask) and FLAIR
thresholding, each passed through the pipeline's resampling (240² -> s² -> 240²) at every slice size.

    python benchmarks/resolution_cost.py --dataset_dir DATA/brats18_sample --sizes 64,128,256

Rows per size: "mask through resampling (CEILING)" is the expert whole-tumour mask itself as the anomaly map, area-
downsampled and bilinearly upsampled like every residual map, thresholded at 0.5: the volume Dice no method can beat
at that size. "FLAIR thresholding": the normalised FLAIR through the same resampling, one threshold chosen on the
training subjects (mean volume Dice over a 200-step grid), scored on the validation subjects (Dice, AUPRC over brain
voxels). 256 is the native grid (240² padded to 256², no resampling). Test subjects are never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform

import numpy as np
import torch

from tsgm_components.detection.anomaly import anomaly_support
from tsgm_components.data.brats import find_dataset, load_subject
from tsgm_components.data.preprocessing import PreprocessConfig, normalize_volume, slices_to_volume, volume_to_slices
from tsgm_components.data.real_brats import read_split_manifest
from tsgm_components.evaluation.metrics import average_precision, overlap_metrics

from common import RESULTS, command_line, save_report  # benchmarks/common.py (this script's folder is sys.path[0])

THRESHOLDS = np.linspace(0.0, 1.0, 201)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Volume Dice of one tumour volume (``evaluation.metrics.overlap_metrics``: an empty prediction scores 0)."""
    return float(overlap_metrics(prediction[None], truth[None], (1.0, 1.0, 1.0), include_hd95=False)["dice"][0])


def through_size(volume: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """The (H, W, D) map after the pipeline's round trip at ``preprocess.image_size`` (band only)."""
    return slices_to_volume(volume_to_slices(volume, preprocess), volume.shape, preprocess)


def subject_maps(subject_files, preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    volumes = load_subject(subject_files, preprocess)
    support = anomaly_support(volumes.brain_mask, preprocess)
    truth = (volumes.seg > 0) & support
    flair = normalize_volume(volumes.arrays["flair"], volumes.brain_mask, preprocess)
    return {
        "support": support,
        "truth": truth,
        "flair": through_size(flair, preprocess) * support,
        "mask": through_size(truth.astype(np.float32), preprocess),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--out", default="resolution_cost_real")
    args = parser.parse_args()
    torch.set_num_threads(2)
    split = read_split_manifest()["split"]
    dataset = find_dataset(args.dataset_dir, require_seg=True)
    rows, record = [], {"command": command_line(__file__), "machine": platform.processor() or platform.machine(), "sizes": {}}
    for size in [int(s) for s in args.sizes.split(",")]:
        preprocess = dataclasses.replace(PreprocessConfig(), image_size=size)
        maps = {name: [subject_maps(dataset.subjects[s], preprocess) for s in split[name]] for name in ("train", "val")}
        with_tumour = {name: [m for m in cases if m["truth"].any()] for name, cases in maps.items()}

        def mean_dice(cases: list[dict], threshold: float, key: str = "flair") -> float:
            return float(np.mean([dice((m[key] > threshold) & m["support"], m["truth"]) for m in cases]))

        threshold = float(max(THRESHOLDS, key=lambda t: mean_dice(with_tumour["train"], t)))
        val = with_tumour["val"]
        result = {
            "ceiling_dice_val": mean_dice(val, 0.5, "mask"),
            "ceiling_dice_train": mean_dice(with_tumour["train"], 0.5, "mask"),
            "flair_threshold": threshold,
            "flair_dice_val": mean_dice(val, threshold),
            "flair_auprc_val": float(np.mean([average_precision(m["flair"][m["support"]], m["truth"][m["support"]]) for m in val])),
            "flair_healthy_band_fp_voxels": [int(((m["flair"] > threshold) & m["support"]).sum()) for m in maps["val"] if not m["truth"].any()],
        }
        record["sizes"][size] = result
        rows.append(
            f"| {size}² | {result['ceiling_dice_train']:.3f} / {result['ceiling_dice_val']:.3f} | {threshold:.3f} | "
            f"{result['flair_dice_val']:.3f} | {result['flair_auprc_val']:.3f} | {result['flair_healthy_band_fp_voxels']} |"
        )
        print(rows[-1], flush=True)
    table = (
        f"# What the slice size costs on real data (BraTS 2018, {len(split['train'])} train / {len(split['val'])} "
        f"validation subjects; test not read)\n\n`{record['command']}`\n\n"
        "| slice size | mask through resampling, volume Dice train / validation (CEILING) | FLAIR threshold (chosen on train) "
        "| FLAIR thresholding, validation volume Dice | validation AUPRC | healthy-band validation volume: FP voxels |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n256² is the native grid (240² padded, no resampling). "
        "Tumour volumes only in the Dice and AUPRC means.\n"
    )
    print(save_report(table, record, RESULTS, args.out))


if __name__ == "__main__":
    main()
