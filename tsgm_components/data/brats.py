"""BraTS2020 layout: find subjects, locate their files, load validated volumes.

Layout: ``DATASET/<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii[.gz]``; axial slices are the last array
axis. Volumes are used in their stored orientation (no reorientation), so outputs can reuse the input
affine and header unchanged. Every problem with a file raises :class:`TsgmInputError` naming that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tsgm_components.errors import TsgmInputError

#: The four MRI contrasts, in the order used everywhere (datalists, ensembles, reports).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Segmentation file key and the BraTS labels: 1 necrotic core, 2 oedema, 4 enhancing tumour.
SEG = "seg"
SEG_LABELS: tuple[int, ...] = (0, 1, 2, 4)
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
GZIP_MAGIC = b"\x1f\x8b"
#: Two affines whose entries differ by less than this (mm) are the same geometry.
AFFINE_ATOL = 1e-3


@dataclass
class SubjectVolumes:
    """One subject's validated volumes.

    arrays: modality -> (H, W, D) float32 raw intensities (finite, not all zero), all the same shape.
    seg: (H, W, D) uint8 labels in {0, 1, 2, 4}, or None when no segmentation was given.
    reference: NIfTI image of the first modality (affine + header for writing outputs in input geometry).
    brain_mask: (H, W, D) bool, voxels where any modality is non-zero (BraTS is skull-stripped).
    """

    arrays: dict[str, np.ndarray]
    seg: np.ndarray | None
    reference: nib.Nifti1Image
    brain_mask: np.ndarray


def _nifti_file(subject_dir: Path, key: str) -> Path | None:
    """The file ``<subject>_<key>.nii[.gz]`` in ``subject_dir``; error if both variants exist."""
    found = [subject_dir / f"{subject_dir.name}_{key}{suffix}" for suffix in NIFTI_SUFFIXES]
    found = [p for p in found if p.exists()]
    if len(found) > 1:
        raise TsgmInputError(subject_dir, f"both {found[0].name} and {found[1].name} exist; keep only one")
    return found[0] if found else None


def find_subjects(dataset_dir: str | Path) -> list[str]:
    """Sorted names of the sub-folders of ``dataset_dir`` that hold BraTS files (``<name>_<mod>.nii[.gz]``)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise TsgmInputError(dataset_dir, "dataset directory does not exist")
    keys = (*MODALITIES, SEG)
    subjects = sorted(
        d.name
        for d in dataset_dir.iterdir()
        if d.is_dir() and any((d / f"{d.name}_{k}{s}").exists() for k in keys for s in NIFTI_SUFFIXES)
    )
    if not subjects:
        raise TsgmInputError(
            dataset_dir,
            "no BraTS subjects found (expected sub-folders <subject>/<subject>_{t1,t1ce,t2,flair}.nii[.gz])",
        )
    return subjects


def subject_files(subject_dir: str | Path, require_seg: bool) -> dict[str, Path]:
    """Paths of a subject's files: ``{"t1", "t1ce", "t2", "flair"[, "seg"]} -> Path``.

    ``seg`` is included when present; if ``require_seg`` it must be present.
    """
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        problem = "is a file, not a subject directory" if subject_dir.exists() else "subject directory does not exist"
        raise TsgmInputError(subject_dir, f"{problem} (expected <subject>/<subject>_{{t1,t1ce,t2,flair}}.nii[.gz])")
    files: dict[str, Path] = {}
    for key in (*MODALITIES, SEG):
        path = _nifti_file(subject_dir, key)
        if path is not None:
            files[key] = path
        elif key != SEG or require_seg:
            others = sorted(p.name for p in subject_dir.glob(f"{subject_dir.name}_{key}.*"))
            hint = f"; found {', '.join(others)}: convert it to NIfTI" if others else ""
            raise TsgmInputError(
                subject_dir / f"{subject_dir.name}_{key}.nii.gz",
                f"missing {key} file for subject {subject_dir.name} (looked for .nii.gz and .nii{hint})",
            )
    return files


