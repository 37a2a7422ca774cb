"""Volume in -> NIfTI anomaly maps out: the detection step shared by VE-JP inference and every baseline.

A method is a ``reconstruct(slices) -> healthy`` callable over (N, 1, s, s) slice stacks in [0, 1].
:func:`detect_subject` loads and validates one subject, applies the training preprocessing, reconstructs all
slices of all four modalities in one call, and writes the detection output of ``docs/architecture.md`` in the input's exact geometry, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import Tensor

import tsgm_components
from tsgm_components.data.brats import (
    MODALITIES, SubjectFiles, VolumeGeometry, grid_geometry, load_subject, open_subject, subject_files,
)
from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume, slices_to_volume
from tsgm_components.ensembling import MASK_MODES, OTSU_MIN_COMPONENT_MM2, PAPER_WEIGHTS, check_weights, score_to_mask, weighted_anomaly
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write, check_not_over_inputs, check_writable, save_json

logger = logging.getLogger(__name__)

#: reconstruct(slices (N, 1, s, s) float32 in [0, 1]) -> healthy slices (N, 1, s, s) in [0, 1]. The N slices mix
#: modalities (one single-channel model serves all four contrasts): a volume is one call, i.e. one batched sampler run.
Reconstructor = Callable[[Tensor], Tensor]
#: "all" modalities, or only the "weighted" ones (non-zero ensemble weight)
RECONSTRUCT_MODALITIES = ("all", "weighted")
#: Datalist split names accepted for ``volumes.json`` (split.json names map to datalist keys).
SPLIT_KEYS = {"train": "training", "training": "training", "val": "validation", "validation": "validation", "test": "test"}
OVERLAY_SLICES = 6
#: gzip keeps about 13 % of the raw size of these float32 maps (zero outside the brain; 46 MB for a phantom subject's
#: ten maps); the free-space check asks for this fraction, an upper estimate
NIFTI_GZIP_BOUND = 0.25


class InfererReconstructor:
    """Adapts a MONAI inferer + network to :data:`Reconstructor`: ``inferer(slices, network)`` on ``device``."""

    def __init__(self, inferer: Callable[[Tensor, torch.nn.Module], Tensor], network: torch.nn.Module, device: str | torch.device = "cpu"):
        self.inferer = inferer
        self.network = network.eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, slices: Tensor) -> Tensor:
        return self.inferer(slices.to(self.device), self.network).float().cpu()


def calibration_beside(checkpoint: str | Path) -> str | None:
    """``<checkpoint stem>_calibration.json`` next to a checkpoint (how the shipped weights carry the weights and
    threshold chosen on their validation split), or None if there is none: then no mask unless one is asked for."""
    path = Path(checkpoint).with_name(Path(checkpoint).stem + "_calibration.json")
    return str(path) if path.is_file() else None


def load_calibration(path: str | Path) -> tuple[dict[str, float], float | None, str]:
    """Read the evaluation bundle's ``calibration.json``: ``(weights, threshold, mode)``.

    ``{"weights": {mod: w}, "threshold": t, "mode": "fixed" | "otsu", ...}``; ``threshold`` may be null in
    Otsu mode. Raises TsgmInputError naming the file on any problem.
    """
    path = Path(path)
    try:
        calibration = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"cannot read calibration JSON ({type(error).__name__}: {error})") from error
    if not isinstance(calibration, dict) or "weights" not in calibration or not isinstance(calibration["weights"], dict):
        raise TsgmInputError(path, 'expected {"weights": {modality: weight}, "threshold": t, "mode": "fixed"|"otsu"}')
    mode = calibration.get("mode", "fixed")
    if mode not in MASK_MODES:
        raise TsgmInputError(path, f"mode must be one of {MASK_MODES}, got {mode!r}")
    try:
        weights = check_weights(calibration["weights"], source="weights")
    except ValueError as error:
        raise TsgmInputError(path, str(error)) from error
    threshold = calibration.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
        raise TsgmInputError(path, f"threshold must be a finite number, got {threshold!r}")
    if mode == "fixed" and threshold is None:
        raise TsgmInputError(path, 'mode "fixed" needs a numeric "threshold"')
    return weights, (None if threshold is None else float(threshold)), mode


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    """Ensemble weights and mask rule of a detection, with where each came from (recorded in ``_detection.json``).

    weights: modality -> w (Σ = 1); mode: "fixed" (``threshold`` needed), "otsu", or None (anomaly maps only, no mask).
    """

    weights: Mapping[str, float]
    mode: str | None = None
    threshold: float | None = None
    weights_source: str = "given"
    threshold_source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(self.weights, source=f"weights ({self.weights_source})"))
        if self.mode not in (None, *MASK_MODES):
            raise ValueError(f"mask_mode must be one of {MASK_MODES} or None, got {self.mode!r}")
        if self.mode == "fixed" and self.threshold is None:
            raise ValueError('mask_mode "fixed" needs a threshold (explicit or from a calibration file)')

    def mask(self, score: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float], z_indices: range) -> np.ndarray | None:
        """uint8 (H, W, D) mask of an ensemble ``score`` by :func:`~tsgm_components.ensembling.score_to_mask`, or None."""
        return None if self.mode is None else score_to_mask(score, brain, self.mode, self.threshold, spacing_mm, z_indices)

    def record(self) -> dict[str, Any]:
        """The ``weights``, ``weights_source`` and ``mask`` entries of ``_detection.json``."""
        mask = None if self.mode is None else {"mode": self.mode, "threshold": self.threshold, "threshold_source": self.threshold_source or "given"}
        return {"weights": dict(self.weights), "weights_source": self.weights_source, "mask": mask}


#: Maps without a mask, paper weights for the stored combined map: what baselines and ceilings write (the evaluation
#: bundle calibrates weights and threshold on validation)
MAPS_ONLY = MaskSettings(PAPER_WEIGHTS, weights_source="baseline default (the evaluation bundle calibrates)")


def resolve_mask_settings(
    calibration_file: str | Path | None = None,
    weights: Mapping[str, float] | None = None,
    threshold: float | None = None,
    mask_mode: str | None = None,
) -> MaskSettings:
    """Ensemble weights and mask rule from a calibration file and/or explicit values (explicit values win).

    Without calibration, threshold or Otsu mode no mask is made, and the paper's weights are used unless given.
    """
    resolved_weights, weights_source = dict(PAPER_WEIGHTS), "paper (T1 .07, T1ce .19, T2 .30, FLAIR .44)"
    threshold_source = None if threshold is None else "explicit"
    if calibration_file is not None:
        cal_weights, cal_threshold, cal_mode = load_calibration(calibration_file)
        source = f"calibration {Path(calibration_file).resolve()}"
        resolved_weights, weights_source = cal_weights, source
        if threshold is None and mask_mode in (None, cal_mode):
            threshold, threshold_source = cal_threshold, source
        mask_mode = mask_mode or ("fixed" if threshold_source == "explicit" else cal_mode)
    if weights is not None:
        resolved_weights, weights_source = check_weights(dict(weights), source="explicit weights"), "explicit"
    if mask_mode is None and threshold is not None:
        mask_mode = "fixed"
    if mask_mode == "otsu":
        threshold, threshold_source = None, f"per-slice Otsu + components > {OTSU_MIN_COMPONENT_MM2:g} mm²"
    return MaskSettings(resolved_weights, mask_mode, None if threshold is None else float(threshold), weights_source, threshold_source)


def output_bytes(geometry: VolumeGeometry, n_reconstructed: int) -> int:
    """Upper estimate of one subject's output size: healthy + anomaly maps per reconstructed modality, the weighted map
    and the mask as float32 NIfTI at ``NIFTI_GZIP_BOUND`` of their raw size, plus 1 MB for the overlay and record."""
    return int((2 * n_reconstructed + 2) * np.prod(geometry.shape) * 4 * NIFTI_GZIP_BOUND) + 1_000_000


def anomaly_support(brain_mask: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """(H, W, D) bool: brain voxels of the processed slices ``z_min..z_max``, where anomaly maps may be non-zero."""
    support = np.zeros(brain_mask.shape, dtype=bool)
    support[:, :, preprocess.z_min : preprocess.z_max + 1] = brain_mask[:, :, preprocess.z_min : preprocess.z_max + 1]
    return support


def residual_volume(slices: np.ndarray, healthy: np.ndarray, support: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """|input − healthy| of (S, s, s) slice stacks at the model's resolution, mapped to the (H, W, D) input
    geometry and zeroed outside ``support`` (identical to a voxel-wise residual when image_size == pad_to)."""
    return slices_to_volume(np.abs(slices - healthy), support.shape, preprocess) * support


def _reconstruct_volume(
    reconstruct: Reconstructor, slices: Mapping[str, np.ndarray], files: SubjectFiles
) -> dict[str, np.ndarray]:
    """Run ``reconstruct`` once on the (S, s, s) slices of the given modalities, stacked in ``MODALITIES`` order (one
    batched sampler run per volume; with the inferer's per-slice seeds each modality slice also draws its own
    noise); check the output; return modality -> (S, s, s) float32 clipped to [0, 1]."""
    modalities = [m for m in MODALITIES if m in slices]
    stacked = np.concatenate([slices[m] for m in modalities])[:, None]
    healthy = reconstruct(torch.from_numpy(stacked)).detach().float().cpu().numpy()
    if healthy.shape != stacked.shape:
        raise RuntimeError(f"reconstruction of {files.paths[modalities[0]]} and the other modalities returned shape {healthy.shape}, expected {stacked.shape}")
    out, first = {}, 0
    for modality in modalities:
        part = healthy[first : first + len(slices[modality]), 0]
        first += len(slices[modality])
        if not np.isfinite(part).all():
            raise RuntimeError(f"reconstruction of {files.paths[modality]} contains non-finite values (diverged sampler?)")
        out[modality] = np.clip(part, 0.0, 1.0)
    return out


def save_overlay(flair: np.ndarray, anomaly: np.ndarray, mask: np.ndarray | None, z_indices: Sequence[int], path: Path, title: str) -> None:
    """PNG of the ``OVERLAY_SLICES`` axial slices with the most anomaly: FLAIR (grey), anomaly (heat), mask (contour).

    flair, anomaly: (H, W, D) in [0, 1]; mask: (H, W, D) {0, 1} or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_indices = list(z_indices)
    mass = [float(anomaly[:, :, z].sum()) for z in z_indices]
    chosen = sorted(z_indices[i] for i in np.argsort(mass)[::-1][:OVERLAY_SLICES])
    vmax = float(max(anomaly.max(), 1e-6))
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 3.0), squeeze=False)
    for ax, z in zip(axes[0], chosen):
        ax.imshow(np.rot90(flair[:, :, z]), cmap="gray", vmin=0, vmax=1)
        heat = np.ma.masked_less_equal(np.rot90(anomaly[:, :, z]), 0.05 * vmax)
        ax.imshow(heat, cmap="hot", alpha=0.55, vmin=0, vmax=vmax)
        if mask is not None and mask[:, :, z].any():
            ax.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"z={z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def detect_subject(
    files: SubjectFiles | Mapping[str, Any],
    out_dir: str | Path,
    reconstruct: Reconstructor,
    preprocess: PreprocessConfig,
    mask_settings: MaskSettings,
    method: str,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    subject: str | None = None,
    reconstruct_modalities: str = "all",
) -> Path:
    """Detect anomalies in one subject; write ``out_dir/<subject>/`` (see docs/architecture.md); return that folder.

    files: the subject's :class:`SubjectFiles` (or a volumes.json item / ``{modality: path}``; ``seg`` is ignored).
    Per modality: normalise, slice ``z_min..z_max`` to (S, 1, s, s); ``reconstruct`` all 4·S slices in one call; residual
    |input − healthy| at the model's resolution, mapped back to the input geometry and zeroed outside the brain
    and the slice range. The weighted map Σ w_m·anomaly_m (``mask_settings.weights``) becomes a mask by
    ``mask_settings.mode`` ("fixed", "otsu"; None: no mask).
    ``reconstruct_modalities``: "all", or "weighted" to reconstruct (and write maps for) only the modalities with a
    non-zero weight, at a fraction of the sampling time (the same model and sampler; the slices' noise streams
    follow their position in the stack, so the maps equal an "all" run's up to sampling noise).
    All files appear together or not at all; an existing folder is an error unless ``overwrite``.
    """
    started = time.perf_counter()
    files = SubjectFiles.from_record(files, subject)
    if subject:
        files = dataclasses.replace(files, subject=str(subject))
    weights = mask_settings.weights
    if reconstruct_modalities not in RECONSTRUCT_MODALITIES:
        raise ValueError(f"reconstruct_modalities must be one of {RECONSTRUCT_MODALITIES}, got {reconstruct_modalities!r}")
    reconstructed = [m for m in MODALITIES if reconstruct_modalities == "all" or weights[m] > 0]
    subject = files.subject
    files = dataclasses.replace(files, paths={k: Path(v) for k, v in files.paths.items() if k in MODALITIES})
    target = check_can_write(check_not_over_inputs(Path(out_dir) / subject, files.paths.values()), overwrite)
    volumes = load_subject(files, preprocess)
    check_writable(target, output_bytes(volumes.geometry, len(reconstructed)))  # before the sampling

    support = anomaly_support(volumes.brain_mask, preprocess)
    normalised, slices, healthy, anomaly = {}, {}, {}, {}
    reconstruction_started = time.perf_counter()
    for modality in MODALITIES:
        normalised[modality], slices[modality] = preprocess_volume(volumes.arrays[modality], volumes.brain_mask, preprocess)
    healthy_slices = _reconstruct_volume(reconstruct, {m: slices[m] for m in reconstructed}, files)
    for modality in reconstructed:
        healthy[modality] = slices_to_volume(healthy_slices[modality], volumes.brain_mask.shape, preprocess)
        anomaly[modality] = residual_volume(slices[modality], healthy_slices[modality], support, preprocess)
    logger.info("%s: reconstructed %d slices × %s", subject, len(slices[MODALITIES[0]]), "/".join(reconstructed))
    reconstruction_seconds = time.perf_counter() - reconstruction_started
    weighted = weighted_anomaly(anomaly, weights)
    mask = mask_settings.mask(weighted, volumes.brain_mask, volumes.geometry.training_voxel_size, preprocess.z_range)
    if mask is None:
        logger.warning(
            "%s: no calibration file, threshold or Otsu mode given: wrote the anomaly maps only, NO binary mask", subject
        )

    with atomic_dir(target, overwrite=overwrite) as tmp:
        outputs = {}
        for modality in reconstructed:
            outputs[f"healthy_{modality}"] = f"{subject}_healthy_{modality}.nii.gz"
            volumes.save(healthy[modality], tmp / outputs[f"healthy_{modality}"])
            outputs[f"anomaly_{modality}"] = f"{subject}_anomaly_{modality}.nii.gz"
            volumes.save(anomaly[modality], tmp / outputs[f"anomaly_{modality}"])
        outputs["anomaly"] = f"{subject}_anomaly.nii.gz"
        volumes.save(weighted, tmp / outputs["anomaly"])
        if mask is not None:
            outputs["mask"] = f"{subject}_mask.nii.gz"
            volumes.save(mask, tmp / outputs["mask"], dtype=np.uint8)
        outputs["overlay"] = f"{subject}_overlay.png"
        save_overlay(normalised["flair"], weighted, mask, preprocess.z_range, tmp / outputs["overlay"], f"{subject} ({method})")
        outputs["detection"] = f"{subject}_detection.json"
        record = {
            "method": method,
            "subject": subject,
            "inputs": {m: str(Path(files.paths[m]).resolve()) for m in MODALITIES},
            **({"input_channels": dict(files.channels)} if files.channels else {}),
            "input_geometry": volumes.geometry.record(),
            "outputs": outputs,
            "weights": mask_settings.record()["weights"],
            "weights_source": mask_settings.weights_source,
            "reconstructed_modalities": reconstructed,
            "mask": mask_settings.record()["mask"],
            "preprocess": preprocess.to_dict(),
            "reconstruction": dict(provenance or {}),
            "seconds": {
                "reconstruction": round(reconstruction_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
            "tsgm_version": tsgm_components.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        save_json(record, tmp / outputs["detection"])
    logger.info("%s: wrote %s (%.1f s)", subject, target, time.perf_counter() - started)
    return target


def read_volumes_split(volumes: str | Path | Sequence[Mapping[str, Any]] | Mapping[str, Any], split: str | None) -> list[dict[str, Any]]:
    """Subjects of one split of ``volumes.json`` (a path or its loaded dict), or an explicit list of items.

    Items: ``{"subject": id, "t1": path, "t1ce": ..., "t2": ..., "flair": ..., "seg": optional}``.
    """
    source = "datalist"
    if isinstance(volumes, (str, Path)):
        source = str(volumes)
        try:
            volumes = json.loads(Path(volumes).read_text())
        except (OSError, ValueError) as error:
            raise TsgmInputError(source, f"cannot read volumes JSON ({type(error).__name__}: {error})") from error
    if isinstance(volumes, Mapping):
        key = SPLIT_KEYS.get(str(split))
        if key is None or key not in volumes:
            raise TsgmInputError(source, f"split {split!r} not found (available: {sorted(volumes)})")
        volumes = volumes[key]
    items = [dict(item) for item in volumes]
    for item in items:
        missing = [k for k in ("subject", *MODALITIES) if k not in item]
        if missing:
            raise TsgmInputError(source, f"item {item.get('subject', item)} lacks keys {missing}")
    return items


def detect_datalist(
    volumes: str | Path | Sequence[Mapping[str, Any]] | Mapping[str, Any],
    split: str | None,
    out_dir: str | Path,
    reconstruct: Reconstructor,
    preprocess: PreprocessConfig,
    mask_settings: MaskSettings,
    method: str,
    overwrite: bool = False,
    skip_existing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    **detect_kwargs: Any,
) -> list[Path]:
    """:func:`detect_subject` for every subject of a split; subject i is done by rank ``i % world_size``.

    ``skip_existing`` resumes an interrupted run: subjects whose folder already exists are logged and skipped
    (folders are written atomically, so an existing one is complete). Before the first subject is processed, every
    remaining subject's files are checked (present, readable headers, 3D, same shape and affine) and no output
    folder may exist (unless ``overwrite``), so a bad datalist fails at once. Returns the folders this rank wrote.
    """
    items = read_volumes_split(volumes, split)
    n_reconstructed = len(MODALITIES)
    if detect_kwargs.get("reconstruct_modalities") == "weighted":
        n_reconstructed = sum(mask_settings.weights[m] > 0 for m in MODALITIES)
    todo, needed = [], 0
    for item in items[rank::world_size]:
        target = Path(out_dir) / item["subject"]
        if skip_existing and target.exists() and not overwrite:
            logger.info("%s exists, skipped", target)
            continue
        check_can_write(target, overwrite)
        files = SubjectFiles.from_record(item)
        # headers and geometry of every subject, and room for all outputs, before the first is processed
        needed += output_bytes(open_subject(files, preprocess)[1], n_reconstructed)
        todo.append(files)
    if todo:
        check_writable(Path(out_dir) / todo[0].subject, needed)
    written = []
    for files in todo:
        written.append(
            detect_subject(files, out_dir, reconstruct, preprocess, mask_settings, method, overwrite=overwrite, **detect_kwargs)
        )
    return written


def run_detection(
    out_dir: str | Path,
    reconstruct: Reconstructor,
    preprocess: PreprocessConfig,
    method: str,
    subject_dir: str | Path | None = None,
    files: Mapping[str, str | Path | None] | None = None,
    datalist: str | Path | None = None,
    split: str | None = "test",
    subject: str | None = None,
    mask_settings: MaskSettings | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    reconstruct_modalities: str = "all",
) -> list[Path]:
    """Bundle entry point: detect one subject folder, four explicit files, or one split of ``volumes.json``.

    Exactly one input form must be given (``files`` counts when any of its paths is set). ``mask_settings`` comes
    from :func:`resolve_mask_settings` (None: paper weights, no mask). Returns the written subject folders.
    """
    # `python -m monai.bundle run` parses values with fire: `--subject 12345` or `--subject_dir 2024` arrive as ints
    files = {k: str(v) for k, v in (files or {}).items() if v is not None}
    subject, subject_dir, datalist, out_dir = (None if v is None else str(v) for v in (subject, subject_dir, datalist, out_dir))
    given = [name for name, value in (("subject_dir", subject_dir), ("t1/t1ce/t2/flair", files), ("datalist", datalist)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one input: subject_dir, the four paths t1/t1ce/t2/flair, or datalist (+ split); got {given or 'none'}")
    kwargs = dict(
        reconstruct=reconstruct, preprocess=preprocess, mask_settings=mask_settings or resolve_mask_settings(),
        method=method, overwrite=overwrite, provenance=provenance, reconstruct_modalities=reconstruct_modalities,
    )
    if datalist:
        return detect_datalist(datalist, split, out_dir, skip_existing=skip_existing, rank=rank, world_size=world_size, **kwargs)
    if subject_dir:
        files = subject_files(subject_dir, require_seg=False)
        for note in files.notes:
            logger.info(note)
    else:
        missing = [m for m in MODALITIES if m not in files]
        if missing:
            raise TsgmInputError(next(iter(files.values())), f"missing modalities {missing}: give all of t1, t1ce, t2, flair")
    return [detect_subject(files, out_dir, subject=subject, **kwargs)]


# ---------------------------------------------------------------- dict pipeline (MONAI Label's BundleInferTask)
# BundleInferTask runs: preprocessing(dict with "image") -> inferer(image[None], network) -> [0] -> "pred" ->
# postprocessing(dict). "image" is one multi-channel NIfTI (channels = ``channel_modalities``).


class SliceStackInferer(Inferer):
    """Applies a slice inferer ((N, 1, s, s) -> (N, 1, s, s)) to every (s, s) plane of a tensor (..., s, s)."""

    def __init__(self, slice_inferer: Callable[[Tensor, torch.nn.Module], Tensor]):
        self.slice_inferer = slice_inferer

    @property
    def nfe_per_slice(self) -> int | None:
        return getattr(self.slice_inferer, "nfe_per_slice", None)

    def __call__(self, inputs: Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        planes = torch.as_tensor(inputs).reshape(-1, 1, *inputs.shape[-2:])
        return self.slice_inferer(planes, network).reshape(inputs.shape)


class MultiModalSlicesd(MapTransform):
    """(M, H, W, D) multi-modal volume -> (M, S, s, s) preprocessed slices in [0, 1] (same as training).

    The volume is checked against the model's training grid and reoriented to it, from the MetaTensor's affine
    (:func:`~tsgm_components.data.brats.grid_geometry`; a plain array is taken as already in that orientation). Also
    stores ``<key>_brain`` ((H, W, D) bool, model orientation) and ``<key>_geometry`` for :class:`AnomalyFromHealthyd`;
    the output keeps the input's metadata (affine), so the restored prediction overlays the input.
    """

    def __init__(self, keys: str, preprocess: PreprocessConfig, channel_modalities: Sequence[str] = MODALITIES):
        super().__init__(keys)
        if sorted(channel_modalities) != sorted(MODALITIES):
            raise ValueError(f"channel_modalities must order {list(MODALITIES)}, got {list(channel_modalities)}")
        self.preprocess = preprocess
        self.channel_modalities = tuple(channel_modalities)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            volume = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)
            meta = getattr(image, "meta", {})
            source = meta.get("filename_or_obj", key)
            if volume.ndim != 4 or volume.shape[0] != len(self.channel_modalities):
                raise TsgmInputError(source, f"expected a ({len(self.channel_modalities)}, H, W, D) volume (channels {self.channel_modalities}), got shape {volume.shape}")
            if not np.isfinite(volume).all():
                raise TsgmInputError(source, "contains non-finite voxels")
            geometry = None
            if meta.get("affine") is not None:
                geometry = grid_geometry(np.asarray(torch.as_tensor(meta["affine"]).cpu()), volume.shape[1:], self.preprocess, source)
                volume = np.stack([geometry.to_training(channel) for channel in volume])
            brain = volume.any(axis=0)
            slices = np.stack([preprocess_volume(channel, brain, self.preprocess)[1] for channel in volume])
            data[key] = MetaTensor(torch.from_numpy(slices), meta=getattr(image, "meta", None))
            data[f"{key}_brain"] = brain
            data[f"{key}_geometry"] = geometry
        return data


class AnomalyFromHealthyd(MapTransform):
    """``pred`` (M, S, s, s) healthy slices -> (1, H, W, D) weighted anomaly map, or the uint8 mask when a mask
    rule is given (``mask_settings`` from :func:`resolve_mask_settings`), in the input geometry (mapped back from the
    model's orientation with the ``<image_key>_geometry`` :class:`MultiModalSlicesd` stored)."""

    def __init__(
        self,
        keys: str,
        image_key: str,
        preprocess: PreprocessConfig,
        mask_settings: MaskSettings,
        channel_modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__(keys)
        self.image_key = image_key
        self.preprocess = preprocess
        self.mask_settings = mask_settings
        self.channel_modalities = tuple(channel_modalities)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        data = dict(data)
        image = data[self.image_key]
        geometry = data.get(f"{self.image_key}_geometry")
        slices = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=np.float32)
        brain = data[f"{self.image_key}_brain"]
        support = anomaly_support(brain, self.preprocess)
        for key in self.key_iterator(data):
            healthy = np.asarray(torch.as_tensor(data[key]).detach().cpu(), dtype=np.float32)
            maps = {
                m: residual_volume(slices[i], np.clip(healthy[i], 0, 1), support, self.preprocess)
                for i, m in enumerate(self.channel_modalities)
            }
            weighted = weighted_anomaly(maps, self.mask_settings.weights)
            spacing = geometry.training_voxel_size if geometry is not None else (1.0, 1.0, 1.0)
            mask = self.mask_settings.mask(weighted, brain, spacing, self.preprocess.z_range)
            out = weighted if mask is None else mask
            out = geometry.to_input(out) if geometry is not None else out
            data[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(out)[None]), meta=getattr(image, "meta", None))
        return data
