"""Evaluation report: per-case and per-slice CSV, summary JSON, markdown tables and PNG figures.

Files written into the evaluation folder: ``per_case.csv`` (one row per method × test subject), ``per_slice.csv``
(one row per method × evaluated slice, ``kind`` = tumour | healthy), ``summary.json`` (mean ± std per method and
level, counts behind every convention, calibration), ``results.md`` (the tables) and ``figures/boxplots.png``,
``figures/examples.png``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tsgm_components.io import atomic_path, save_json
from tsgm_components.evaluation.metrics import OVERLAP_METRICS, mean_std, paired_bootstrap
from tsgm_components.evaluation.results import MethodResult

CASE_METRICS = (*OVERLAP_METRICS, "auprc")
#: Main table: (header, summary level, metric); per 3D volume unless stated.
MAIN_COLUMNS = (
    ("volume DSC", "volume", "dice"),
    ("slice DSC", "slice", "dice"),
    ("AUPRC", "volume", "auprc"),
    ("IoU", "volume", "iou"),
    ("precision", "volume", "precision"),
    ("recall", "volume", "recall"),
    ("HD95 (mm)", "volume", "hd95"),
)
SLICE_COLUMNS = (("DSC", "dice"), ("AUPRC", "auprc"), ("IoU", "iou"), ("PRE", "precision"), ("REC", "recall"), ("HD95 (mm)", "hd95"))
EXAMPLE_PANELS = ("input FLAIR", "healthy FLAIR", "anomaly map", "mask", "ground truth")


def summarise(result: MethodResult) -> dict[str, Any]:
    """Mean ± std of every metric per level, healthy-slice false positives, convention counts and settings."""
    healthy = result.healthy_rows
    return {
        "volume": {m: mean_std([row[m] for row in result.volume_rows]) for m in CASE_METRICS},
        "slice": {m: mean_std([row[m] for row in result.slice_rows]) for m in CASE_METRICS},
        "role": result.role,
        "healthy_volumes": {
            "n": len(result.healthy_volume_rows),
            "false_positive_rate": float(np.mean([row["false_positive"] for row in result.healthy_volume_rows]))
            if result.healthy_volume_rows
            else math.nan,
            "fp_voxel_fraction": float(np.mean([row["fp_fraction"] for row in result.healthy_volume_rows]))
            if result.healthy_volume_rows
            else math.nan,
        },
        "per_subject_volume_dice": {row["subject"]: row["dice"] for row in result.volume_rows},
        "per_subject_auprc": {row["subject"]: row["auprc"] for row in result.volume_rows},
        "healthy_slices": {
            "n": len(healthy),
            "false_positive_rate": float(np.mean([row["false_positive"] for row in healthy])) if healthy else math.nan,
            "fp_voxel_fraction": mean_std([row["fp_fraction"] for row in healthy]),
        },
        "counts": {
            "test_volumes_with_tumour": len(result.volume_rows),
            "test_volumes_without_tumour": len(result.volumes_without_tumour),
            "tumour_slices": len(result.slice_rows),
            "empty_prediction_volumes": sum(row["empty_prediction"] for row in result.volume_rows),
            "empty_prediction_slices": sum(row["empty_prediction"] for row in result.slice_rows),
        },
        "oracle_test_threshold": result.oracle,
        "nfe_per_slice": result.nfe_per_slice,
        "seconds_per_volume": result.seconds_per_volume,
        "calibration": result.calibration,
    }


def _cell(stats: Mapping[str, Any], digits: int = 3) -> str:
    if not stats["n"]:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def row_label(name: str, summary: Mapping[str, Any]) -> str:
    """A method's name in the tables, with its role when it is not a method: CEILING (an upper bound by construction),
    REFERENCE (given what no method has, not a bound), CONTROL."""
    return f"{name} ({summary['role'].upper()})" if summary.get("role") else name


#: What each row role means, and what the known rows are: the note under a table names only the rows it holds.
ROLE_NOTES = {
    "ceiling": "CEILING rows are upper bounds by construction, not results.",
    "reference": "REFERENCE rows are given what no method has and are not bounds.",
    "control": "CONTROL rows are what a part of TSGM must beat.",
}
ROW_NOTES = {
    "oracle_reconstruction": "oracle_reconstruction reads the phantom's healthy twins (healthy = the twin: what residual detection "
    "reaches with a perfect reconstruction).",
    "vejp_true_pairs": "vejp_true_pairs is stage 2 trained on (twin, real) pairs, i.e. TSGM with a perfect stage 1 (it also trains "
    "on tumour slices, about 2.6x TSGM's training slices).",
    "regression": "regression is the same network, pairs and budget trained by plain L2 regression: does diffusion training add anything?",
    "flair_threshold_model_size": "flair_threshold_model_size is FLAIR thresholding through the models' resampling (resolution parity).",
    "cyclegan": "cyclegan is stage 1 alone: tsgm − cyclegan is what stage 2 adds.",
}


def ladder_note(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The note under a table: what its row roles mean and what its known rows are (only those present)."""
    roles = {summary.get("role") for summary in summaries.values()}
    parts = [note for role, note in ROLE_NOTES.items() if role in roles]
    parts += [note for name, note in ROW_NOTES.items() if name in summaries]
    return " ".join(parts)