def _describe(error: Exception) -> str:
    """One-line description of a reader error (nibabel messages can span lines)."""
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def _extension_problem(path: Path) -> str | None:
    """Why the name's extension does not fit the content (gzip magic bytes), or None."""
    with open(path, "rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    name = path.name
    if name.endswith(".nii.gz") and not compressed:
        return f"not gzip-compressed although named .nii.gz: rename it to {name[: -len('.gz')]}"
    if name.endswith(".nii") and compressed:
        return f"gzip-compressed although named .nii: rename it to {name}.gz"
    return None


def _open(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data is read lazily) and check it is a 3D volume."""
    if not path.is_file():
        raise TsgmInputError(path, "file not found" if not path.exists() else "not a file")
    problem = _extension_problem(path)
    if problem:
        raise TsgmInputError(path, problem)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for bad files (ImageFileError, OSError, ...)
        raise TsgmInputError(path, f"cannot read as NIfTI ({_describe(error)})") from error
    if len(image.shape) != 3:
        raise TsgmInputError(path, f"expected a 3D volume, got a {len(image.shape)}D image of shape {image.shape}")
    return image


def _read_data(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """Voxel data as float32 (also for integer and scaled files: no overflow later), checked finite."""
    try:
        array = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:  # truncated or corrupt data block (EOFError, zlib.error, ValueError, ...)
        raise TsgmInputError(path, f"cannot read voxel data, file truncated or corrupt ({_describe(error)})") from error
    if not np.isfinite(array).all():
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise TsgmInputError(path, f"contains non-finite voxels ({n_nan} NaN, {n_inf} Inf)")
    return array


def load_volume(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """One validated single-modality volume: ``(image, (H, W, D) float32 data)``, finite and not all zero."""
    path = Path(path)
    image = _open(path)
    array = _read_data(path, image)
    if not array.any():
        raise TsgmInputError(path, "volume is all zero")
    return image, array


def has_tumour(seg_path: str | Path) -> bool:
    """Whether a segmentation file holds any tumour label (> 0): a subject-level healthy/tumour flag."""
    path = Path(seg_path)
    return bool(np.any(_read_data(path, _open(path)) > 0))


def open_subject(files: dict[str, Path]) -> dict[str, nib.Nifti1Image]:
    """Open a subject's files and check their headers: readable, 3D, same shape and affine (``AFFINE_ATOL``).

    Cheap (no voxel data read): used to validate a whole dataset before processing it.
    """
    missing = [m for m in MODALITIES if m not in files]
    if missing:
        raise TsgmInputError(next(iter(files.values()), "<no files>"), f"missing modalities {missing}")
    keys = [*MODALITIES, *([SEG] if SEG in files else [])]
    images = {key: _open(Path(files[key])) for key in keys}
    reference, reference_name = images[MODALITIES[0]], Path(files[MODALITIES[0]]).name
    for key in keys[1:]:
        path, image = Path(files[key]), images[key]
        if image.shape != reference.shape:
            raise TsgmInputError(path, f"shape {image.shape} differs from {reference_name} {reference.shape}")
        if not np.allclose(image.affine, reference.affine, atol=AFFINE_ATOL):
            raise TsgmInputError(
                path,
                f"affine differs from {reference_name} (max difference "
                f"{np.abs(image.affine - reference.affine).max():.4g}); volumes must be co-registered",
            )
    return images


def load_subject(files: dict[str, Path]) -> SubjectVolumes:
    """Load and validate a subject's volumes (see :func:`subject_files` for ``files``).

    Checks :func:`open_subject`'s header checks, then finite values, no all-zero modality and seg labels
    in {0, 1, 2, 4}.
    """
    images = open_subject(files)
    arrays = {}
    for modality in MODALITIES:
        path = Path(files[modality])
        arrays[modality] = _read_data(path, images[modality])
        if not arrays[modality].any():
            raise TsgmInputError(path, "volume is all zero")
    seg = None
    if SEG in files:
        path = Path(files[SEG])
        labels = _read_data(path, images[SEG])
        bad = np.setdiff1d(np.unique(labels), SEG_LABELS)
        if bad.size:
            raise TsgmInputError(path, f"segmentation labels {bad[:10].tolist()} are not BraTS labels {list(SEG_LABELS)}")
        seg = labels.astype(np.uint8)
    brain_mask = np.logical_or.reduce([arrays[m] != 0 for m in MODALITIES])
    return SubjectVolumes(arrays=arrays, seg=seg, reference=images[MODALITIES[0]], brain_mask=brain_mask)
