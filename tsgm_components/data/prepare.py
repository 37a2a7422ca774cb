"""``tsgm prepare``: subject-level split, normalisation, axial slicing and MONAI datalists.

Output layout (docs/architecture.md): ``prepare_config.json``, ``split.json``, ``datalist.json``,
``volumes.json`` and ``slices/<id>/{<mod>,seg}_zZZZ.npy``. Inputs are only read. All subjects' headers
(files present, readable, 3D, same shape and affine, usable with the slice range) are checked before any
work; voxel-level problems (NaN, truncated data, bad labels) surface while processing. Either way the
output is written through :func:`tsgm_components.io.atomic_dir`, so a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES, SEG, Dataset, SubjectFiles, find_dataset, has_tumour, load_subject, open_subject
from tsgm_components.data.phantom import PHANTOM_RECORD
from tsgm_components.data.preprocessing import PreprocessConfig, volume_to_slices
from tsgm_components.data.real_brats import SPLIT_FILE as REAL_SPLIT, SUBJECTS as REAL_SUBJECTS
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write, check_writable

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: split.json key -> MONAI datalist key
DATALIST_KEYS = {"train": "training", "val": "validation", "test": "test"}
#: Shipped split of the full BraTS2020 training set, used when a dataset holds exactly those subjects.
BRATS2020_SPLIT = REPO_ROOT / "data_manifests" / "brats2020_split.json"


def split_subjects(
    subjects: list[str],
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    strata: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Seeded subject-level split ``{"train", "val", "test"} -> sorted ids``, stratified by ``strata``.

    Rule, within each stratum (``strata``: subject -> stratum name, e.g. "healthy"/"tumour"; None: one stratum):
    permute the stratum's sorted ids with ``numpy.random.default_rng(seed).permutation``; the first
    ``round(n * test_fraction)`` are test, the next ``round(n * val_fraction)`` validation, the rest training (the
    paper's 9:1 train/test split with validation carved out of training). A fraction > 0 gets at least one subject
    of a stratum with 3 or more subjects; a stratum of 1 or 2 subjects is training only. With one stratum this is
    exactly the unstratified rule, so the shipped BraTS2020 split (all tumour subjects) is unchanged.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need val_fraction, test_fraction >= 0 with sum < 1, got {val_fraction}, {test_fraction}")
    groups: dict[str, list[str]] = {}
    for subject in sorted(subjects):
        groups.setdefault("all" if strata is None else str(strata[subject]), []).append(subject)
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for stratum in sorted(groups):
        ordered = groups[stratum]
        n = len(ordered)
        if strata is not None and n < 3:
            split["train"] += ordered
            continue

        def count(fraction: float) -> int:
            return max(1, int(round(n * fraction))) if fraction > 0 else 0

        n_test, n_val = count(test_fraction), count(val_fraction)
        if n - n_test - n_val < 1:
            raise ValueError(f"{n} subjects are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
        picked = [ordered[i] for i in np.random.default_rng(seed).permutation(n)]
        split["test"] += picked[:n_test]
        split["val"] += picked[n_test : n_test + n_val]
        split["train"] += picked[n_test + n_val :]
    return {name: sorted(ids) for name, ids in split.items()}


def subject_strata(files: Mapping[str, SubjectFiles]) -> dict[str, str]:
    """subject -> "healthy" (no tumour label anywhere in its segmentation) or "tumour": the split's strata."""
    return {subject: "tumour" if has_tumour(subject_files) else "healthy" for subject, subject_files in files.items()}


def load_split_file(path: str | Path, subjects: list[str]) -> dict[str, list[str]]:
    """Read a split manifest (``{"split": {"train", "val", "test"}}`` or those keys at top level).

    Its subjects must be exactly the dataset's subjects.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        split = record.get("split", record)
        split = {name: sorted(str(s) for s in split[name]) for name in SPLITS}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TsgmInputError(path, f"not a split manifest with train/val/test lists ({type(error).__name__}: {error})") from error
    listed = [s for name in SPLITS for s in split[name]]
    if len(listed) != len(set(listed)):
        raise TsgmInputError(path, "a subject is listed in more than one split")
    missing, extra = sorted(set(listed) - set(subjects)), sorted(set(subjects) - set(listed))
    if missing or extra:
        raise TsgmInputError(
            path,
            f"split does not match the dataset: {len(missing)} listed subjects not in the dataset {missing[:3]}, "
            f"{len(extra)} dataset subjects not listed {extra[:3]}",
        )
    return split


def _slice_records(
    subject: str, files: SubjectFiles, cfg: PreprocessConfig, min_brain_fraction: float
) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Normalised slices of one subject, the kept z indices and their tumour flags.

    Returns ``({mod: (S, s, s) float32, "seg": (S, s, s) uint8}, kept z, tumour flags)``. A slice is kept
    when the brain (any modality non-zero) covers at least ``min_brain_fraction`` of it; it is a tumour
    slice when the full-resolution segmentation has any voxel > 0 (all classes merged).
    """
    volumes = load_subject(files, cfg)
    slices = volumes.slices(cfg)
    whole_tumour = (volumes.seg > 0).astype(np.uint8)
    slices[SEG] = volume_to_slices(whole_tumour, cfg, is_mask=True)
    z_axis = np.arange(cfg.z_min, cfg.z_max + 1)
    brain_area = volumes.brain_mask[:, :, cfg.z_min : cfg.z_max + 1].mean(axis=(0, 1))
    tumour = whole_tumour[:, :, cfg.z_min : cfg.z_max + 1].any(axis=(0, 1))
    kept = brain_area >= min_brain_fraction
    return slices, z_axis[kept].tolist(), tumour[kept].astype(int).tolist()


