"""Fast samplers against the paper's 2000-NFE PC sampler: NFE, wall time and detection quality on the same slices.

    python benchmarks/sampling.py --work_dir runs/demo [--subjects 2 --slices_per_subject 3 --seeds 0 1 ...]

Reads what ``tsgm demo`` (or the bundles) wrote into WORK_DIR: the VE-JP model (``vejp/model.pt``, EMA weights,
loaded by the vejp_anomaly inference config exactly as the bundle loads it), the prepared dataset
(``prepared/volumes.json``) and, when present, the TSGM calibration (``evaluation/tsgm/calibration.json``).

Selection on validation only: the scored slices come from the VALIDATION split (the test split is read once, by the
final evaluation, so a sampler chosen here is never chosen on test). Slices: the first ``--subjects`` validation
subjects with tumour; per subject ``--slices_per_subject`` tumour-bearing axial slices of
the processed range, evenly spaced through the tumour (0 = all of them); of each, the modalities whose calibrated
ensemble weight is not 0 (the others cannot change the anomaly score; ``--modalities all`` reconstructs all four).
Every sampler reconstructs this same stack in ONE batched inferer call (slices × modalities, chunked by the
inferer's ``batch_size``), in the same process. The reference (the paper's PC sampler over the SDE's N discrete
scales with one Langevin corrector step, NFE = 2N = 2000) runs first, once per ``--seeds`` entry, then the fast
samplers, ``--repeats`` times round-robin for each seed; the median wall time is reported and the repeats must
reproduce the first run exactly (same seed → same output). Every figure of a sampler is its mean over the seeds: one
draw of the reference is itself a random variable, and the spread of its draws is the noise floor of a comparison.

Detection quality uses the evaluation code unchanged (``tsgm_components.evaluation.harness.predict`` and
``metrics.evaluate_case``): residuals mapped to the input geometry, weighted ensemble, mask, Dice per tumour slice,
AUPRC of the continuous map over the brain voxels of the evaluated slices, and the volume-like subset Dice (one Dice
over all evaluated slices of a subject, mean over subjects) on which the target is judged. Weights and threshold,
in order of preference: ``--calibration`` or ``evaluation/tsgm/calibration.json``; else chosen on the validation split by
``evaluation.calibrate`` (the evaluation bundle's code and settings) from ``detections/tsgm/validation``; else from
reconstructions of the validation subjects' processed slices (all, or ``--validation_slices_per_subject``) by the
bundle's configured sampler, with the same code. Nothing here reads the test split.

Writes ``benchmarks/results/sampling_<device>.{md,json}`` (``--out_dir``) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES, load_subject
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.detection.anomaly import anomaly_support, residual_volume
from tsgm_components.detection.masking import load_calibration
from tsgm_components.detection.ensembling import select_threshold
from tsgm_components.errors import TsgmInputError
from tsgm_components.evaluation.harness import Case, calibrate, load_cases, predict, read_prepared
from tsgm_components.diffusion.inferers import SAMPLERS, DiffusionSamplerInferer
from tsgm_components.io import atomic_path
from tsgm_components.evaluation.metrics import average_precision, evaluate_case

from common import EVALUATION_CPU_CONFIGS, evaluation_settings, save_report, timed  # benchmarks/common.py (this script's folder is sys.path[0])

logger = logging.getLogger("benchmarks.sampling")

VEJP_CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"
#: The bundle's inference config (it builds the network the checkpoint records).
DEFAULT_CONFIGS = [str(VEJP_CONFIGS / "inference.yaml")]
#: The paper's sampler: PC over all N discrete scales, reverse diffusion + 1 Langevin step at snr 0.075.
REFERENCE_SPEC = "pc:n_corrector_steps=1,snr=0.075"
#: Fast samplers compared by default (NFE with the SDE's defaults in brackets).
DEFAULT_SAMPLERS = (
    "heun:n_steps=10",  # probability-flow ODE, Karras grid [19]
    "heun:n_steps=18",  # [35]
    "heun:n_steps=18,churn=10",  # EDM's stochastic Heun [35]
    "pc:n_steps=25",  # PC on 25 geometric levels [50]
    "sdedit:sdedit_sigma_start=1.0,n_steps=25",  # input + N(0, 1²), PC down to σ_min [50]
    "heun:n_steps=10,n_draws=2",  # mean of 2 draws [38]
    "heun:n_steps=4,n_draws=4",  # [28]
    "heun:n_steps=3,n_draws=4",  # [20]
    "heun:n_steps=4,n_draws=3",  # [21]
    "heun:n_steps=5,n_draws=3",  # [27]
    "heun:n_steps=5,n_draws=5",  # [45]
    "heun:n_steps=7,n_draws=3",  # [39]
    "sdedit:sdedit_sigma_start=1.0,n_steps=10,n_corrector_steps=0,n_draws=5",  # [50]
)


def _boolean(value: str) -> bool:
    if value not in ("True", "False"):
        raise ValueError(f"expected True or False, got {value!r}")
    return value == "True"


#: DiffusionSamplerInferer settings a spec may set (``t0`` sets sdedit_sigma_start = σ(t0)).
SPEC_KEYS = {
    "n_steps": int,
    "snr": float,
    "n_corrector_steps": int,
    "sdedit_sigma_start": float,
    "t0": float,
    "churn": float,
    "n_draws": int,
    "compile": _boolean,
}
#: Speed target of team issue 6: NFE at least this many times below the reference, Dice within DICE_TOLERANCE.
NFE_TARGET, DICE_TOLERANCE = 40.0, 0.01


@dataclass
class SamplerSpec:
    """A sampler name and the inferer settings it overrides, parsed from ``"name:key=value,key=value"``."""

    text: str
    sampler: str
    overrides: dict[str, Any]

    @classmethod
    def parse(cls, text: str) -> "SamplerSpec":
        name, _, rest = text.partition(":")
        overrides: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in SPEC_KEYS:
                raise ValueError(f"sampler spec {text!r}: expected key=value with keys {sorted(SPEC_KEYS)}, got {part!r}")
            overrides[key] = None if value in ("None", "null") else SPEC_KEYS[key](value)
        if name.strip() not in SAMPLERS:
            raise ValueError(f"sampler spec {text!r}: the sampler must be one of {sorted(SAMPLERS)}")
        return cls(text, name.strip(), overrides)


@dataclass
class Subject:
    """One subject's evaluated slices: modality stacks at model resolution and what scoring needs."""

    subject: str
    slices: dict[str, np.ndarray]  # modality -> (S, s, s) all processed slices z_min..z_max, [0, 1]
    chosen: list[int]  # indices into the S processed slices
    brain: np.ndarray  # (H, W, D) bool
    seg: np.ndarray | None  # (H, W, D) uint8 or None
    spacing: tuple[float, float, float]

    def z(self, preprocess: PreprocessConfig) -> list[int]:
        return [preprocess.z_min + k for k in self.chosen]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="folder with prepared/ and vejp/model.pt (e.g. runs/demo)")
    parser.add_argument(
        "--config_file", nargs="+", default=DEFAULT_CONFIGS, help="vejp_anomaly inference configs, merged in order (default: inference.yaml)"
    )
    parser.add_argument("--checkpoint", default=None, help="the VE-JP model (default: WORK_DIR/vejp/model.pt)")
    parser.add_argument(
        "--evaluation_config",
        nargs="+",
        default=EVALUATION_CPU_CONFIGS,
        help="tsgm_evaluation configs whose calibration settings are used when calibrating here",
    )
    parser.add_argument("--subjects", type=int, default=2, help="first N validation subjects (with tumour) of volumes.json")
    parser.add_argument(
        "--slices_per_subject", type=int, default=3, help="tumour-bearing slices per subject, evenly spaced through the tumour; 0 = all"
    )
    parser.add_argument(
        "--validation_slices_per_subject",
        type=int,
        default=0,
        help="when calibrating here: slices per validation subject, evenly spaced over the processed "
        "range, tumour or not; 0 = all (the whole evaluated volume, as the evaluation bundle does)",
    )
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=list(DEFAULT_SAMPLERS),
        help='fast samplers "name:key=value,...", name in pc|sdedit|heun, keys ' + ", ".join(SPEC_KEYS),
    )
    parser.add_argument("--reference", default=REFERENCE_SPEC, help="the reference sampler (default: the paper's)")
    parser.add_argument(
        "--modalities",
        choices=("weighted", "all"),
        default="weighted",
        help="reconstruct the modalities with a non-zero calibrated weight (default) or all four",
    )
    parser.add_argument(
        "--reference_cache",
        default=None,
        help="folder keeping the reference's reconstructions and time per seed: reused when the "
        "reference, seed, checkpoint and slices are unchanged (to try more fast samplers without "
        "rerunning PC-2000; its time then comes from the earlier run, which the report says)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each fast sampler (round-robin)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="sampling seeds, one draw of every sampler each (default: the config's sample_seed)"
    )
    parser.add_argument("--batch_size", type=int, default=None, help="inferer chunk size (default: the config's)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the config's)")
    parser.add_argument("--amp", action="store_true", help="autocast of the network calls: float16 on CUDA, bfloat16 on the CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    parser.add_argument("--calibration", default=None, help="calibration.json (default: WORK_DIR/evaluation/tsgm/...)")
    parser.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.subjects < 1 or min(args.slices_per_subject, args.validation_slices_per_subject) < 0 or args.repeats < 1:
        parser.error("need --subjects >= 1, --slices_per_subject >= 0, --validation_slices_per_subject >= 0, --repeats >= 1")
    try:
        args.reference_spec = SamplerSpec.parse(args.reference)
        args.sampler_specs = [SamplerSpec.parse(text) for text in args.samplers]
    except ValueError as error:
        parser.error(str(error))
    return args


# ------------------------------------------------------------------------------------------------ model and data


def load_bundle(config_files: Sequence[str], work_dir: Path, checkpoint: Path, device: str | None) -> ConfigParser:
    """The vejp_anomaly inference config with ``work_dir``, ``checkpoint`` (and ``device``) overridden, as the bundle
    parses it."""
    parser = ConfigParser()
    parser.read_config([str(Path(f)) for f in config_files])
    parser["work_dir"] = str(work_dir)
    parser["checkpoint"] = str(checkpoint)
    if device is not None:
        parser["device"] = f"$torch.device({device!r})"
    parser.parse()
    return parser


def candidate_slices(
    seg: np.ndarray | None, brain: np.ndarray, preprocess: PreprocessConfig, min_brain_fraction: float, tumour_only: bool
) -> list[int]:
    """Indices (into the processed slices) of the slices with at least ``min_brain_fraction`` brain (the slices
    ``tsgm prepare`` keeps) and, if ``tumour_only``, tumour."""
    indices = []
    for k, z in enumerate(preprocess.z_range):
        has_tumour = seg is not None and bool((seg[:, :, z] > 0).any())
        if brain[:, :, z].mean() >= min_brain_fraction and (has_tumour or not tumour_only):
            indices.append(k)
    return indices


def evenly_spaced(indices: list[int], count: int) -> list[int]:
    """``count`` entries of ``indices`` spread evenly from first to last (all of them when count is 0 or more)."""
    if count == 0 or count >= len(indices):
        return list(indices)
    return [indices[i] for i in sorted(set(np.linspace(0, len(indices) - 1, count).round().astype(int).tolist()))]


def load_subjects(
    items: Sequence[dict[str, Any]],
    preprocess: PreprocessConfig,
    per_subject: int,
    min_brain_fraction: float,
    tumour_only: bool = True,
) -> list[Subject]:
    """Subjects with ``per_subject`` of their (tumour-bearing) slices chosen; subjects without any are skipped."""
    subjects = []
    for item in items:
        volumes = load_subject(item, preprocess)
        candidates = candidate_slices(volumes.seg, volumes.brain_mask, preprocess, min_brain_fraction, tumour_only)
        chosen = evenly_spaced(candidates, per_subject)
        if not chosen:
            logger.info("%s: no slice to evaluate in z %d-%d, skipped", item["subject"], preprocess.z_min, preprocess.z_max)
            continue
        slices = volumes.slices(preprocess)
        spacing = tuple(float(v) for v in volumes.reference.header.get_zooms()[:3])
        subjects.append(Subject(str(item["subject"]), slices, chosen, volumes.brain_mask, volumes.seg, spacing))
    return subjects


def stack(subjects: Sequence[Subject], modalities: Sequence[str] = MODALITIES) -> torch.Tensor:
    """(B, 1, s, s) float32: subject-major, then modality, then chosen slice — one batch for every sampler."""
    planes = [s.slices[m][s.chosen] for s in subjects for m in modalities]
    return torch.from_numpy(np.concatenate(planes)[:, None].astype(np.float32))


def unstack(healthy: torch.Tensor, subjects: Sequence[Subject], modalities: Sequence[str] = MODALITIES) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`stack`: per subject, modality -> (len(chosen), s, s) reconstructions."""
    out, first = [], 0
    array = healthy[:, 0].numpy()
    for subject in subjects:
        per_modality = {}
        for m in modalities:
            per_modality[m] = array[first : first + len(subject.chosen)]
            first += len(subject.chosen)
        out.append(per_modality)
    return out


def make_cases(
    subjects: Sequence[Subject],
    healthy: torch.Tensor,
    preprocess: PreprocessConfig,
    modalities: Sequence[str] = MODALITIES,
) -> list[Case]:
    """Evaluation cases (brain voxels of the chosen slices, input geometry) from a sampler's reconstructions of
    ``modalities`` (residual 0 for the others).

    Residuals go through ``detection.residual_volume``, the detection code's own mapping to the input geometry.
    """
    cases = []
    for subject, reconstructed in zip(subjects, unstack(healthy, subjects, modalities)):
        z = subject.z(preprocess)
        support = anomaly_support(subject.brain, preprocess)
        brain = subject.brain[:, :, z]
        columns = []
        for m in MODALITIES:
            full = subject.slices[m].copy()  # residual 0 on the slices and modalities that are not reconstructed
            if m in reconstructed:
                full[subject.chosen] = reconstructed[m]
            columns.append(residual_volume(subject.slices[m], full, support, preprocess)[:, :, z][brain])
        target = subject.seg[:, :, z] > 0 if subject.seg is not None else np.zeros(brain.shape, dtype=bool)
        cases.append(Case(subject.subject, np.stack(columns, axis=1), brain, target, subject.spacing, z))
    return cases


# ------------------------------------------------------------------------------------------------ calibration


def get_calibration(
    args: argparse.Namespace,
    work_dir: Path,
    bundle: ConfigParser,
    network: torch.nn.Module,
    volumes: dict[str, Any],
    preprocess: PreprocessConfig,
    min_brain_fraction: float,
    device: torch.device,
) -> tuple[dict[str, Any], str, list[str] | None]:
    """(calibration {"weights", "threshold", "mode"}, where it came from, the subjects it was chosen on if known).

    Never chosen on the test split."""
    path = Path(args.calibration) if args.calibration else work_dir / "evaluation" / "tsgm" / "calibration.json"
    if args.calibration or path.is_file():
        weights, threshold, mode, _ = load_calibration(path)
        chosen_on = json.loads(path.read_text()).get("validation_subjects")
        return {"weights": weights, "threshold": threshold, "mode": mode}, f"file {path}", chosen_on
    settings = evaluation_settings(args.evaluation_config)
    validation_items = volumes.get("validation", [])
    detections = work_dir / "detections" / bundle.get_parsed_content("method") / "validation"
    if detections.is_dir():
        cases = load_cases(detections, validation_items, preprocess)
        source = f"evaluation.calibrate on {detections} (validation detections, {settings})"
    else:
        subjects = load_subjects(validation_items, preprocess, args.validation_slices_per_subject, min_brain_fraction, tumour_only=False)
        if not subjects:
            raise TsgmInputError(work_dir / "prepared" / "volumes.json", "no validation subject to calibrate on")
        inferer = bundle.get_parsed_content("slice_inferer")
        inputs = stack(subjects).to(device)
        healthy = inferer(inputs, network).float().cpu()
        cases = make_cases(subjects, healthy, preprocess)
        source = (
            f"evaluation.calibrate on {sum(len(s.chosen) for s in subjects)} validation slices of {len(subjects)} "
            f"subjects reconstructed by the config's sampler ({bundle.get_parsed_content('sampler')}, "
            f"{inferer.nfe_per_slice} NFE) ({settings})"
        )
    calibration = calibrate(
        cases,
        settings["mode"],
        settings["objective"],
        settings["weight_step"],
        None,
        settings["search_bins"],
        settings["threshold_bins"],
        settings["max_voxels"],
        settings["seed"],
        settings["modality_tolerance"],
    )
    return {k: calibration[k] for k in ("weights", "threshold", "mode")}, source, [case.subject for case in cases]


# ------------------------------------------------------------------------------------------------ benchmark


def build_inferer(spec: SamplerSpec, base: dict[str, Any]) -> DiffusionSamplerInferer:
    """A ``DiffusionSamplerInferer`` with the bundle's settings, ``spec``'s sampler and overrides."""
    kwargs = {**base, "sampler": spec.sampler, **spec.overrides}
    if "t0" in kwargs:
        sde = base["sde"]
        kwargs["sdedit_sigma_start"] = float(sde.sigma(torch.tensor(kwargs.pop("t0"), dtype=torch.float64)))
    if kwargs["sampler"] != "sdedit":
        kwargs["sdedit_sigma_start"] = None
    return DiffusionSamplerInferer(**kwargs)


def quality(cases: Sequence[Case], calibration: dict[str, Any]) -> dict[str, Any]:
    """Slice Dice (per tumour slice), subset Dice per subject, pooled AUPRC, with ``evaluation.predict``; and the
    oracle: the best subset Dice of any threshold on these very slices (an upper bound, never a result), which
    shows how much of a Dice difference comes from the threshold not suiting a sampler's residuals."""
    slice_rows, volume_dice, scores, targets = [], [], [], []
    weights = np.asarray([calibration["weights"][m] for m in MODALITIES])
    _, oracle_dice = select_threshold([case.voxels() for case in cases], weights)
    for case in cases:
        score, mask = predict(case, calibration)
        volume, rows, _ = evaluate_case(score, mask, case.target, case.brain, case.spacing, case.z_indices)
        slice_rows += [{"subject": case.subject, "z": r["z"], "dice": r["dice"], "auprc": r["auprc"]} for r in rows]
        if volume is not None:
            volume_dice.append(volume["dice"])
        scores.append(score[case.brain])
        targets.append(case.target[case.brain])
    return {
        "slice_dice": float(np.mean([r["dice"] for r in slice_rows])),
        "subset_dice": float(np.mean(volume_dice)),
        "auprc": average_precision(np.concatenate(scores), np.concatenate(targets)),
        "oracle_subset_dice": oracle_dice,
        "slices": slice_rows,
    }


def quality_over_seeds(
    draws: dict[int, torch.Tensor],
    subjects: Sequence[Subject],
    preprocess: PreprocessConfig,
    modalities: Sequence[str],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """:func:`quality` of each seed's reconstructions, averaged over the seeds (per-slice Dice too), with each
    seed's figures and the spread (max − min) of the subset Dice over seeds."""
    per_seed = {seed: quality(make_cases(subjects, healthy, preprocess, modalities), calibration) for seed, healthy in draws.items()}
    figures = ("slice_dice", "subset_dice", "auprc", "oracle_subset_dice")
    mean = {key: float(np.mean([q[key] for q in per_seed.values()])) for key in figures}
    first = next(iter(per_seed.values()))["slices"]
    slices = [
        {"subject": r["subject"], "z": r["z"], "dice": float(np.mean([q["slices"][k]["dice"] for q in per_seed.values()]))}
        for k, r in enumerate(first)
    ]
    subset = [q["subset_dice"] for q in per_seed.values()]
    return {
        **mean,
        "subset_dice_spread": max(subset) - min(subset),
        "slices": slices,
        "per_seed": [{"seed": seed, **{key: q[key] for key in figures}} for seed, q in per_seed.items()],
    }


def any_diverged(draws: dict[int, torch.Tensor]) -> bool:
    """Whether any seed's reconstructions hold non-finite values."""
    return not all(bool(torch.isfinite(healthy).all()) for healthy in draws.values())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_reference(path: Path, key: dict[str, Any], inputs: torch.Tensor) -> dict[str, Any] | None:
    """The cached reference run at ``path`` if it was made for the same key (sampler, seed, checkpoint) and the
    same input stack, else None (with a log line saying why)."""
    if not Path(path).is_file():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    if cached.get("key") != key or not torch.equal(cached["inputs"], inputs.cpu()):
        logger.info("reference cache %s was made for other settings or slices: recomputing", path)
        return None
    return cached


def save_reference(path: Path, key: dict[str, Any], inputs: torch.Tensor, healthy: torch.Tensor, seconds: float) -> None:
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    record = {
        "key": key,
        "inputs": inputs.cpu(),
        "healthy": healthy,
        "seconds": seconds,
        "load": load,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(record, tmp)


def machine_info(device: torch.device) -> dict[str, Any]:
    import monai

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference"]
    seeds = report["seeds"]
    lines = [
        f"# Sampler benchmark ({report['machine']['device']})",
        "",
        f"`{report['command']}`  ",
        f"{report['created']}; machine: {report['machine']}",
        "",
        f"Model: {report['checkpoint']} ({report['network_parameters']:,} parameters, image size "
        f"{report['image_size']}); σ ∈ [{report['sde']['sigma_min']}, {report['sde']['sigma_max']}], N = {report['sde']['n_scales']}.",
        f"Slices: {report['n_slices']} tumour-bearing axial slices × {len(report['modalities'])} modalities "
        f"({', '.join(report['modalities'])}) = {report['n_modality_slices']} network inputs per sampler call, "
        f"{report['subset']}.",
        f"Calibration: {report['calibration_source']}; weights {report['calibration']['weights']}, "
        f"threshold {report['calibration']['threshold']}, mode {report['calibration']['mode']}.",
        f"Seeds: {seeds}; every figure is the mean over one draw per seed, [min–max] over the seeds for subset Dice.",
        f"Timing: one batched call per run (batch size {report['batch_size']}), reference once per seed "
        f"({ref['timing']}), fast samplers median of {report['repeats']} round-robin run(s) per seed; "
        f"s/slice = wall time / {report['n_modality_slices']} modality slices.",
        "",
        "| sampler | NFE/slice | NFE × fewer | s/slice | speed-up | subset Dice [min–max] | Δ subset Dice | "
        "slice Dice | Δ slice Dice | worst slice Δ | oracle subset Dice | AUPRC | MAE vs ref | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]

    def number(row: dict[str, Any], key: str, spec: str, sign: float = 1.0) -> str:
        return "" if row.get(key) is None else format(sign * row[key], spec)

    def subset(row: dict[str, Any]) -> str:
        if row.get("subset_dice") is None:
            return ""
        values = [figures["subset_dice"] for figures in row["per_seed"]]
        spread = f" [{min(values):.3f}–{max(values):.3f}]" if len(values) > 1 else ""
        return f"{row['subset_dice']:.3f}{spread}"

    for row in [ref, *report["samplers"]]:
        cells = [
            row["spec"] + (" (reference)" if row is ref else ""),
            str(row["nfe"]),
            f"{row['nfe_ratio']:.0f}×",
            f"{row['seconds_per_slice']:.3g}",
            f"{row['speedup']:.1f}×",
            "diverged" if row["diverged"] else subset(row),
            number(row, "subset_dice_delta", "+.3f"),
            number(row, "slice_dice", ".3f"),
            number(row, "dice_delta", "+.3f"),
            number(row, "worst_slice_drop", "+.3f", -1.0),
            number(row, "oracle_subset_dice", ".3f"),
            number(row, "auprc", ".3f"),
            number(row, "healthy_mae", ".4f"),
            "" if row is ref else ("yes" if row["meets_target"] else "no"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target: NFE ≥ {NFE_TARGET:.0f}× fewer than the reference and subset Dice ≥ reference − {DICE_TOLERANCE}. "
        "Subset Dice = one Dice over all evaluated slices of a subject (the volume Dice restricted to these slices), "
        "mean over subjects; slice Dice = mean over tumour slices; Δ = sampler − reference (means over seeds); "
        "worst slice Δ = the largest per-slice drop of the seed-mean Dice; oracle = the subset Dice with the best "
        "threshold for these slices (upper bound, not a result); MAE vs ref = mean absolute difference of the "
        "reconstructions from the reference's of the same seed, brain pixels of the model-resolution slices. "
        "n_draws = k: the reconstruction is the mean of k independent draws (NFE counts all of them). "
        "Noise: each reference figure is a mean of random draws too; the reference's own [min–max] over seeds shows "
        'how far one draw moves the figures. "yes" means no worse than the reference: with a reference Dice near 0 '
        "(an untrained model) it says nothing about detection.",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir).resolve()
    bundle = load_bundle(args.config_file, work_dir, Path(args.checkpoint or work_dir / "vejp" / "model.pt"), args.device)
    device = bundle.get_parsed_content("device")
    network = bundle.get_parsed_content("network").eval()
    sde = bundle.get_parsed_content("sde")
    volumes, _, min_brain_fraction = read_prepared(work_dir / "prepared")
    preprocess = bundle.get_parsed_content("preprocess")  # the checkpoint's own preprocessing
    calibration, calibration_source, calibration_subjects = get_calibration(
        args, work_dir, bundle, network, volumes, preprocess, min_brain_fraction, device
    )
    logger.info("calibration: %s (%s)", calibration, calibration_source)
    modalities = list(MODALITIES)
    if args.modalities == "weighted":
        modalities = [m for m in MODALITIES if calibration["weights"][m] > 0]

    # selection on validation only: the scored slices come from the validation split, never from test
    subjects = load_subjects(volumes.get("validation", []), preprocess, args.slices_per_subject, min_brain_fraction)[: args.subjects]
    if not subjects:
        raise TsgmInputError(work_dir / "prepared" / "volumes.json", "no validation subject has tumour slices")
    inputs = stack(subjects, modalities).to(device)
    subset = "; ".join(f"{s.subject} z={s.z(preprocess)}" for s in subjects)
    logger.info("%d modality slices (%s): %s", inputs.shape[0], ", ".join(modalities), subset)

    seeds = args.seeds or [bundle.get_parsed_content("sample_seed")]
    base = {
        "sde": sde,
        "snr": bundle.get_parsed_content("snr"),
        "n_corrector_steps": bundle.get_parsed_content("n_corrector_steps"),
        "n_steps": None,
        "conditional": network.condition_channels > 0,
        "batch_size": args.batch_size or bundle.get_parsed_content("sample_batch_size"),
        "amp": args.amp,
    }
    reference_spec, specs = args.reference_spec, args.sampler_specs
    references = {seed: build_inferer(reference_spec, {**base, "seed": seed, "progress": True}) for seed in seeds}
    inferers = [{seed: build_inferer(spec, {**base, "seed": seed}) for seed in seeds} for spec in specs]
    reference_nfe = references[seeds[0]].nfe_per_slice

    logger.info("reference %s: %d NFE per slice, seeds %s", reference_spec.text, reference_nfe, seeds)
    checkpoint_sha256 = file_sha256(Path(bundle.get_parsed_content("checkpoint")))
    ref_outputs: dict[int, torch.Tensor] = {}
    ref_seconds, ref_timings = [], []
    for seed in seeds:
        key = {"spec": reference_spec.text, "seed": seed, "checkpoint_sha256": checkpoint_sha256, "nfe": reference_nfe}
        cache = Path(args.reference_cache) / f"reference_seed{seed}.pt" if args.reference_cache else None
        cached = load_reference(cache, key, inputs) if cache else None
        if cached is None:
            healthy, seconds = timed(references[seed], inputs, network)
            healthy = healthy.float().cpu()
            ref_timings.append(f"seed {seed} timed in this run")
            if cache:
                save_reference(cache, key, inputs, healthy, seconds)
        else:
            healthy, seconds = cached["healthy"], cached["seconds"]
            ref_timings.append(f"seed {seed} from the cache {cache} (timed {cached['created']}, load {cached['load']})")
        ref_outputs[seed] = healthy
        ref_seconds.append(seconds)
        logger.info("reference seed %d: %.1f s (%s)", seed, seconds, ref_timings[-1])
    outputs: list[dict[int, torch.Tensor]] = [{} for _ in specs]
    seconds_all: list[list[float]] = [[] for _ in specs]
    reproducible = [True] * len(specs)
    for repeat in range(args.repeats):
        for seed in seeds:
            for i, spec in enumerate(specs):
                healthy, elapsed = timed(inferers[i][seed], inputs, network)
                healthy = healthy.float().cpu()
                seconds_all[i].append(elapsed)
                if seed not in outputs[i]:
                    outputs[i][seed] = healthy
                else:
                    reproducible[i] &= torch.equal(outputs[i][seed], healthy)
                logger.info("run %d/%d seed %d %s: %.2f s", repeat + 1, args.repeats, seed, spec.text, elapsed)

    n = inputs.shape[0]
    brain_pixels = (inputs > 0).cpu()
    # a diverged (non-finite) output gets no quality figures: detection would refuse it
    ref_row = {
        "spec": reference_spec.text,
        "nfe": reference_nfe,
        "nfe_ratio": 1.0,
        "seconds": statistics.mean(ref_seconds),
        "seconds_all_runs": ref_seconds,
        "seconds_per_slice": statistics.mean(ref_seconds) / n,
        "speedup": 1.0,
        "timing": "; ".join(ref_timings),
        "diverged": any_diverged(ref_outputs),
    }
    if ref_row["diverged"]:
        logger.warning("the reference sampler diverged (non-finite reconstructions): no Dice comparison possible")
    else:
        ref_row.update(quality_over_seeds(ref_outputs, subjects, preprocess, modalities, calibration))
        ref_dice = {(r["subject"], r["z"]): r["dice"] for r in ref_row["slices"]}
    rows = []
    for spec, inferer, draws, times, same in zip(specs, inferers, outputs, seconds_all, reproducible):
        median = statistics.median(times)
        row = {
            "spec": spec.text,
            "nfe": inferer[seeds[0]].nfe_per_slice,
            "nfe_ratio": reference_nfe / inferer[seeds[0]].nfe_per_slice,
            "seconds": median,
            "seconds_all_runs": times,
            "seconds_per_slice": median / n,
            "speedup": ref_row["seconds"] / median,
            "repeats_identical": same,
            "diverged": any_diverged(draws),
            "meets_target": False,
        }
        if not row["diverged"]:
            row.update(quality_over_seeds(draws, subjects, preprocess, modalities, calibration))
        if not row["diverged"] and not ref_row["diverged"]:
            row["dice_delta"] = row["slice_dice"] - ref_row["slice_dice"]
            row["subset_dice_delta"] = row["subset_dice"] - ref_row["subset_dice"]
            row["worst_slice_drop"] = max(ref_dice[(r["subject"], r["z"])] - r["dice"] for r in row["slices"])
            row["healthy_mae"] = statistics.mean(float((draws[seed] - ref_outputs[seed]).abs()[brain_pixels].mean()) for seed in seeds)
            row["meets_target"] = row["nfe_ratio"] >= NFE_TARGET and row["subset_dice_delta"] >= -DICE_TOLERANCE
        rows.append(row)

    machine = machine_info(device)
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "command": "python " + shlex.join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "work_dir": str(work_dir),
        "config_files": [str(Path(f).resolve()) for f in args.config_file],
        "checkpoint": str(bundle.get_parsed_content("checkpoint")),
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "image_size": preprocess.image_size,
        "sde": {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max, "n_scales": sde.n_scales},
        "seeds": seeds,
        "batch_size": base["batch_size"],
        "amp": args.amp,
        "repeats": args.repeats,
        "subset": subset,
        "modalities": modalities,
        "n_slices": sum(len(s.chosen) for s in subjects),
        "n_modality_slices": n,
        "calibration": calibration,
        "calibration_source": calibration_source,
        "calibration_subjects": calibration_subjects,
        "reference": ref_row,
        "samplers": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    try:
        report = run(args)
    except (TsgmInputError, RuntimeError) as error:
        cause = error  # MONAI's config parser wraps the TsgmInputError of a config expression in RuntimeErrors
        while cause is not None and not isinstance(cause, TsgmInputError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"benchmarks/sampling.py: {cause}", file=sys.stderr)
        return 2
    table = markdown(report)
    written = save_report(table, report, args.out_dir, f"sampling_{torch.device(report['machine']['device']).type}")
    print(table)
    print(f"wrote {written}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
