"""Volume in -> NIfTI anomaly maps out: the detection step shared by VE-JP inference and every baseline.

A method is a ``reconstruct(slices) -> healthy`` callable over (N, 1, s, s) slice stacks in [0, 1].
:func:`detect_subject` loads and validates one subject, applies the training preprocessing, reconstructs all
slices of its modalities (all four, or those the calibration weighs: only their files are needed) in one call, and
writes the detection output of ``docs/architecture.md`` in the input's exact geometry, atomically; :func:`detect_datalist` does a split (rank sharding, resume) and :func:`run_detection` is
the bundle entry point (input-form dispatch). The parts live in their own modules: mask policy
(:mod:`~tsgm_components.detection.masking`), residual maps (:mod:`~tsgm_components.detection.anomaly`), overlay
(:mod:`~tsgm_components.detection.overlays`); MONAI Label's dict pipeline over the same parts is :mod:`~tsgm_components.monai_label`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

import tsgm_components
from tsgm_components.detection.anomaly import anomaly_maps
from tsgm_components.data.brats import MODALITIES, SubjectFiles, VolumeGeometry, load_subject, open_subject, subject_files
from tsgm_components.data.phantom import PHANTOM_DESCRIPTION
from tsgm_components.data.prepare import read_volumes_split
from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume, slices_to_volume
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write, check_not_over_inputs, check_writable, save_json
from tsgm_components.detection.masking import Calibration, reconstruction_settings
from tsgm_components.detection.overlays import save_overlay

logger = logging.getLogger(__name__)

#: reconstruct(slices (N, 1, s, s) float32 in [0, 1]) -> healthy slices (N, 1, s, s) in [0, 1]. The N slices mix
#: modalities (one single-channel model serves all four contrasts): a volume is one call, i.e. one batched sampler run.
#: A reconstructor whose ``all_modalities`` attribute is true (a four-channel model) needs all four in every call.
Reconstructor = Callable[[Tensor], Tensor]
#: "all" modalities, or only the "weighted" ones (non-zero ensemble weight)
RECONSTRUCT_MODALITIES = ("all", "weighted")
#: threads that write a subject's NIfTI files while the overlay is drawn: gzip compression, most of the writing time,
#: releases the GIL (benchmarks/single_subject_inference.py)
WRITER_THREADS = 4
#: gzip keeps about 13 % of the raw size of these float32 maps (zero outside the brain; 46 MB for a phantom subject's
#: ten maps); the free-space check asks for this fraction, an upper estimate
NIFTI_GZIP_BOUND = 0.25


class InfererReconstructor:
    """Adapts a MONAI inferer + network to :data:`Reconstructor`: ``inferer(slices, network)`` on ``device``.

    ``all_modalities``: the network reconstructs the four modalities of a slice together (``image_channels`` 4), so
    every call needs all of them."""

    def __init__(self, inferer: Callable[[Tensor, torch.nn.Module], Tensor], network: torch.nn.Module, device: str | torch.device = "cpu"):
        self.inferer = inferer
        self.network = network.eval()
        self.device = torch.device(device)
        self.all_modalities = getattr(network, "image_channels", 1) > 1

    @torch.no_grad()
    def __call__(self, slices: Tensor) -> Tensor:
        return self.inferer(slices.to(self.device), self.network).float().cpu()


def output_bytes(geometry: VolumeGeometry, n_reconstructed: int) -> int:
    """Upper estimate of one subject's output size: healthy + anomaly maps per reconstructed modality, the weighted map
    and the mask as float32 NIfTI at ``NIFTI_GZIP_BOUND`` of their raw size, plus 1 MB for the overlay and record."""
    return int((2 * n_reconstructed + 2) * np.prod(geometry.shape) * 4 * NIFTI_GZIP_BOUND) + 1_000_000


@dataclasses.dataclass(frozen=True)
class Detector:
    """What a detection applies to every subject: the method's reconstruction, the training preprocessing, the
    ensemble weights and mask rule, the method's name (its detection folder and the evaluation's row), what to record.

    reconstruct_modalities: "all", or "weighted" to reconstruct (and write maps for) only the modalities with a
    non-zero weight, at a fraction of the sampling time (the same model and sampler; the slices' noise streams follow
    their position in the stack, so the maps equal an "all" run's up to sampling noise). A reconstruction that needs
    every modality at once (``all_modalities``: the four-channel model, a 4-channel generator) reconstructs all four.
    weights_data: "phantom" or "real" (:func:`~tsgm_components.checkpoints.weights_data_kind`): a subject of the other
    kind gets a warning (phantom weights on a real scan, or real weights on the phantom).
    """

    reconstruct: Reconstructor
    preprocess: PreprocessConfig
    mask_settings: Calibration
    method: str
    provenance: Mapping[str, Any] | None = None
    reconstruct_modalities: str = "all"
    weights_data: str | None = None  # what the weights were trained on: "phantom", "real" or None (unknown)

    def __post_init__(self) -> None:
        if self.reconstruct_modalities not in RECONSTRUCT_MODALITIES:
            raise ValueError(f"reconstruct_modalities must be one of {RECONSTRUCT_MODALITIES}, got {self.reconstruct_modalities!r}")
        calibrated, used = self.mask_settings.reconstruction, reconstruction_settings(self.provenance)
        # a setting the calibration does not record (added since it was written) is not compared
        differing = (
            {key: (calibrated[key], used[key]) for key in used if key in calibrated and calibrated[key] != used[key]} if calibrated and used else {}
        )
        if differing and self.mask_settings.threshold_source:
            logger.warning(
                "the threshold (%s) was chosen on reconstructions with other sampler settings than this detection's "
                "(calibration, this run: %s): its masks may not fit; calibrate again on validation detections made "
                "with these settings",
                self.mask_settings.threshold_source,
                differing,
            )

    @property
    def reconstructed(self) -> list[str]:
        """The modalities this detection reconstructs, in ``MODALITIES`` order."""
        every = self.reconstruct_modalities == "all" or getattr(self.reconstruct, "all_modalities", False)
        return [m for m in MODALITIES if every or self.mask_settings.weights[m] > 0]

    @property
    def needed(self) -> dict[str, str]:
        """Modality -> why this detection needs its file: the reconstructed modalities only (with ``weighted``, a
        folder with FLAIR alone is enough for weights that weigh FLAIR alone)."""
        if self.reconstruct_modalities == "all":
            return {m: "reconstruct_modalities 'all' reconstructs every modality (use 'weighted')" for m in MODALITIES}
        if getattr(self.reconstruct, "all_modalities", False):
            return {m: "the model reconstructs the four modalities of each slice together" for m in MODALITIES}
        weights, source = self.mask_settings.weights, self.mask_settings.weights_source
        return {m: f"the calibration weighs {m} (weight {weights[m]:g}; {source})" for m in self.reconstructed}


def _reconstruct_volume(reconstruct: Reconstructor, slices: Mapping[str, np.ndarray], files: SubjectFiles) -> dict[str, np.ndarray]:
    """Run ``reconstruct`` once on the (S, s, s) slices of the given modalities, stacked in ``MODALITIES`` order (one
    batched sampler run per volume; with the inferer's per-slice seeds each modality slice also draws its own
    noise); check the output; return modality -> (S, s, s) float32 clipped to [0, 1]."""
    modalities = [m for m in MODALITIES if m in slices]
    stacked = np.concatenate([slices[m] for m in modalities])[:, None]
    healthy = reconstruct(torch.from_numpy(stacked)).detach().float().cpu().numpy()
    if healthy.shape != stacked.shape:
        raise RuntimeError(
            f"reconstruction of {files.paths[modalities[0]]} and the other modalities returned shape {healthy.shape}, expected {stacked.shape}"
        )
    out, first = {}, 0
    for modality in modalities:
        part = healthy[first : first + len(slices[modality]), 0]
        first += len(slices[modality])
        if not np.isfinite(part).all():
            raise RuntimeError(f"reconstruction of {files.paths[modality]} contains non-finite values (diverged sampler?)")
        out[modality] = np.clip(part, 0.0, 1.0)
    return out


def warn_on_data_mismatch(weights_data: str | None, reference: nib.Nifti1Image, subject: str) -> bool:
    """Log a warning, and return True, when weights trained on the phantom meet a real scan or real weights meet the
    phantom (a volume whose header carries :data:`~tsgm_components.data.phantom.PHANTOM_DESCRIPTION`)."""
    scan = "phantom" if bytes(reference.header["descrip"]).rstrip(b"\0") == PHANTOM_DESCRIPTION else "real"
    if weights_data is None or weights_data == scan:
        return False
    advice = (
        "their calibration was chosen on the phantom: use the real-trained weights (the bundles' models/model.pt) "
        "or calibrate these on your validation split"
        if weights_data == "phantom"
        else "their calibration was chosen on real scans: the demo uses the phantom-trained weights (models/phantom.pt)"
    )
    trained = {"phantom": "the phantom", "real": "real scans"}[weights_data]
    logger.warning("%s: weights trained on %s applied to a %s scan; %s", subject, trained, "phantom" if scan == "phantom" else "real-looking", advice)
    return True


def detect_subject(
    files: SubjectFiles | Mapping[str, Any],
    out_dir: str | Path,
    detector: Detector,
    overwrite: bool = False,
    subject: str | None = None,
) -> Path:
    """Detect anomalies in one subject; write ``out_dir/<subject>/`` (see docs/architecture.md); return that folder.

    files: the subject's :class:`SubjectFiles` (or a volumes.json item / ``{modality: path}``; ``seg`` is ignored).
    Per modality: normalise, slice ``z_min..z_max`` to (S, 1, s, s); ``detector.reconstruct`` all slices of the
    reconstructed modalities in one call; residual |input − healthy| at the model's resolution, mapped back to the
    input geometry and zeroed outside the brain and the slice range. The weighted map Σ w_m·anomaly_m becomes a mask
    by ``detector.mask_settings`` ("fixed", "otsu"; None: no mask).
    All files appear together or not at all; an existing folder is an error unless ``overwrite``.
    """
    started = time.perf_counter()
    files = SubjectFiles.from_record(files, subject)
    if subject:
        files = dataclasses.replace(files, subject=str(subject))
    preprocess, mask_settings, method = detector.preprocess, detector.mask_settings, detector.method
    weights, reconstructed = mask_settings.weights, detector.reconstructed
    subject = files.subject
    files = dataclasses.replace(files, paths={k: Path(v) for k, v in files.paths.items() if k in MODALITIES})
    files.require(reconstructed, detector.needed)
    target = check_can_write(check_not_over_inputs(Path(out_dir) / subject, files.paths.values()), overwrite)
    volumes = load_subject(files, preprocess, reconstructed, detector.needed)
    warn_on_data_mismatch(detector.weights_data, volumes.reference, subject)
    check_writable(target, output_bytes(volumes.geometry, len(reconstructed)))  # before the sampling

    reconstruction_started = time.perf_counter()
    background = "flair" if "flair" in volumes.arrays else reconstructed[0]  # the overlay's grey image
    normalised, slices = {}, {}
    for modality in dict.fromkeys([*reconstructed, background]):  # what the maps and the overlay use
        normalised[modality], slices[modality] = preprocess_volume(volumes.arrays[modality], volumes.brain_mask, preprocess)
    healthy_slices = _reconstruct_volume(detector.reconstruct, {m: slices[m] for m in reconstructed}, files)
    healthy = {m: slices_to_volume(healthy_slices[m], volumes.brain_mask.shape, preprocess) for m in reconstructed}
    anomaly, weighted = anomaly_maps(slices, healthy_slices, volumes.brain_mask, preprocess, weights)
    logger.info("%s: reconstructed %d slices × %s", subject, len(slices[reconstructed[0]]), "/".join(reconstructed))
    reconstruction_seconds = time.perf_counter() - reconstruction_started
    mask = mask_settings.mask(weighted, volumes.brain_mask, volumes.geometry.training_voxel_size, preprocess.z_range)
    if mask is None:
        logger.warning("%s: no calibration file, threshold or Otsu mode given: wrote the anomaly maps only, NO binary mask", subject)

    with atomic_dir(target, overwrite=overwrite) as tmp, ThreadPoolExecutor(WRITER_THREADS) as writers:
        outputs, writing = {}, []
        for modality in reconstructed:
            outputs[f"healthy_{modality}"] = f"{subject}_healthy_{modality}.nii.gz"
            writing.append(writers.submit(volumes.save, healthy[modality], tmp / outputs[f"healthy_{modality}"]))
            outputs[f"anomaly_{modality}"] = f"{subject}_anomaly_{modality}.nii.gz"
            writing.append(writers.submit(volumes.save, anomaly[modality], tmp / outputs[f"anomaly_{modality}"]))
        outputs["anomaly"] = f"{subject}_anomaly.nii.gz"
        writing.append(writers.submit(volumes.save, weighted, tmp / outputs["anomaly"]))
        if mask is not None:
            outputs["mask"] = f"{subject}_mask.nii.gz"
            writing.append(writers.submit(volumes.save, mask, tmp / outputs["mask"], dtype=np.uint8))
        outputs["overlay"] = f"{subject}_overlay.png"
        save_overlay(normalised[background], weighted, mask, preprocess.z_range, tmp / outputs["overlay"], f"{subject} ({method})")
        for written in writing:  # a failed write raises here, inside atomic_dir: no half-written folder
            written.result()
        outputs["detection"] = f"{subject}_detection.json"
        record = {
            "method": method,
            "subject": subject,
            "inputs": {m: str(Path(files.paths[m]).resolve()) for m in files.modalities},
            **({"input_channels": dict(files.channels)} if files.channels else {}),
            "input_geometry": volumes.geometry.record(),
            "outputs": outputs,
            "weights": mask_settings.detection_record()["weights"],
            "weights_source": mask_settings.weights_source,
            "reconstructed_modalities": reconstructed,
            "mask": mask_settings.detection_record()["mask"],
            "preprocess": preprocess.to_dict(),
            "reconstruction": dict(detector.provenance or {}),
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


def detect_datalist(
    volumes: str | Path | Sequence[Mapping[str, Any]] | Mapping[str, Any],
    split: str | None,
    out_dir: str | Path,
    detector: Detector,
    overwrite: bool = False,
    skip_existing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    subjects: Sequence[str] | None = None,
) -> list[Path]:
    """:func:`detect_subject` for every subject of a split (only those named in ``subjects`` when given, each of which
    must be in the split); subject i is done by rank ``i % world_size``.

    ``skip_existing`` resumes an interrupted run: subjects whose folder already exists are logged and skipped
    (folders are written atomically, so an existing one is complete). Before the first subject is processed, every
    remaining subject's files are checked (present, readable headers, 3D, same shape and affine) and no output
    folder may exist (unless ``overwrite``), so a bad datalist fails at once. Returns the folders this rank wrote.
    """
    items = read_volumes_split(volumes, split)
    if subjects is not None:
        wanted = [str(name) for name in subjects]
        unknown = sorted(set(wanted) - {str(item["subject"]) for item in items})
        if unknown:
            raise TsgmInputError(str(volumes), f"subjects {unknown} are not in the {split!r} split")
        items = [item for item in items if str(item["subject"]) in wanted]
    n_reconstructed = len(detector.reconstructed)
    todo, needed = [], 0
    for item in items[rank::world_size]:
        target = Path(out_dir) / item["subject"]
        if skip_existing and target.exists() and not overwrite:
            logger.info("%s exists, skipped", target)
            continue
        check_can_write(target, overwrite)
        files = SubjectFiles.from_record(item)
        # headers and geometry of every subject, and room for all outputs, before the first is processed
        needed += output_bytes(open_subject(files, detector.preprocess, detector.reconstructed, detector.needed)[1], n_reconstructed)
        todo.append(files)
    if todo:
        check_writable(Path(out_dir) / todo[0].subject, needed)
    return [detect_subject(files, out_dir, detector, overwrite=overwrite) for files in todo]


def run_detection(
    out_dir: str | Path,
    detector: Detector,
    subject_dir: str | Path | None = None,
    files: Mapping[str, str | Path | None] | None = None,
    datalist: str | Path | None = None,
    split: str | None = "test",
    subject: str | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    subjects: Sequence[str] | None = None,
) -> list[Path]:
    """Bundle entry point: detect one subject folder, explicit files (those of the reconstructed modalities at least),
    or one split of ``volumes.json``.

    Exactly one input form must be given (``files`` counts when any of its paths is set). ``subject`` names the output
    of a single-subject input; ``subjects`` restricts a datalist's split to the named subjects. Returns the written
    subject folders.
    """
    # `python -m monai.bundle run` parses values with fire: `--subject 12345` or `--subject_dir 2024` arrive as ints
    files = {k: str(v) for k, v in (files or {}).items() if v is not None}
    subject, subject_dir, datalist, out_dir = (None if v is None else str(v) for v in (subject, subject_dir, datalist, out_dir))
    given = [name for name, value in (("subject_dir", subject_dir), ("t1/t1ce/t2/flair", files), ("datalist", datalist)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one input: subject_dir, the paths t1/t1ce/t2/flair, or datalist (+ split); got {given or 'none'}")
    if datalist:
        if subject is not None:
            raise ValueError(
                f"subject names the output of one subject folder or file set; to detect {subject!r} of a datalist, give subjects ['{subject}']"
            )
        return detect_datalist(datalist, split, out_dir, detector, overwrite, skip_existing, rank, world_size, subjects)
    if subjects is not None:
        raise ValueError("subjects selects subjects of a datalist; give datalist (+ split)")
    if subject_dir:
        files = subject_files(subject_dir, require_seg=False, modalities=detector.reconstructed, reasons=detector.needed)
        for note in files.notes:
            logger.info(note)
    else:
        missing = [m for m in detector.reconstructed if m not in files]
        if missing:
            needed = detector.needed
            raise TsgmInputError(
                next(iter(files.values())), f"no {', '.join(missing)} file given (--{' --'.join(missing)}); " + "; ".join(needed[m] for m in missing)
            )
    return [detect_subject(files, out_dir, detector, overwrite=overwrite, subject=subject)]
