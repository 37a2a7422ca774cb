"""The paper's Fig. 8: mean and variance of the anomaly map over independent runs of a stochastic sampler.

Input: K ≥ 2 detection folders of the same subjects made with the same stochastic sampler and calibration but
different ``sample_seed`` (vejp_anomaly inference with ``paper_sampler.yaml`` and ``--sample_seed k --method
tsgm_pc_seed<k>``).
For each subject present in all of them this writes, in ``out_dir/<id>/``, the voxel-wise mean and variance (ddof 1)
of the runs' ensemble maps (``<id>_anomaly.nii.gz``, the calibration's weighted sum) as NIfTI in the input's geometry,
and reports per run the threshold-free AUPRC and the mask Dice against the ground truth, the Dice between the runs'
masks, and the mean standard deviation inside the tumour and in the rest of the brain. The deterministic default
(the posterior mean: every run the same map, variance 0 by construction) can be shown beside them, labelled so.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from tsgm_components.data.brats import load_subject
from tsgm_components.data.preprocessing import normalize_volume
from tsgm_components.data.prepare import read_volumes_split
from tsgm_components.detection.masking import Calibration
from tsgm_components.errors import TsgmInputError
from tsgm_components.evaluation.harness import load_case, load_ground_truth, read_prepared
from tsgm_components.evaluation.metrics import average_precision, overlap_metrics
from tsgm_components.evaluation.report import _json_safe, _pyplot
from tsgm_components.io import atomic_dir, atomic_path, save_json


def run_maps(run_dirs: Sequence[Path], subject: str) -> list[nib.Nifti1Image]:
    """Each run's ensemble map ``<run>/<id>/<id>_anomaly.nii.gz`` (all must exist and share one shape)."""
    images = []
    for run in run_dirs:
        path = run / subject / f"{subject}_anomaly.nii.gz"
        if not path.is_file():
            raise TsgmInputError(path, "ensemble anomaly map missing: detect every run with the same --calibration_file")
        images.append(nib.load(str(path)))
    if len({image.shape for image in images}) != 1:
        raise TsgmInputError(run_dirs[0] / subject, f"the runs' maps differ in shape: {[image.shape for image in images]}")
    return images


