"""BraTS data as downloaded: find subjects in every supported layout, check geometry, load validated volumes.

Supported layouts (:data:`LAYOUTS`), detected from the files, named in the log:

- ``brats2020``: BraTS 2018-2021, ``DATASET/<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii[.gz]``, labels 1 necrotic
  core, 2 oedema, 4 enhancing. A segmentation stored under another name (BraTS20_Training_355's
  ``W39_1998.09.19_Segm.nii``) is used when it is the folder's only other NIfTI file with "seg" in its name.
- ``brats2023``: BraTS 2023/2024, all cohorts (GLI, MEN, MET, PED, SSA),
  ``DATASET/<subject>/<subject>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]``, labels 1, 2, 3 (3 = enhancing -> 4).
- ``msd_task01``: Medical Segmentation Decathlon Task01_BrainTumour, ``DATASET/imagesTr/<id>.nii.gz`` 4D with
  channels FLAIR, T1w, t1gd, T2w and ``DATASET/labelsTr/<id>.nii.gz`` (1 oedema, 2 non-enhancing, 3 enhancing).

Labels are mapped to the BraTS 2020 convention {0, 1, 2, 4} (:data:`LABEL_MAPS`); everything downstream uses the whole
tumour (every label > 0 after mapping). BraTS 2024's adult-glioma label 4 is the resection cavity, not tumour (-> 0).

Geometry (:class:`VolumeGeometry`): every volume is reoriented to the orientation the model was trained in
(``PreprocessConfig.orientation``; axial = last array axis), and its voxel size and grid shape must be the training
grid's (``voxel_size``, ``volume_shape``) or the load fails naming both and what to do. Outputs are mapped back to the
input's exact voxel order and written with the input's header. Trailing singleton axes (``(240, 240, 155, 1)``) are
squeezed. Every problem with a file raises :class:`TsgmInputError` naming that file.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import save_nifti_like

#: The four MRI contrasts, in the order used everywhere (datalists, ensembles, reports).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Segmentation file key and the internal (BraTS 2020) labels: 1 necrotic core, 2 oedema, 4 enhancing tumour.
SEG = "seg"
SEG_LABELS: tuple[int, ...] = (0, 1, 2, 4)
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
GZIP_MAGIC = b"\x1f\x8b"
#: Two affines whose entries differ by less than this (mm) are the same geometry.
AFFINE_ATOL = 1e-3
#: Voxel sizes within this relative difference of the training grid's are the same grid.
VOXEL_SIZE_RTOL = 0.05

LAYOUTS: dict[str, str] = {
    "brats2020": "BraTS 2018-2021: <subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii[.gz]",
    "brats2023": "BraTS 2023/2024 (GLI, MEN, MET, PED, SSA): <subject>/<subject>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]",
    "msd_task01": "MSD Task01_BrainTumour: imagesTr/<id>.nii.gz (4D: FLAIR, T1w, t1gd, T2w) + labelsTr/<id>.nii.gz",
}
#: File-name key of each internal key, per folder layout.
FILE_KEYS: dict[str, dict[str, str]] = {
    "brats2020": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", SEG: "seg"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", SEG: "seg"},
}
SEPARATORS: dict[str, str] = {"brats2020": "_", "brats2023": "-"}
#: MSD Task01's channel of each modality.
MSD_CHANNELS: dict[str, int] = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
#: Segmentation label -> internal label, per label convention (a label not listed is an error naming the file).
LABEL_MAPS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 4},
    # BraTS 2023/2024 MEN, MET, SSA (and GLI/PED 2023): 1 NCR/NETC, 2 ED/SNFH, 3 ET
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 4},
    # BraTS 2024 GLI (post-treatment): label 4 is the resection cavity, not tumour
    "brats2023_gli": {0: 0, 1: 1, 2: 2, 3: 4, 4: 0},
    # BraTS 2024 PED: 1 ET, 2 NET, 3 CC, 4 ED — all tumour; the sub-labels of 2023 are kept (only the whole tumour is used)
    "brats2023_ped": {0: 0, 1: 1, 2: 2, 3: 4, 4: 2},
    "msd_task01": {0: 0, 1: 2, 2: 1, 3: 4},
}


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_convention(layout: str, subject: str) -> str:
    if layout == "brats2023":
        cohort = subject.split("-")[1].lower() if subject.count("-") >= 2 else ""
        return {"gli": "brats2023_gli", "ped": "brats2023_ped"}.get(cohort, "brats2023")
    return layout


@dataclass(frozen=True)
class SubjectFiles:
    """Where one subject's volumes are.

    paths: key (``t1``, ``t1ce``, ``t2``, ``flair`` and optionally ``seg``) -> NIfTI file.
    channels: key -> channel of a 4D file (MSD Task01 images); keys not listed are 3D files.
    labels: the segmentation's label convention (a :data:`LABEL_MAPS` key).
    notes: what was found unusual and handled (logged by the callers).
    """

    subject: str
    paths: Mapping[str, Path]
    channels: Mapping[str, int] = field(default_factory=dict)
    labels: str = "brats2020"
    layout: str = "brats2020"
    notes: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The ``volumes.json`` item: ``{"subject", "t1", ..., "flair"[, "seg"], "labels"[, "channels"]}``."""
        item: dict[str, Any] = {"subject": self.subject, **{k: str(p) for k, p in self.paths.items()}, "labels": self.labels}
        if self.channels:
            item["channels"] = dict(self.channels)
        return item

    @classmethod
    def from_record(cls, item: Mapping[str, Any], subject: str | None = None) -> "SubjectFiles":
        """From a ``volumes.json`` item or a plain ``{modality: path}`` mapping (3D files, BraTS 2020 labels)."""
        if isinstance(item, SubjectFiles):
            return item
        paths = {k: Path(item[k]) for k in (*MODALITIES, SEG) if item.get(k)}
        labels = str(item.get("labels", "brats2020"))
        if labels not in LABEL_MAPS:
            raise TsgmInputError(
                f"{item.get('subject', subject)} (volumes.json)", f"unknown label convention {labels!r} (known: {sorted(LABEL_MAPS)})"
            )
        name = subject or item.get("subject") or _subject_id(paths)
        return cls(str(name), paths, {k: int(v) for k, v in dict(item.get("channels") or {}).items()}, labels)

    def require(self, keys: Sequence[str], reasons: Mapping[str, str] | None = None) -> None:
        """TsgmInputError unless every key has a file; ``reasons``: key -> why it is needed (added to the message)."""
        missing = [k for k in keys if k not in self.paths]
        if missing:
            where = next(iter(self.paths.values()), self.subject)
            why = "; ".join(reasons[k] for k in missing if reasons and k in reasons)
            raise TsgmInputError(where, f"subject {self.subject}: missing {', '.join(missing)} file(s)" + (f"; {why}" if why else ""))

    @property
    def modalities(self) -> list[str]:
        """The modalities with a file, in ``MODALITIES`` order."""
        return [m for m in MODALITIES if m in self.paths]


