"""Ceiling rows of the evaluation ladder: what detection reaches when a stage is perfect. Upper bounds, never results.

Both read the healthy twins of the phantom (``tsgm phantom --twins_out``), which no method sees:

- **oracle reconstruction** (:func:`detect_oracle_splits`): the "healthy" image of each subject is its twin, put
  through exactly the preprocessing, slicing, residual, ensemble, calibration and threshold code of every method
  (a :data:`~tsgm_components.detection.detector.Reconstructor` that returns the twin's slices). The gap to it is what the
  residual-and-threshold detection itself cannot do, even with a perfect reconstruction.
- **VE-JP on true pairs** (:func:`write_true_pairs`): stage 2 trained on (twin slice, real slice) pairs instead of
  CycleGAN pseudo-pairs, in the pseudo-pair layout, so the vejp_anomaly bundle trains and detects with it
  unchanged (``configs/train_true_pairs.yaml``). It is what TSGM reaches if stage 1 were perfect.

Healthy subjects have no twin file: they are their own twins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from tsgm_components.data.brats import MODALITIES, SubjectFiles, load_subject, subject_files
from tsgm_components.data.phantom import TWINS_RECORD
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.data.prepare import read_volumes_split
from tsgm_components.data.pseudo_pairs import blend_slice, placement_seed
from tsgm_components.detection.detector import Detector, detect_datalist
from tsgm_components.detection.masking import MAPS_ONLY
from tsgm_components.errors import TsgmInputError
from tsgm_components.evaluation.harness import read_prepared
from tsgm_components.io import atomic_dir, check_can_write, check_not_over_inputs, save_json

logger = logging.getLogger(__name__)

#: Method name of the oracle-reconstruction ceiling in detection folders and reports.
ORACLE_METHOD = "oracle_reconstruction"


def twin_files(twins_dir: str | Path, subject: str, files: SubjectFiles | Mapping[str, Any]) -> SubjectFiles:
    """The four modality files of ``subject``'s healthy twin; a subject without a twin is its own (healthy subject)."""
    twins_dir = Path(twins_dir)
    if not (twins_dir / TWINS_RECORD).is_file():
        raise TsgmInputError(twins_dir, f"no {TWINS_RECORD}: not a twins folder (tsgm phantom --twins_out)")
    folder = twins_dir / subject
    if folder.is_dir():
        return subject_files(folder, require_seg=False)
    listed = json.loads((twins_dir / TWINS_RECORD).read_text()).get("subjects", [])
    if subject in listed:
        raise TsgmInputError(folder, f"twin of tumour subject {subject} is missing")
    files = SubjectFiles.from_record(files, subject)
    return dataclasses.replace(files, paths={m: files.paths[m] for m in MODALITIES})