def mean_variance(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise mean and unbiased variance (ddof 1) over the first axis of a (K, ...) stack, K ≥ 2; float32."""
    if stack.shape[0] < 2:
        raise ValueError(f"a variance needs at least 2 runs, got {stack.shape[0]}")
    return stack.mean(0, dtype=np.float64).astype(np.float32), stack.var(0, ddof=1, dtype=np.float64).astype(np.float32)


def mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice between two runs' boolean masks (1 when both are empty: the runs agree)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def truth_dice(masks: Sequence[np.ndarray], target: np.ndarray, spacing: Sequence[float]) -> list[float] | None:
    """Volume Dice of each mask against the ground truth, as the evaluation tables define it
    (:func:`~tsgm_components.evaluation.metrics.overlap_metrics`); None for a subject without tumour."""
    if not target.any():
        return None
    dice = overlap_metrics(np.stack(masks), np.broadcast_to(target, (len(masks), *target.shape)), spacing, include_hd95=False)["dice"]
    return [float(value) for value in dice]


def run_uncertainty(
    prepared_dir: str | Path,
    detections_dir: str | Path,
    runs: Sequence[str],
    calibration_file: str | Path,
    out_dir: str | Path,
    split: str = "validation",
    deterministic: str | None = None,
    overwrite: bool = False,
) -> str:
    """Bundle entry point (run ``uncertainty``): Fig. 8's NIfTI maps, figure and table (see module docstring).

    runs: K ≥ 2 detection folder names, ``detections_dir/<run>/<split>/<id>/``; calibration_file: the calibration every
    run was detected with (weights, threshold); deterministic: the default sampler's detection folder name for the same
    split (optional, reported beside the runs, labelled deterministic). Writes ``out_dir`` atomically:
    ``<id>/<id>_anomaly_{mean,variance}.nii.gz``, ``figures/uncertainty.png``, ``results.md``, ``summary.json``.
    Returns the markdown.
    """
    folders = [Path(detections_dir) / str(run) / split for run in runs]
    if len(folders) < 2:
        raise TsgmInputError("runs", f"Fig. 8 needs at least 2 sampling runs, got {len(folders)}")
    volumes, preprocess, _ = read_prepared(prepared_dir)
    calibration = Calibration.load(calibration_file)
    items = [item for item in read_volumes_split(volumes, split) if all((folder / str(item["subject"])).is_dir() for folder in folders)]
    if not items:
        raise TsgmInputError(folders[0], f"no {split} subject was detected by every run")
    subjects, panels = {}, []
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for item in items:
            subject = str(item["subject"])
            images = run_maps(folders, subject)
            mean, variance = mean_variance(np.stack([np.asarray(image.dataobj, dtype=np.float32) for image in images]))
            (tmp / subject).mkdir()
            for name, array in (("mean", mean), ("variance", variance)):
                nib.save(nib.Nifti1Image(array, images[0].affine, images[0].header), str(tmp / subject / f"{subject}_anomaly_{name}.nii.gz"))
            truth = load_ground_truth(item, preprocess)
            cases = [load_case(folder, item, preprocess, truth, calibration.weighted) for folder in folders]
            scores = [case.score(calibration.weights) for case in cases]  # (H, W, Z), model orientation
            masks = [calibration.mask(score, truth.brain, truth.spacing).astype(bool) for score in scores]
            target, brain = truth.target, truth.brain
            std = np.stack(scores).std(0, ddof=1)
            row: dict[str, Any] = {
                "auprc": [average_precision(score[brain], target[brain]) for score in scores],
                "dice": truth_dice(masks, target, truth.spacing),
                "dice_between_runs": [mask_agreement(a, b) for a, b in itertools.combinations(masks, 2)],
                "mean_std_tumour": float(std[target].mean()) if target.any() else None,
                "mean_std_healthy_brain": float(std[brain & ~target].mean()),
            }
            default = None
            if deterministic is not None:
                default = load_case(Path(detections_dir) / deterministic / split, item, preprocess, truth, calibration.weighted).score(
                    calibration.weights
                )
                row["deterministic_auprc"] = average_precision(default[brain], target[brain])
                default_mask = calibration.mask(default, truth.brain, truth.spacing).astype(bool)
                row["deterministic_dice"] = (truth_dice([default_mask], target, truth.spacing) or [None])[0]
            subjects[subject] = row
            k = int(np.argmax(target.sum((0, 1))))  # the slice with the largest tumour area
            inputs = load_subject({**item, "seg": None}, preprocess)
            flair = normalize_volume(inputs.arrays["flair"], inputs.brain_mask, preprocess)
            z = cases[0].z_indices[k]
            panels.append((subject, z, flair[:, :, z], target[:, :, k], [s[:, :, k] for s in scores], None if default is None else default[:, :, k]))
        plot_uncertainty(panels, tmp / "figures" / "uncertainty.png")
        markdown = uncertainty_table(subjects, len(folders), deterministic is not None)
        (tmp / "results.md").write_text(markdown)
        summary = {"split": split, "runs": [str(f) for f in folders], "deterministic": deterministic, "calibration_file": str(calibration_file)}
        save_json(_json_safe({**summary, "subjects": subjects}), tmp / "summary.json")
    return markdown


def uncertainty_table(subjects: dict[str, dict[str, Any]], n_runs: int, with_default: bool) -> str:
    """Markdown: per subject, each run's AUPRC and Dice, their spread, the runs' agreement and the mean std."""
    head = "| subject | AUPRC per run | Dice per run | Dice between runs | mean std, tumour | mean std, rest of brain |"
    head += " deterministic default: AUPRC, Dice |" if with_default else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def number(value: float | None, digits: int = 3) -> str:  # – for a subject without tumour
        return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    for subject, row in subjects.items():
        line = (
            f"| {subject} | {', '.join(number(v) for v in row['auprc'])} | {', '.join(number(v) for v in row['dice'] or [None])} | "
            f"{min(row['dice_between_runs']):.3f}–{max(row['dice_between_runs']):.3f} | {number(row['mean_std_tumour'], 4)} | "
            f"{row['mean_std_healthy_brain']:.4f} |"
        )
        line += f" {number(row['deterministic_auprc'])}, {number(row['deterministic_dice'])} |" if with_default else ""
        lines.append(line)
    note = (
        f"Mean and variance over {n_runs} independent runs of a stochastic sampler (the paper's Fig. 8); AUPRC of the "
        "ensemble map over brain voxels of the evaluated slices, Dice of the calibrated mask, std over the runs per voxel."
    )
    if with_default:
        note += " The deterministic default (posterior mean) gives the same map on every run: its variance is 0 by construction."
    return note + "\n\n" + "\n".join(lines) + "\n"


def plot_uncertainty(panels: list[tuple[str, int, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray | None]], path: Path) -> None:
    """One row per subject (slice z with the largest tumour area): input FLAIR with the ground truth outlined | each
    run's map | their mean | their variance (its own colour scale, maximum in the title) | the deterministic default's
    map when given. Maps share one colour scale per row."""
    plt = _pyplot()
    n_runs, with_default = len(panels[0][4]), panels[0][5] is not None
    columns = ["input FLAIR, ground truth", *(f"PC run {i + 1}" for i in range(n_runs)), "mean of the runs", "variance of the runs"]
    columns += ["posterior mean (deterministic default)"] if with_default else []
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(2.2 * len(columns), 2.5 * len(panels)), squeeze=False)
    for row_index, (subject, z, flair, target, maps, default) in enumerate(panels):
        stack = np.stack(maps)
        variance = stack.var(0, ddof=1)
        vmax = max(float(stack.max()), 1e-6)
        images = [(flair, "gray", 1.0), *((m, "magma", vmax) for m in maps), (stack.mean(0), "magma", vmax)]
        images += [(variance, "viridis", max(float(variance.max()), 1e-12))] + ([(default, "magma", vmax)] if with_default else [])
        for column, (ax, (image, cmap, top)) in enumerate(zip(axes[row_index], images)):
            ax.imshow(np.rot90(image), cmap=cmap, vmin=0, vmax=top)
            if column == 0:
                ax.contour(np.rot90(target.astype(float)), levels=[0.5], colors="lime", linewidths=0.7)
                ax.set_ylabel(f"{subject}\nz={z}", fontsize=7)
            title = columns[column] + (f"\n(max {top:.2g})" if cmap == "viridis" else "")
            ax.set_title(title if row_index == 0 or cmap == "viridis" else "", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")  # the variance column's two-line title stays inside
    plt.close(fig)