#: Rows every other row is compared with, paired per subject, when present.
REFERENCE_ROWS = ("flair_threshold", "tsgm")
CI_METRICS = (("volume DSC", "per_subject_volume_dice"), ("AUPRC", "per_subject_auprc"))


def _interval(ci: Mapping[str, Any]) -> str:
    if not ci["n"]:
        return "n/a"
    if not math.isfinite(ci["low"]):
        return f"{ci['difference']:+.3f} (n=1)"
    return f"{ci['difference']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]"


def confidence_table(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown lines: every row's mean paired difference to each :data:`REFERENCE_ROWS` row present, in volume DSC and
    AUPRC, with its bootstrap 95 % CI over the subjects (:func:`~tsgm_components.evaluation.metrics.paired_bootstrap`)."""
    references = [name for name in REFERENCE_ROWS if name in summaries]
    if not references:
        return []
    header = " | ".join(f"{label} − {reference}" for reference in references for label, _ in CI_METRICS)
    lines = [
        "",
        "## Paired differences, mean [bootstrap 95 % CI] over the subjects with tumour (10,000 resamples, seed 0)",
        "",
        "A difference whose interval contains 0 is not shown to be a difference on these subjects.",
        "",
        f"| method | {header} |",
        "|---" * (1 + len(references) * len(CI_METRICS)) + "|",
    ]
    for name, summary in summaries.items():
        cells = [
            "—" if name == reference else _interval(paired_bootstrap(summary[key], summaries[reference][key]))
            for reference in references
            for _, key in CI_METRICS
        ]
        lines.append(f"| {row_label(name, summary)} | " + " | ".join(cells) + " |")
    return lines


def markdown_tables(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The report's markdown: main table (per 3D volume + slice DSC), per-subject Dice, paper-protocol slice table,
    oracle table."""
    lines = [
        "## Test split, calibrated on the validation split (mean ± std)",
        "",
        "Volume metrics: per 3D volume restricted to the processed slices z_min..z_max, over the volumes with tumour "
        "there; slice DSC: per tumour slice. Healthy-volume FPR: fraction of volumes without tumour (healthy subjects "
        "and tumours outside the range) with any predicted voxel; healthy-volume FP voxels: mean fraction of their brain "
        "voxels predicted (the calibration's healthy_fpr_limit bounds it on validation); healthy-slice FPR: fraction "
        "of tumour-free slices with any predicted voxel. NFE: network evaluations per slice.",
        "",
        "| method | "
        + " | ".join(h for h, _, _ in MAIN_COLUMNS)
        + " | healthy-volume FPR | healthy-volume FP voxels | healthy-slice FPR | NFE | s / volume |",
        "|---" * (len(MAIN_COLUMNS) + 6) + "|",
    ]
    for name, summary in summaries.items():
        cells = [_cell(summary[level][metric], 2 if metric == "hd95" else 3) for _, level, metric in MAIN_COLUMNS]
        volumes = summary["healthy_volumes"]
        cells.append(f"{_number(volumes['false_positive_rate'], 2)} (n={volumes['n']})")
        cells.append(_number(100 * volumes["fp_voxel_fraction"], 2) + " %" if volumes["n"] else "–")
        cells.append(_number(summary["healthy_slices"]["false_positive_rate"], 3))
        cells.append(_number(summary["nfe_per_slice"], 0))
        cells.append(_number(summary["seconds_per_volume"], 1))
        lines.append(f"| {row_label(name, summary)} | " + " | ".join(cells) + " |")
    if any(summary.get("role") for summary in summaries.values()):
        lines += ["", ladder_note(summaries)]
    lines += confidence_table(summaries)
    subjects = sorted({subject for summary in summaries.values() for subject in summary["per_subject_volume_dice"]})
    lines += [
        "",
        "## Volume DSC per test subject with tumour in the evaluated slices",
        "",
        "| subject | " + " | ".join(row_label(name, summary) for name, summary in summaries.items()) + " |",
        "|---" * (len(summaries) + 1) + "|",
    ]
    for subject in subjects:
        cells = [_number(summary["per_subject_volume_dice"].get(subject), 3) for summary in summaries.values()]
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per tumour slice (the paper's protocol, standard metric definitions)",
        "",
        "| method | " + " | ".join(h for h, _ in SLICE_COLUMNS) + " | tumour slices | empty predictions |",
        "|---" * (len(SLICE_COLUMNS) + 3) + "|",
    ]
    for name, summary in summaries.items():
        cells = [_cell(summary["slice"][metric], 2 if metric == "hd95" else 3) for _, metric in SLICE_COLUMNS]
        cells += [str(summary["counts"]["tumour_slices"]), str(summary["counts"]["empty_prediction_slices"])]
        lines.append(f"| {row_label(name, summary)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Calibration (validation split) and oracle (upper bound, NOT a result: threshold chosen on the test split)",
        "",
        "| method | oracle volume DSC (best global threshold on test) | oracle threshold | mask rule used above "
        "| its validation volume DSC | weights (T1, T1ce, T2, FLAIR) |",
        "|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        oracle, calibration = summary["oracle_test_threshold"], summary["calibration"]
        rule = "per-slice Otsu" if calibration["mode"] == "otsu" else f"score > {calibration['threshold']:.4g}"
        weights = ", ".join(f"{w:.2f}" for w in calibration["weights"].values())
        lines.append(
            f"| {row_label(name, summary)} | {oracle['volume_dice']:.3f} | {oracle['threshold']:.4g} | {rule} | "
            f"{_number(calibration['validation_dice'], 3)} | {weights} |"
        )
    lines += [
        "",
        "Conventions: an empty prediction on a tumour case scores Dice = IoU = precision = recall = 0 and HD95 = the "
        "diagonal of the evaluated region (counts in summary.json); volumes without tumour in the evaluated slices are "
        "scored only through their healthy slices.",
    ]
    return "\n".join(lines) + "\n"


def _write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(buffer.getvalue())


def case_rows(result: MethodResult) -> list[dict[str, Any]]:
    """One row per test subject: volume metrics (blank without tumour) and its slice means and healthy-slice counts."""
    subjects = [row["subject"] for row in result.volume_rows] + list(result.volumes_without_tumour)
    volume = {row["subject"]: row for row in result.volume_rows}
    rows = []
    for subject in sorted(subjects):
        slices = [row for row in result.slice_rows if row["subject"] == subject]
        healthy = [row for row in result.healthy_rows if row["subject"] == subject]
        row = {"method": result.name, "subject": subject, "has_tumour": subject in volume}
        row.update({f"volume_{m}": volume[subject][m] for m in CASE_METRICS} if subject in volume else {})
        row["volume_empty_prediction"] = volume[subject]["empty_prediction"] if subject in volume else ""
        row["tumour_slices"] = len(slices)
        row.update({f"slice_{m}_mean": float(np.mean([s[m] for s in slices])) for m in CASE_METRICS} if slices else {})
        row["healthy_slices"] = len(healthy)
        row["healthy_false_positive_slices"] = sum(h["false_positive"] for h in healthy)
        healthy_volume = next((h for h in result.healthy_volume_rows if h["subject"] == subject), None)
        row["healthy_volume_false_positive"] = "" if healthy_volume is None else healthy_volume["false_positive"]
        rows.append(row)
    return rows


CASE_COLUMNS = (
    "method",
    "subject",
    "has_tumour",
    *(f"volume_{m}" for m in CASE_METRICS),
    "volume_empty_prediction",
    "tumour_slices",
    *(f"slice_{m}_mean" for m in CASE_METRICS),
    "healthy_slices",
    "healthy_false_positive_slices",
    "healthy_volume_false_positive",
)
SLICE_CSV_COLUMNS = ("method", "subject", "z", "kind", *CASE_METRICS, "empty_prediction", "false_positive", "fp_fraction")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_boxplots(results: Sequence[MethodResult], path: Path) -> None:
    """DSC and AUPRC per method, per 3D volume and per tumour slice (median solid, mean dashed, as the paper)."""
    plt = _pyplot()
    panels = [
        ("volume_rows", "dice", "DSC per volume"),
        ("volume_rows", "auprc", "AUPRC per volume"),
        ("slice_rows", "dice", "DSC per tumour slice"),
        ("slice_rows", "auprc", "AUPRC per tumour slice"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(4 + 1.2 * len(results), 7), squeeze=False)
    for ax, (rows, metric, title) in zip(axes.ravel(), panels):
        data = [[row[metric] for row in getattr(r, rows) if np.isfinite(row[metric])] or [np.nan] for r in results]
        ax.boxplot(data, showmeans=True, meanline=True, meanprops={"color": "tab:blue", "linestyle": "--"})
        ax.set_xticks(range(1, len(results) + 1), [r.name for r in results], rotation=20, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def plot_examples(examples: Mapping[str, Mapping[str, np.ndarray]], title: str, path: Path) -> None:
    """One row per method: input FLAIR | healthy FLAIR | anomaly map | mask | ground truth (2D (H, W) arrays)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(examples), len(EXAMPLE_PANELS), figsize=(2.2 * len(EXAMPLE_PANELS), 2.3 * len(examples)), squeeze=False)
    for row_index, (row, (name, panels)) in enumerate(zip(axes, examples.items())):
        for ax, panel in zip(row, EXAMPLE_PANELS):
            image = panels.get(panel)
            if image is None:
                ax.text(0.5, 0.5, "not written", ha="center", va="center", fontsize=8)
            else:
                vmax = max(float(image.max()), 1e-6) if panel == "anomaly map" else 1.0
                ax.imshow(np.rot90(image), cmap="magma" if panel == "anomaly map" else "gray", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(name, fontsize=8)
            if row_index == 0:
                ax.set_title(panel, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # 0.3 inch above the panel titles for the suptitle
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    """NaN (an undefined statistic, e.g. no healthy slice) -> null, so summary.json is strict JSON."""
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    results: Sequence[MethodResult], out_dir: str | Path, examples: Mapping[str, Mapping[str, np.ndarray]] | None = None, example_title: str = ""
) -> str:
    """Write every report file into ``out_dir`` (see module docstring); return the markdown text."""
    out_dir = Path(out_dir)
    summaries = {result.name: summarise(result) for result in results}
    save_json(_json_safe(summaries), out_dir / "summary.json")
    _write_csv([row for result in results for row in case_rows(result)], CASE_COLUMNS, out_dir / "per_case.csv")
    slice_rows = [{"method": r.name, "kind": "tumour", **row} for r in results for row in r.slice_rows] + [
        {"method": r.name, "kind": "healthy", **row} for r in results for row in r.healthy_rows
    ]
    _write_csv(slice_rows, SLICE_CSV_COLUMNS, out_dir / "per_slice.csv")
    markdown = markdown_tables(summaries)
    with atomic_path(out_dir / "results.md", overwrite=True) as tmp:
        tmp.write_text(markdown)
    plot_boxplots(results, out_dir / "figures" / "boxplots.png")
    if examples:
        plot_examples(examples, example_title, out_dir / "figures" / "examples.png")
    return markdown