def twin_slices(twins_dir: str | Path, subject: str, files: SubjectFiles | Mapping[str, Any], preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """modality -> (S, s, s) slices of the twin in [0, 1], preprocessed exactly as the real volume."""
    twin = load_subject(twin_files(twins_dir, subject, files), preprocess)
    return twin.slices(preprocess)


class TwinReconstructor:
    """A Reconstructor whose healthy image is a given twin: returns its (4·S, 1, s, s) slices in ``MODALITIES``
    order, whatever it is given (the input only fixes the expected shape)."""

    nfe_per_slice = 0

    def __init__(self, slices: Mapping[str, np.ndarray]):
        self.stack = torch.from_numpy(np.concatenate([slices[m] for m in MODALITIES])[:, None])

    def __call__(self, inputs: Tensor) -> Tensor:
        if inputs.shape != self.stack.shape:
            raise ValueError(f"twin slices have shape {tuple(self.stack.shape)}, the input {tuple(inputs.shape)}")
        return self.stack.clone()


def detect_oracle_splits(
    twins_dir: str | Path,
    volumes: str | Path | Mapping[str, Any],
    detections_dir: str | Path,
    preprocess: PreprocessConfig,
    splits: Sequence[str] = ("validation", "test"),
    overwrite: bool = False,
    skip_existing: bool = False,
) -> list[Path]:
    """Oracle-reconstruction detection maps for every subject of ``splits``: ``detections_dir/oracle_reconstruction/
    <split>/<id>/``, the layout of every method (no mask: the evaluation calibrates on validation)."""
    written = []
    for split in splits:
        for item in read_volumes_split(volumes, split):
            subject = str(item["subject"])
            out_dir = Path(detections_dir) / ORACLE_METHOD / split
            if skip_existing and (out_dir / subject).exists() and not overwrite:
                continue
            reconstruct = TwinReconstructor(twin_slices(twins_dir, subject, item, preprocess))
            detector = Detector(
                reconstruct,
                preprocess,
                MAPS_ONLY,
                ORACLE_METHOD,
                provenance={
                    "reconstruction": "healthy twin (CEILING: reads the twins, which no method sees)",
                    "twins_dir": str(Path(twins_dir).resolve()),
                    "nfe_per_slice": 0,
                },
            )
            written += detect_datalist([item], None, out_dir, detector, overwrite=overwrite)
    return written


def write_true_pairs(
    twins_dir: str | Path,
    prepared_dir: str | Path,
    out: str | Path,
    splits: Sequence[str] = ("training", "validation"),
    overwrite: bool = False,
    lesion_blend_threshold: float | None = None,
    lesion_placement: str = "generator",
    lesion_placement_seed: int = 0,
) -> dict[str, int]:
    """(twin slice, real slice) pairs of every prepared slice of ``splits`` in the pseudo-pair layout.

    ``out/pseudo_pairs.json``: ``{"training": [...], ...}`` with ``image`` = the twin slice (x_A, written to
    ``out/slices/<id>/<mod>_zZZZ.npy``) and ``condition`` = the prepared real slice (absolute path), so that
    ``data.pseudo_pairs.load_pseudo_pairs`` reads them like CycleGAN's pseudo-pairs. Returns pairs per split.

    The same treatment as TSGM's pseudo-pairs (``cyclegan_brats/configs/inference.yaml``), so that the ceiling is
    TSGM with a perfect stage 1 and nothing else changed: with ``lesion_blend_threshold`` the condition is
    :func:`~tsgm_components.data.pseudo_pairs.blend_slice` of (twin, real) (written to
    ``out/slices/<id>/<mod>_zZZZ_condition.npy``), and ``lesion_placement`` "random" moves each slice's lesion to a
    random place in its brain, drawn from (``lesion_placement_seed``, subject, z); "generator": where it is.
    """
    seed = placement_seed(lesion_blend_threshold, lesion_placement, lesion_placement_seed)
    prepared_dir, out = Path(prepared_dir).resolve(), Path(out)
    check_not_over_inputs(out, [prepared_dir, twins_dir])
    check_can_write(out, overwrite)
    volumes, preprocess, _ = read_prepared(prepared_dir)
    try:
        datalist = json.loads((prepared_dir / "datalist.json").read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(prepared_dir / "datalist.json", f"cannot read ({type(error).__name__}: {error}); run `tsgm prepare` first") from error
    pairs: dict[str, list[dict[str, Any]]] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for split in splits:
            items = {str(item["subject"]): item for item in volumes.get(split, [])}
            by_slice: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
            for entry in datalist.get(split, []):
                by_slice.setdefault((str(entry["subject"]), int(entry["z"])), {})[entry["modality"]] = entry
            pairs[split] = []
            slices_of = {}
            for (subject, z), entries in by_slice.items():
                if subject not in slices_of:
                    slices_of[subject] = twin_slices(twins_dir, subject, items[subject], preprocess)
                    (tmp / "slices" / subject).mkdir(parents=True)
                twin = {m: slices_of[subject][m][z - preprocess.z_min] for m in entries}
                conditions = {m: str(prepared_dir / entry["image"]) for m, entry in entries.items()}
                if lesion_blend_threshold is not None:
                    real = {m: np.load(path) for m, path in conditions.items()}
                    blended = blend_slice(subject, z, twin, real, float(lesion_blend_threshold), seed)
                    for m in entries:
                        conditions[m] = f"slices/{subject}/{m}_z{z:03d}_condition.npy"
                        np.save(tmp / conditions[m], blended[m])
                for modality, entry in entries.items():
                    name = f"slices/{subject}/{modality}_z{z:03d}.npy"
                    np.save(tmp / name, twin[modality])
                    pairs[split].append({"image": name, "condition": conditions[modality], "subject": subject, "modality": modality, "z": z})
            logger.info("true pairs, %s: %d slices of %d subjects", split, len(pairs[split]), len(slices_of))
        save_json(pairs, tmp / "pseudo_pairs.json")
        save_json(
            {
                "what": "true pairs (CEILING): image = healthy twin slice, condition = real slice",
                "twins_dir": str(Path(twins_dir).resolve()),
                "prepared_dir": str(prepared_dir),
                "lesion_blend_threshold": lesion_blend_threshold,
                "lesion_placement": lesion_placement,
                "lesion_placement_seed": lesion_placement_seed,
            },
            tmp / "true_pairs.json",
        )
    return {split: len(p) for split, p in pairs.items()}
