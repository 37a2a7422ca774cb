"""``tsgm prepare``: subject-level split, normalisation, axial slicing and MONAI datalists.

Output layout (docs/architecture.md): ``prepare_config.json``, ``split.json``, ``datalist.json``,
``volumes.json`` and ``slices/<id>/{<mod>,seg}_zZZZ.npy``. Inputs are only read. All subjects' headers
(files present, readable, 3D, same shape and affine, usable with the slice range) are checked before any
work; voxel-level problems (NaN, truncated data, bad labels) surface while processing. Either way the
output is written through :func:`tsgm_components.io.atomic_dir`, so a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES, SEG, find_subjects, has_tumour, open_subject, load_subject, subject_files
from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume, volume_to_slices
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write

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


def subject_strata(files: Mapping[str, Mapping[str, Path]]) -> dict[str, str]:
    """subject -> "healthy" (no tumour label anywhere in its segmentation) or "tumour": the split's strata."""
    return {subject: "tumour" if has_tumour(paths[SEG]) else "healthy" for subject, paths in files.items()}


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
    subject: str, files: dict[str, Path], cfg: PreprocessConfig, min_brain_fraction: float
) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Normalised slices of one subject, the kept z indices and their tumour flags.

    Returns ``({mod: (S, s, s) float32, "seg": (S, s, s) uint8}, kept z, tumour flags)``. A slice is kept
    when the brain (any modality non-zero) covers at least ``min_brain_fraction`` of it; it is a tumour
    slice when the full-resolution segmentation has any voxel > 0 (all classes merged).
    """
    volumes = load_subject(files)
    slices = {m: preprocess_volume(volumes.arrays[m], volumes.brain_mask, cfg)[1] for m in MODALITIES}
    whole_tumour = (volumes.seg > 0).astype(np.uint8)
    slices[SEG] = volume_to_slices(whole_tumour, cfg, is_mask=True)
    z_axis = np.arange(cfg.z_min, cfg.z_max + 1)
    brain_area = volumes.brain_mask[:, :, cfg.z_min : cfg.z_max + 1].mean(axis=(0, 1))
    tumour = whole_tumour[:, :, cfg.z_min : cfg.z_max + 1].any(axis=(0, 1))
    kept = brain_area >= min_brain_fraction
    return slices, z_axis[kept].tolist(), tumour[kept].astype(int).tolist()


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

    The split comes from ``split_file`` if given, else from the shipped BraTS2020 manifest when the
    dataset holds exactly its subjects, else from :func:`split_subjects` with ``seed``.
    """
    start = time.perf_counter()
    dataset_dir, out = Path(dataset_dir).resolve(), Path(out).resolve()
    if out == dataset_dir or dataset_dir in out.parents or out in dataset_dir.parents:
        raise TsgmInputError(out, f"output must be outside the input dataset {dataset_dir} (inputs are never modified)")
    check_can_write(out, overwrite)
    subjects = find_subjects(dataset_dir)
    skipped = sorted(d.name for d in dataset_dir.iterdir() if d.is_dir() and d.name not in subjects)
    if skipped and verbose:
        print(f"prepare: skipping {len(skipped)} folders without <name>_<modality>.nii[.gz] files: {skipped[:5]}")
    files = {s: subject_files(dataset_dir / s, require_seg=True) for s in subjects}
    for subject in subjects:
        shape = open_subject(files[subject])[MODALITIES[0]].shape
        try:
            cfg.check_volume_shape(shape)
        except ValueError as error:
            raise TsgmInputError(files[subject][MODALITIES[0]], str(error)) from error
    strata = subject_strata(files)
    if split_file is None and _shipped_manifest_applies(BRATS2020_SPLIT, subjects, seed, val_fraction, test_fraction):
        split_file = BRATS2020_SPLIT
    if split_file is not None:
        split, split_source = load_split_file(split_file, subjects), str(Path(split_file).resolve())
    else:
        try:
            split = split_subjects(subjects, seed, val_fraction, test_fraction, strata)
        except ValueError as error:
            raise TsgmInputError(dataset_dir, str(error)) from error
        split_source = f"seeded (seed={seed}), stratified by healthy/tumour subject"
    if verbose:
        print(f"prepare: {len(subjects)} subjects in {dataset_dir}, split {split_source}", flush=True)

    datalist: dict[str, list[dict[str, Any]]] = {DATALIST_KEYS[s]: [] for s in SPLITS}
    volumes: dict[str, list[dict[str, str]]] = {DATALIST_KEYS[s]: [] for s in SPLITS}
    counts = {
        s: {
            "subjects": len(split[s]),
            "healthy_subjects": sum(strata[subject] == "healthy" for subject in split[s]),
            "healthy_slices": 0,
            "tumour_slices": 0,
            "discarded_blank": 0,
        }
        for s in SPLITS
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in SPLITS:
            key = DATALIST_KEYS[name]
            for subject in split[name]:
                slices, kept, tumour = _slice_records(subject, files[subject], cfg, min_brain_fraction)
                folder = tmp / "slices" / subject
                folder.mkdir(parents=True)
                for z, is_tumour in zip(kept, tumour):
                    i = z - cfg.z_min
                    label = f"slices/{subject}/{SEG}_z{z:03d}.npy"
                    np.save(tmp / label, slices[SEG][i])
                    for modality in MODALITIES:
                        image = f"slices/{subject}/{modality}_z{z:03d}.npy"
                        np.save(tmp / image, slices[modality][i])
                        datalist[key].append(
                            {"image": image, "label": label, "subject": subject, "modality": modality, "z": z, "tumour": is_tumour}
                        )
                counts[name]["tumour_slices"] += sum(tumour)
                counts[name]["healthy_slices"] += len(tumour) - sum(tumour)
                counts[name]["discarded_blank"] += len(cfg.z_range) - len(kept)
                volumes[key].append({"subject": subject, **{k: str(p) for k, p in files[subject].items()}})
                if verbose:
                    print(f"  {name:5s} {subject}: {len(kept)} slices, {sum(tumour)} tumour  [{time.perf_counter() - start:.1f} s]", flush=True)
        config = {
            **cfg.to_dict(),
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "split_source": split_source,
            "min_brain_fraction": min_brain_fraction,
            "dataset_dir": str(dataset_dir),
            "counts": counts,
        }
        for filename, obj in [
            ("prepare_config.json", config),
            ("split.json", split),
            ("datalist.json", datalist),
            ("volumes.json", volumes),
        ]:
            (tmp / filename).write_text(json.dumps(obj, indent=1) + "\n")
    if verbose:
        print(format_counts(counts))
        print(f"prepared {out} in {time.perf_counter() - start:.1f} s", flush=True)
    return counts


def _shipped_manifest_applies(path: Path, subjects: list[str], seed: int, val_fraction: float, test_fraction: float) -> bool:
    """A shipped manifest is used for exactly its subjects and split settings (it is that seeded split, recorded)."""
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    listed = sorted(s for name in SPLITS for s in record["split"][name])
    settings = (record["seed"], record["val_fraction"], record["test_fraction"])
    return listed == sorted(subjects) and settings == (seed, val_fraction, test_fraction)


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """Per-split table: subjects, healthy and tumour slices (per modality), discarded blank slices."""
    lines = [f"{'split':6s} {'subjects':>8s} {'(healthy)':>9s} {'healthy':>8s} {'tumour':>8s} {'blank':>6s}   (slices per modality)"]
    for name, c in counts.items():
        lines.append(
            f"{name:6s} {c['subjects']:8d} {c.get('healthy_subjects', 0):9d} {c['healthy_slices']:8d} {c['tumour_slices']:8d} "
            f"{c['discarded_blank']:6d}"
        )
    return "\n".join(lines)