def _subject_id(paths: Mapping[str, Path]) -> str:
    """``BraTS20_Training_001`` from ``.../BraTS20_Training_001_t1.nii.gz`` (either BraTS naming; the first modality
    given), else the stem."""
    first = next((m for m in MODALITIES if m in paths), None)
    if first is None:
        return "subject"
    name = _strip_nifti_suffix(Path(paths[first]).name)
    for layout, keys in FILE_KEYS.items():
        suffix = f"{SEPARATORS[layout]}{keys[first]}"
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_in(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.nii.gz`` or ``.nii``; error if both exist."""
    found = [folder / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES if (folder / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise TsgmInputError(folder, f"both {found[0].name} and {found[1].name} exist; keep only one")
    return found[0] if found else None


def _folder_layout(folder: Path) -> str | None:
    """Which BraTS naming the files in a subject folder follow (any key file present), or None."""
    for layout, keys in FILE_KEYS.items():
        if any(_nifti_in(folder, f"{folder.name}{SEPARATORS[layout]}{key}") for key in keys.values()):
            return layout
    return None


def _odd_segmentation(folder: Path, taken: set[Path]) -> Path | None:
    """The folder's only other NIfTI file with "seg" in its name (BraTS20_Training_355: ``W39_1998.09.19_Segm.nii``).

    A file whose name says it is a model's output ("pred", e.g. DeepBrainSeg's ``DeepBrainSeg_Prediction.nii.gz``) is
    never a label."""
    others = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and p not in taken
        and p.name.endswith(NIFTI_SUFFIXES)
        and "seg" in p.name.lower()
        and "pred" not in p.name.lower()
        and not p.name.startswith(".")
    ]
    return others[0] if len(others) == 1 else None


def folder_subject_files(
    subject_dir: str | Path, require_seg: bool, modalities: Sequence[str] = MODALITIES, reasons: Mapping[str, str] | None = None
) -> SubjectFiles:
    """The files of one BraTS subject folder (either naming); ``seg`` is included when present, required if asked.

    ``modalities`` must have a file (the others are included when present); ``reasons``: modality -> why it is
    needed, added to the error that names the missing file."""
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        problem = "is a file, not a subject directory" if subject_dir.exists() else "subject directory does not exist"
        raise TsgmInputError(subject_dir, f"{problem} (supported: {'; '.join(LAYOUTS.values())})")
    layout = _folder_layout(subject_dir) or "brats2020"
    keys, sep, name = FILE_KEYS[layout], SEPARATORS[layout], subject_dir.name
    paths: dict[str, Path] = {}
    notes: list[str] = []
    for key in (*MODALITIES, SEG):
        path = _nifti_in(subject_dir, f"{name}{sep}{keys[key]}")
        if path is None and key == SEG:
            path = _odd_segmentation(subject_dir, set(paths.values()))
            if path is not None:
                notes.append(f"{name}: segmentation {path.name} used (not named {name}{sep}{keys[SEG]}.nii[.gz])")
        if path is not None:
            paths[key] = path
        elif key in modalities or (key == SEG and require_seg):
            expected = f"{name}{sep}{keys[key]}"
            present = sorted(p.name for p in subject_dir.iterdir() if not p.name.startswith("."))
            others = [p for p in present if p.startswith(f"{expected}.")]
            hint = f"; found {', '.join(others)}: convert it to NIfTI" if others else f"; the folder holds {present[:8]}"
            why = f"; {reasons[key]}" if reasons and key in reasons else ""
            raise TsgmInputError(
                subject_dir / f"{expected}.nii.gz", f"missing {key} file for subject {name} (looked for .nii.gz and .nii{hint}){why}"
            )
    return SubjectFiles(name, paths, labels=_label_convention(layout, name), layout=layout, notes=tuple(notes))


def msd_subject_files(image: str | Path, require_seg: bool) -> SubjectFiles:
    """An MSD Task01 subject: its 4D image ``.../imagesTr/<id>.nii.gz`` and, when present, ``.../labelsTr/<id>.nii.gz``."""
    image = Path(image)
    if not image.is_file():
        raise TsgmInputError(image, "MSD image file does not exist" if not image.exists() else "not a file")
    label = image.parent.parent / "labelsTr" / image.name
    paths = {m: image for m in MODALITIES}
    if label.is_file():
        paths[SEG] = label
    elif require_seg:
        raise TsgmInputError(label, f"missing label file for subject {_strip_nifti_suffix(image.name)} (MSD Task01: labelsTr/<id>.nii.gz)")
    return SubjectFiles(_strip_nifti_suffix(image.name), paths, dict(MSD_CHANNELS), "msd_task01", "msd_task01")


def subject_files(
    subject: str | Path, require_seg: bool, modalities: Sequence[str] = MODALITIES, reasons: Mapping[str, str] | None = None
) -> SubjectFiles:
    """One subject given as a BraTS subject folder (either naming) or an MSD Task01 4D image file; a folder must hold
    ``modalities`` (:func:`folder_subject_files`)."""
    path = Path(subject)
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        try:
            shape = nib.load(str(path)).shape
        except Exception:  # not readable as NIfTI: reported as a file that is not a subject folder
            shape = ()
        if len(shape) == 4 and shape[3] == len(MSD_CHANNELS):
            return msd_subject_files(path, require_seg)
        raise TsgmInputError(
            path,
            f"is a file, not a subject directory (give a subject folder, or an MSD Task01 4D image with "
            f"{len(MSD_CHANNELS)} channels; this file has shape {shape})",
        )
    return folder_subject_files(path, require_seg, modalities, reasons)


@dataclass
class Dataset:
    """A dataset's subjects (sorted by id) and what was found: layout, release name, skipped entries, notes."""

    layout: str
    release: str
    subjects: dict[str, SubjectFiles]
    skipped: list[str]

    @property
    def notes(self) -> list[str]:
        return [note for files in self.subjects.values() for note in files.notes]