def _check_output(dataset_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output inside (or holding) the input dataset, or an existing one unless ``overwrite``."""
    if out == dataset_dir or dataset_dir in out.parents or out in dataset_dir.parents:
        raise TsgmInputError(out, f"output must be outside the input dataset {dataset_dir} (inputs are never modified)")
    check_can_write(out, overwrite)


def find_subjects(dataset_dir: Path, cfg: PreprocessConfig, log: Callable[..., None]) -> tuple[Dataset, PreprocessConfig]:
    """Step 1: the dataset's subjects (segmentations required) and ``cfg`` with the training grid of the first subject;
    every subject's headers are checked against it before any work."""
    dataset = find_dataset(dataset_dir, require_seg=True)
    subjects = list(dataset.subjects)
    log("prepare: layout %s (%s), %d subjects", dataset.layout, dataset.release, len(subjects))
    for note in dataset.notes:
        log("prepare: %s", note)
    if dataset.skipped:
        log("prepare: skipping %d folders without subject files: %s", len(dataset.skipped), dataset.skipped[:5])
    cfg = training_grid(dataset.subjects[subjects[0]], cfg)
    reoriented = sum(open_subject(dataset.subjects[subject], cfg)[1].axcodes != cfg.orientation for subject in subjects)
    log(
        "prepare: training grid %s, %s mm, %s voxels (from %s); %d subjects reoriented to it",
        cfg.orientation,
        "×".join(f"{v:g}" for v in cfg.voxel_size),
        "×".join(map(str, cfg.volume_shape)),
        subjects[0],
        reoriented,
    )
    return dataset, cfg


def select_split(
    dataset_dir: Path,
    subjects: list[str],
    strata: Mapping[str, str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    split_file: str | Path | None,
    warn: Callable[..., None],
) -> tuple[dict[str, list[str]], str]:
    """Step 2: ``(split, split_source)``: ``split_file`` if given; the committed split of the project's real dataset
    or the shipped BraTS2020 manifest when the dataset holds their subjects (default split settings); else
    :func:`split_subjects` with ``seed``, stratified by ``strata``."""
    if split_file is None and sorted(subjects) == sorted(REAL_SUBJECTS) and (seed, val_fraction, test_fraction) == (0, 0.1, 0.1):
        split_file = REAL_SPLIT  # the project's real dataset (tsgm real_data): its committed split
    if split_file is not None:
        return load_split_file(split_file, subjects), str(Path(split_file).resolve())
    split, note = shipped_split(BRATS2020_SPLIT, subjects, seed, val_fraction, test_fraction)
    if note and not (dataset_dir / PHANTOM_RECORD).is_file():  # the phantom borrows BraTS ids
        warn("prepare: WARNING: %s", note)
    if split is not None:
        return split, str(BRATS2020_SPLIT)
    try:
        split = split_subjects(subjects, seed, val_fraction, test_fraction, strata)
    except ValueError as error:
        raise TsgmInputError(dataset_dir, str(error)) from error
    return split, f"seeded (seed={seed}), stratified by healthy/tumour subject"


def write_subject_slices(
    root: Path, subject: str, files: SubjectFiles, cfg: PreprocessConfig, min_brain_fraction: float
) -> tuple[list[dict[str, Any]], list[int]]:
    """Step 3, one subject: its kept slices as ``root/slices/<id>/{<mod>,seg}_zZZZ.npy``; returns its datalist items
    and the tumour flag of each kept z."""
    slices, kept, tumour = _slice_records(subject, files, cfg, min_brain_fraction)
    (root / "slices" / subject).mkdir(parents=True)
    items = []
    for z, is_tumour in zip(kept, tumour):
        i = z - cfg.z_min
        label = f"slices/{subject}/{SEG}_z{z:03d}.npy"
        np.save(root / label, slices[SEG][i])
        for modality in MODALITIES:
            image = f"slices/{subject}/{modality}_z{z:03d}.npy"
            np.save(root / image, slices[modality][i])
            items.append({"image": image, "label": label, "subject": subject, "modality": modality, "z": z, "tumour": is_tumour})
    return items, tumour


def write_records(
    root: Path, config: Mapping[str, Any], split: Mapping[str, list[str]], datalist: Mapping[str, Any], volumes: Mapping[str, Any]
) -> None:
    """Step 4: ``prepare_config.json``, ``split.json``, ``datalist.json`` and ``volumes.json`` in ``root``."""
    for filename, obj in [(PREPARE_CONFIG, config), ("split.json", split), ("datalist.json", datalist), ("volumes.json", volumes)]:
        (root / filename).write_text(json.dumps(obj, indent=1) + "\n")


def prepare(
    dataset_dir: str | Path,
    out: str | Path,
    cfg: PreprocessConfig = PreprocessConfig(),
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_file: str | Path | None = None,
    min_brain_fraction: float = 0.01,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Prepare a BraTS-layout dataset at ``dataset_dir`` into ``out``; returns the per-split counts.

    Steps: :func:`find_subjects` (headers and training grid), :func:`select_split` (``split_file`` if given, else the
    shipped BraTS2020 manifest when the dataset holds exactly its subjects, else :func:`split_subjects` with ``seed``),
    :func:`write_subject_slices` per subject, :func:`write_records`; all inside one atomic output folder. Progress is
    logged (INFO; DEBUG when not ``verbose``), the ``tsgm`` command shows it.
    """
    start = time.perf_counter()
    log = logger.info if verbose else logger.debug
    dataset_dir, out = Path(dataset_dir).resolve(), Path(out).resolve()
    _check_output(dataset_dir, out, overwrite)
    dataset, cfg = find_subjects(dataset_dir, cfg, log)
    files, subjects = dataset.subjects, list(dataset.subjects)
    # every slice file (.npy: 128-byte header + data): float32 per modality, uint8 for the segmentation
    n_slices = len(subjects) * len(cfg.z_range)
    check_writable(out, n_slices * ((len(MODALITIES) * 4 + 1) * cfg.image_size**2 + (len(MODALITIES) + 1) * 128))
    strata = subject_strata(files)
    split, split_source = select_split(
        dataset_dir, subjects, strata, seed, val_fraction, test_fraction, split_file, logger.warning if verbose else logger.debug
    )
    log("prepare: %d subjects in %s, split %s", len(subjects), dataset_dir, split_source)

    datalist: dict[str, list[dict[str, Any]]] = {DATALIST_KEYS[s]: [] for s in SPLITS}
    volumes: dict[str, list[dict[str, str]]] = {DATALIST_KEYS[s]: [] for s in SPLITS}
    counts = {
        s: {"subjects": len(split[s]), "healthy_subjects": sum(strata[subject] == "healthy" for subject in split[s])}
        | {"healthy_slices": 0, "tumour_slices": 0, "discarded_blank": 0}
        for s in SPLITS
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in SPLITS:
            for subject in split[name]:
                items, tumour = write_subject_slices(tmp, subject, files[subject], cfg, min_brain_fraction)
                datalist[DATALIST_KEYS[name]] += items
                volumes[DATALIST_KEYS[name]].append(files[subject].record())
                counts[name]["tumour_slices"] += sum(tumour)
                counts[name]["healthy_slices"] += len(tumour) - sum(tumour)
                counts[name]["discarded_blank"] += len(cfg.z_range) - len(tumour)
                log("  %-5s %s: %d slices, %d tumour  [%.1f s]", name, subject, len(tumour), sum(tumour), time.perf_counter() - start)
        config = {
            **cfg.to_dict(),
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "split_source": split_source,
            "min_brain_fraction": min_brain_fraction,
            "dataset_dir": str(dataset_dir),
            "layout": dataset.layout,
            "release": dataset.release,
            "counts": counts,
        }
        write_records(tmp, config, split, datalist, volumes)
    log("%s", format_counts(counts))
    log("prepared %s in %.1f s", out, time.perf_counter() - start)
    return counts


#: The record ``tsgm prepare`` writes next to the slices: preprocessing, training grid, split settings, counts.
PREPARE_CONFIG = "prepare_config.json"


def read_prepare_record(path: str | Path) -> dict[str, Any]:
    """The ``prepare_config.json`` record at ``path`` (a file, or a prepared folder); TsgmInputError naming it."""
    path = Path(path)
    path = path / PREPARE_CONFIG if path.is_dir() else path
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(
            path, f"cannot read the prepared dataset's record ({type(error).__name__}: {error}); run `tsgm prepare` first"
        ) from error
    if not isinstance(record, dict):
        raise TsgmInputError(path, "not a prepare_config.json record (expected a JSON object)")
    return record


def read_prepare_config(path: str | Path, image_size: int | None = None) -> PreprocessConfig:
    """The preprocessing a prepared dataset was made with (``path``: its folder or its ``prepare_config.json``), the
    one reader of that record; when ``image_size`` is given the slices must have that size."""
    record = read_prepare_record(path)
    where = Path(path) / PREPARE_CONFIG if Path(path).is_dir() else Path(path)
    try:
        preprocess = PreprocessConfig.from_dict(record)
    except (ValueError, TypeError) as error:
        raise TsgmInputError(where, f"invalid preprocessing settings ({type(error).__name__}: {error})") from error
    if image_size is not None and preprocess.image_size != int(image_size):
        raise TsgmInputError(
            where,
            f"slices were prepared at image_size={preprocess.image_size} but the config expects image_size={image_size} "
            f"(override --image_size {preprocess.image_size}, or prepare the data again at {image_size})",
        )
    return preprocess


def training_grid(first: SubjectFiles, cfg: PreprocessConfig) -> PreprocessConfig:
    """``cfg`` with the training grid filled in from the first subject where not given: its orientation, and its
    voxel size and grid shape in that orientation (every other subject must match them, reoriented if needed)."""
    orientation = cfg.orientation or open_subject(first, cfg)[1].axcodes
    geometry = open_subject(first, dataclasses.replace(cfg, orientation=orientation))[1]
    return dataclasses.replace(
        cfg,
        orientation=orientation,
        voxel_size=cfg.voxel_size or geometry.training_voxel_size,
        volume_shape=cfg.volume_shape or geometry.training_shape,
    )


#: The shipped split is applied to a dataset holding at least this fraction of its subjects (and no others).
SHIPPED_SPLIT_MIN_FRACTION = 0.9


def shipped_split(
    path: Path, subjects: list[str], seed: int, val_fraction: float, test_fraction: float
) -> tuple[dict[str, list[str]] | None, str | None]:
    """The shipped manifest's split for a dataset of its subjects (it is that seeded split, recorded), and a warning.

    Applied when every subject of the dataset is in the manifest, at least ``SHIPPED_SPLIT_MIN_FRACTION`` of the
    manifest's subjects are present and the split settings are the manifest's. Manifest subjects missing from the
    dataset are dropped from their split (the others keep theirs; the warning names them), so removing a subject never
    reshuffles the test set. Otherwise not applied, with a warning saying why whenever the datasets overlap.
    Returns ``(split or None, warning or None)``.
    """
    if not path.exists():
        return None, None
    record = json.loads(path.read_text())
    listed = {s for name in SPLITS for s in record["split"][name]}
    present = listed & set(subjects)
    if not present:
        return None, None
    name, missing = path.name, sorted(listed - present)
    if len(present) < len(subjects) or len(present) < SHIPPED_SPLIT_MIN_FRACTION * len(listed):
        others = sorted(set(subjects) - listed)
        return None, (
            f"the shipped split {name} is not applied: the dataset holds {len(present)} of its {len(listed)} subjects"
            + (f" and {len(others)} others (e.g. {others[:3]})" if others else "")
            + "; the split is seeded (pass --split_file to fix one)"
        )
    if (record["seed"], record["val_fraction"], record["test_fraction"]) != (seed, val_fraction, test_fraction):
        return None, (
            f"the shipped split {name} (seed={record['seed']}, val_fraction={record['val_fraction']}, test_fraction="
            f"{record['test_fraction']}) is not applied: other split settings were given"
        )
    split = {split_name: sorted(set(record["split"][split_name]) & present) for split_name in SPLITS}
    warning = None
    if missing:
        counts = ", ".join(f"{len(set(record['split'][n]) - present)} {n}" for n in SPLITS)
        warning = (
            f"{len(missing)} subjects of the shipped split {name} are not in the dataset ({counts}; e.g. {missing[:3]}): "
            "the shipped split is applied to the others, so results are not comparable with the full test split"
        )
    return split, warning


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """Per-split table: subjects, healthy and tumour slices (per modality), discarded blank slices."""
    lines = [f"{'split':6s} {'subjects':>8s} {'(healthy)':>9s} {'healthy':>8s} {'tumour':>8s} {'blank':>6s}   (slices per modality)"]
    for name, c in counts.items():
        lines.append(
            f"{name:6s} {c['subjects']:8d} {c.get('healthy_subjects', 0):9d} {c['healthy_slices']:8d} {c['tumour_slices']:8d} "
            f"{c['discarded_blank']:6d}"
        )
    return "\n".join(lines)


#: Datalist split names accepted for ``volumes.json`` (split.json names map to datalist keys).
SPLIT_KEYS = {"train": "training", "training": "training", "val": "validation", "validation": "validation", "test": "test"}


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