def _release(layout: str, subjects: list[str]) -> str:
    """A human name for what was found, from the subject ids (for the log)."""
    if layout == "msd_task01":
        return "MSD Task01_BrainTumour"
    if layout == "brats2023":
        cohorts = sorted({s.split("-")[1] for s in subjects if s.count("-") >= 2})
        return f"BraTS 2023/2024 naming, cohorts {', '.join(cohorts) or 'unknown'}"
    prefixes = {"BraTS20_": "BraTS 2020", "BraTS2021_": "BraTS 2021", "Brats18_": "BraTS 2018", "BraTS19_": "BraTS 2019"}
    found = sorted({name for prefix, name in prefixes.items() if any(s.startswith(prefix) for s in subjects)})
    return f"{' + '.join(found) or 'BraTS 2018-2021'} naming"


def _unknown_layout(dataset_dir: Path) -> TsgmInputError:
    inner = [d for d in sorted(dataset_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    nested = [d for d in inner if (d / "imagesTr").is_dir() or any(_folder_layout(s) for s in list(d.iterdir())[:50] if s.is_dir())]
    hint = f"; did you mean --dataset_dir {nested[0]}?" if nested else ""
    layouts = "; ".join(f"{name}: {text}" for name, text in LAYOUTS.items())
    return TsgmInputError(dataset_dir, f"no BraTS subjects found{hint} (supported layouts: {layouts})")


def find_dataset(dataset_dir: str | Path, require_seg: bool = False) -> Dataset:
    """Detect the layout of ``dataset_dir`` and list its subjects (see the module doc for the layouts).

    Entries that are not subjects (CSV files at a BraTS root, ``dataset.json``, macOS ``._*`` files) are skipped;
    folders without subject files are listed in ``skipped``. Unknown layout: an error listing the supported ones.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise TsgmInputError(dataset_dir, "dataset directory does not exist")
    if (dataset_dir / "imagesTr").is_dir():
        images = sorted(p for p in (dataset_dir / "imagesTr").iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
        if not images:
            raise TsgmInputError(dataset_dir / "imagesTr", "no NIfTI images (MSD Task01 layout: imagesTr/<id>.nii.gz)")
        subjects = {f.subject: f for f in (msd_subject_files(p, require_seg) for p in images)}
        return Dataset("msd_task01", _release("msd_task01", list(subjects)), subjects, [])
    folders = [d for d in sorted(dataset_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = {d.name: layout for d in folders if (layout := _folder_layout(d))}
    if not found:
        raise _unknown_layout(dataset_dir)
    layouts = sorted(set(found.values()))
    if len(layouts) > 1:
        example = {layout: next(s for s, kind in found.items() if kind == layout) for layout in layouts}
        raise TsgmInputError(dataset_dir, f"subjects of several layouts in one dataset: {example}; keep one release per dataset folder")
    subjects = {name: folder_subject_files(dataset_dir / name, require_seg) for name in sorted(found)}
    skipped = [d.name for d in folders if d.name not in found]
    return Dataset(layouts[0], _release(layouts[0], list(subjects)), subjects, skipped)


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


def _open(path: Path, channel: int | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file as a 3D volume (header only; data is read lazily): trailing singleton axes are squeezed and
    ``channel`` picks one volume of a 4D file."""
    if not path.is_file():
        raise TsgmInputError(path, "file not found" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise TsgmInputError(path, "file is empty (0 bytes): copy or convert it again")
    problem = _extension_problem(path)
    if problem:
        raise TsgmInputError(path, problem)
    try:
        image = nib.load(str(path))
        while len(image.shape) > 3 and image.shape[-1] == 1 and channel is None:
            image = image.slicer[..., 0]
        if channel is not None:
            if len(image.shape) != 4 or not 0 <= channel < image.shape[3]:
                raise TsgmInputError(path, f"expected a 4D image with a channel {channel}, got shape {image.shape}")
            image = image.slicer[..., channel]
    except TsgmInputError:
        raise
    except Exception as error:  # nibabel raises many types for bad files (ImageFileError, OSError, ...)
        raise TsgmInputError(path, f"cannot read as NIfTI ({_describe(error)})") from error
    if len(image.shape) != 3:
        raise TsgmInputError(
            path,
            f"expected a 3D volume, got a {len(image.shape)}D image of shape {image.shape}"
            + (" (a 4D multi-channel image: use the MSD Task01 layout imagesTr/<id>.nii.gz)" if len(image.shape) == 4 else ""),
        )
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


#: A volume with more than this fraction of non-zero voxels has no zero background (BraTS brains fill about 15 %).
MAX_NONZERO_FRACTION = 0.99


def check_intensities(data: np.ndarray, path: Path) -> None:
    """What the normalisation and the brain mask (non-zero voxels) assume of a modality, else TsgmInputError naming the
    file: a zero background (skull-stripped, no intensity offset: BraTS preprocessing) and no negative intensities
    (raw scanner intensities, not z-scored)."""
    nonzero = float(np.count_nonzero(data)) / data.size
    if nonzero > MAX_NONZERO_FRACTION:
        raise TsgmInputError(
            path,
            f"no zero background ({nonzero:.1%} of the voxels are non-zero): tsgm needs "
            "skull-stripped scans whose background is 0 (BraTS preprocessing); skull-strip the "
            "scan or remove its intensity offset first",
        )
    negative = int(np.count_nonzero(data < 0))
    if negative:
        raise TsgmInputError(
            path,
            f"{negative} voxels have negative intensities (z-scored or otherwise normalised?): "
            "give the scan with its raw, non-negative intensities; tsgm normalises each volume itself",
        )


def _fmt(values: Any, unit: str = "") -> str:
    return "×".join(f"{v:g}" for v in values) + unit


@dataclass(frozen=True)
class VolumeGeometry:
    """An input volume's geometry and its map to the model's voxel grid (a lossless axis permutation/flip).

    shape, axcodes, voxel_size: of the input (after squeezing), e.g. (240, 240, 155), "LPS", (1, 1, 1) mm.
    training_axcodes: the orientation the arrays are processed in (the model's; axial = last axis).
    """

    shape: tuple[int, int, int]
    axcodes: str
    voxel_size: tuple[float, float, float]
    training_axcodes: str

    @property
    def _transform(self) -> np.ndarray:
        return orientations.ornt_transform(orientations.axcodes2ornt(self.axcodes), orientations.axcodes2ornt(self.training_axcodes))

    def to_training(self, array: np.ndarray) -> np.ndarray:
        """(H, W, D) in the input's voxel order -> the model's orientation (a view when nothing moves)."""
        return array if self.axcodes == self.training_axcodes else np.ascontiguousarray(orientations.apply_orientation(array, self._transform))

    def to_input(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_training`: outputs go back to the input's exact voxel order."""
        if self.axcodes == self.training_axcodes:
            return array
        inverse = orientations.ornt_transform(orientations.axcodes2ornt(self.training_axcodes), orientations.axcodes2ornt(self.axcodes))
        return np.ascontiguousarray(orientations.apply_orientation(array, inverse))

    def _in_training_order(self, values: tuple) -> tuple:
        """Per-axis ``values`` of the input permuted to the training orientation's axes."""
        out = list(values)
        for axis, target in enumerate(self._transform[:, 0].astype(int)):
            out[target] = values[axis]
        return tuple(out)

    @property
    def training_shape(self) -> tuple[int, int, int]:
        return self._in_training_order(self.shape)

    @property
    def training_voxel_size(self) -> tuple[float, float, float]:
        return self._in_training_order(self.voxel_size)

    def record(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "axcodes": self.axcodes,
            "voxel_size_mm": [round(v, 6) for v in self.voxel_size],
            "processed_in": self.training_axcodes,
            "reoriented": self.axcodes != self.training_axcodes,
        }


def volume_geometry(image: nib.Nifti1Image, preprocess: PreprocessConfig, path: str | Path) -> VolumeGeometry:
    """The geometry of ``image`` checked against the training grid of ``preprocess`` (TsgmInputError naming ``path``)."""
    return grid_geometry(image.affine, image.shape[:3], preprocess, path)


def grid_geometry(affine: Any, shape: tuple[int, ...], preprocess: PreprocessConfig, path: str | Path) -> VolumeGeometry:
    """The geometry of an (H, W, D) grid with this 4×4 ``affine`` (voxel sizes are its column norms), checked against
    the training grid of ``preprocess``: the voxel size and grid shape must be the training grid's, naming ``path``."""
    affine = np.asarray(affine, dtype=np.float64)
    codes = orientations.aff2axcodes(affine)
    if None in codes:
        raise TsgmInputError(path, f"affine has no defined axis directions (axis codes {codes}): fix the NIfTI header")
    axcodes = "".join(codes)
    geometry = VolumeGeometry(
        tuple(int(n) for n in shape[:3]),
        axcodes,
        tuple(float(v) for v in nib.affines.voxel_sizes(affine)[:3]),
        preprocess.orientation or axcodes,
    )
    if preprocess.voxel_size is not None and not np.allclose(geometry.training_voxel_size, preprocess.voxel_size, rtol=VOXEL_SIZE_RTOL):
        raise TsgmInputError(
            path,
            f"voxel size {_fmt(geometry.training_voxel_size, ' mm')} differs from the model's training grid "
            f"({_fmt(preprocess.voxel_size, ' mm')}): resample the volumes to that grid first (BraTS: co-registered to "
            f"SRI24 at 1 mm, 240×240×155), or prepare and train on your grid",
        )
    if preprocess.volume_shape is not None and geometry.training_shape != tuple(preprocess.volume_shape):
        raise TsgmInputError(
            path,
            f"grid {_fmt(geometry.training_shape)} (in {geometry.training_axcodes} orientation) differs from the model's "
            f"training grid {_fmt(preprocess.volume_shape)}: another field of view would put other anatomy in the axial "
            f"slices {preprocess.z_min}-{preprocess.z_max}; register the volumes to the training grid first "
            f"(BraTS: SRI24 at 1 mm, 240×240×155), or prepare and train on your grid",
        )
    try:
        preprocess.check_volume_shape(geometry.training_shape)
    except ValueError as error:
        raise TsgmInputError(path, str(error)) from error
    return geometry


@dataclass
class SubjectVolumes:
    """One subject's validated volumes, in the model's orientation (:class:`VolumeGeometry`).

    arrays: modality -> (H, W, D) float32 raw intensities (finite, not all zero), all the same shape (the modalities
        with a file, in ``MODALITIES`` order: all four unless a detection needs fewer).
    seg: (H, W, D) uint8 labels in {0, 1, 2, 4} (mapped from the dataset's convention), or None when not given.
    reference: NIfTI header source of the first modality loaded (outputs are written with it, in the input's voxel order).
    brain_mask: (H, W, D) bool, voxels where any loaded modality is non-zero (BraTS is skull-stripped).
    geometry: the input's geometry and the map between its voxel order and the arrays'.
    """

    arrays: dict[str, np.ndarray]
    seg: np.ndarray | None
    reference: nib.Nifti1Image
    brain_mask: np.ndarray
    geometry: VolumeGeometry

    def slices(self, preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
        """modality -> (S, s, s) float32 slices in [0, 1]: the training preprocessing (normalised with this subject's
        brain mask, axial slices ``z_min..z_max``), the one place a subject becomes model input."""
        return {m: preprocess_volume(self.arrays[m], self.brain_mask, preprocess)[1] for m in self.arrays}

    def save(self, array: np.ndarray, path: str | os.PathLike, dtype: Any = np.float32, overwrite: bool = False) -> None:
        """Write an (H, W, D) array of this subject (model orientation) as NIfTI in the input's exact geometry."""
        save_nifti_like(self.geometry.to_input(array), self.reference, path, overwrite=overwrite, dtype=dtype)


def open_subject(
    files: SubjectFiles | Mapping[str, Any],
    preprocess: PreprocessConfig,
    modalities: Sequence[str] = MODALITIES,
    reasons: Mapping[str, str] | None = None,
) -> tuple[dict[str, nib.Nifti1Image], VolumeGeometry]:
    """Open a subject's files and check their headers: readable, 3D, same shape and affine (``AFFINE_ATOL``), and a
    geometry that fits the training grid (:func:`volume_geometry`). Cheap (no voxel data read): used to validate a
    whole dataset before processing it. ``modalities`` must have a file (``reasons``: why, for the error); the other
    modalities are opened when present. Returns the images and the subject's geometry."""
    files = SubjectFiles.from_record(files)
    files.require(modalities, reasons)
    if not files.modalities:
        raise TsgmInputError(next(iter(files.paths.values()), files.subject), f"subject {files.subject}: no modality file (t1, t1ce, t2, flair)")
    keys = [*files.modalities, *([SEG] if SEG in files.paths else [])]
    images = {key: _open(Path(files.paths[key]), files.channels.get(key)) for key in keys}
    first = Path(files.paths[keys[0]])
    reference, reference_name = images[keys[0]], first.name
    for key in keys[1:]:
        path, image = Path(files.paths[key]), images[key]
        if image.shape != reference.shape:
            raise TsgmInputError(path, f"shape {image.shape} differs from {reference_name} {reference.shape}")
        if not np.allclose(image.affine, reference.affine, atol=AFFINE_ATOL):
            raise TsgmInputError(
                path,
                f"affine differs from {reference_name} (max difference "
                f"{np.abs(image.affine - reference.affine).max():.4g}); volumes must be co-registered",
            )
    return images, volume_geometry(reference, preprocess, first)


def has_tumour(files: SubjectFiles) -> bool:
    """Whether the subject's segmentation holds any tumour label (after mapping): a subject-level healthy/tumour flag."""
    path = Path(files.paths[SEG])
    return bool(np.any(_map_labels(_read_data(path, _open(path, files.channels.get(SEG))), files.labels, path) > 0))


def _map_labels(labels: np.ndarray, convention: str, path: Path) -> np.ndarray:
    mapping = LABEL_MAPS[convention]
    values = np.unique(labels)
    bad = [v for v in values.tolist() if v not in mapping]
    if bad:
        raise TsgmInputError(path, f"segmentation labels {bad[:10]} are not {convention} labels {sorted(mapping)}")
    lookup = np.zeros(int(max(mapping)) + 1, dtype=np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[labels.astype(np.int64)]


def load_volume(path: str | Path, preprocess: PreprocessConfig) -> tuple[nib.Nifti1Image, VolumeGeometry, np.ndarray]:
    """One validated single-modality volume: ``(image, geometry, (H, W, D) float32 data in the model's orientation)``."""
    path = Path(path)
    image = _open(path)
    geometry = volume_geometry(image, preprocess, path)
    array = _read_data(path, image)
    if not array.any():
        raise TsgmInputError(path, "volume is all zero")
    return image, geometry, geometry.to_training(array)


def load_subject(
    files: SubjectFiles | Mapping[str, Any],
    preprocess: PreprocessConfig,
    modalities: Sequence[str] = MODALITIES,
    reasons: Mapping[str, str] | None = None,
) -> SubjectVolumes:
    """Load and validate a subject's volumes (``files``: :class:`SubjectFiles`, a volumes.json item, or ``{key: path}``).

    ``modalities`` must have a file (``reasons``: modality -> why, for the error); every modality with a file is loaded
    (the brain mask is where any of them is non-zero), so a subject with all four loads the same whatever is required.
    Checks :func:`open_subject`'s header and geometry checks, then finite values, no all-zero modality and labels of
    the dataset's convention; reorients everything to the model's orientation.
    """
    files = SubjectFiles.from_record(files)
    images, geometry = open_subject(files, preprocess, modalities, reasons)

    def read(modality: str) -> np.ndarray:
        path = Path(files.paths[modality])
        data = _read_data(path, images[modality])
        if not data.any():
            raise TsgmInputError(
                path, "volume is all zero" if modality not in files.channels else f"channel {files.channels[modality]} ({modality}) is all zero"
            )
        check_intensities(data, path)
        return geometry.to_training(data)

    # one thread per file: gzip decompression, most of the reading time, releases the GIL; map raises the first
    # failing modality's error in MODALITIES order, as a loop would
    with ThreadPoolExecutor(len(files.modalities)) as readers:
        arrays = dict(zip(files.modalities, readers.map(read, files.modalities)))
    seg = None
    if SEG in files.paths:
        path = Path(files.paths[SEG])
        seg = geometry.to_training(_map_labels(_read_data(path, images[SEG]), files.labels, path))
    brain_mask = np.logical_or.reduce([array != 0 for array in arrays.values()])
    return SubjectVolumes(arrays=arrays, seg=seg, reference=images[files.modalities[0]], brain_mask=brain_mask, geometry=geometry)
