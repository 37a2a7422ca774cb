"""The project's real dataset: 20 BraTS 2018 training cases with expert labels, laid out and split by subject.

Source: the ``sample_volume/brats/`` folder of the public GitHub repository ``koriavinash1/DeepBrainSeg`` (a clone or a
copy of it), or a BraTS 2018/2019 training download (``HGG/`` and ``LGG/`` folders; BraTS 2019 renames
``Brats18_X`` to ``BraTS19_X``) or a BraTS 2020 download with its ``name_mapping.csv``. ``tsgm real_data`` copies each
case's five files (t1, t1ce, t2, flair, seg) into a BraTS-2018-layout folder under the 2018 names, and nothing else:
the DeepBrainSeg folders also hold that tool's own predictions (``DeepBrainSeg_Prediction*.nii.gz``, ``mask.nii.gz``),
which are not labels and are never read. The scans are BraTS data under the BraTS terms: they stay outside the
repository; the split is committed (``data_manifests/brats18_sample_split.json``).

The split (:func:`volume_stratified_split`) is by subject and stratified by whole-tumour volume inside the slice band
``tsgm prepare`` evaluates (axial z 80-128): the cases without tumour in that band (healthy-band volumes) go one to
validation and one to test, the others are cut into volume terciles that each give one case to validation and one to
test.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tsgm_components import REPO_ROOT
from tsgm_components.data.brats import MODALITIES, SEG, folder_subject_files, load_volume
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_dir, check_can_write

SPLIT_FILE = REPO_ROOT / "data_manifests" / "brats18_sample_split.json"
SOURCE = "github.com/koriavinash1/DeepBrainSeg, sample_volume/brats/ (BraTS 2018 training cases)"
#: The 20 cases, by their BraTS 2018 ids.
SUBJECTS: tuple[str, ...] = (
    "Brats18_2013_11_1",
    "Brats18_2013_20_1",
    "Brats18_2013_23_1",
    "Brats18_2013_3_1",
    "Brats18_CBICA_ABM_1",
    "Brats18_CBICA_ALU_1",
    "Brats18_CBICA_AME_1",
    "Brats18_CBICA_AQN_1",
    "Brats18_TCIA01_201_1",
    "Brats18_TCIA01_378_1",
    "Brats18_TCIA01_425_1",
    "Brats18_TCIA01_499_1",
    "Brats18_TCIA02_135_1",
    "Brats18_TCIA02_370_1",
    "Brats18_TCIA02_606_1",
    "Brats18_TCIA03_265_1",
    "Brats18_TCIA10_628_1",
    "Brats18_TCIA10_637_1",
    "Brats18_TCIA10_639_1",
    "Brats18_TCIA13_623_1",
)
PREFIX_2018 = "Brats18_"
#: Other releases' names of a 2018 case: BraTS 2019 keeps the id after a new prefix.
OTHER_PREFIXES = ("BraTS19_",)
#: BraTS 2020's table from its own ids to the 2018 ones (columns as in the download).
NAME_MAPPING = "name_mapping.csv"
MAPPING_COLUMNS = ("BraTS_2018_subject_ID", "BraTS_2020_subject_ID")
SPLIT_SEED = 0
VOLUME_STRATA = 3
#: How deep under the source folder case folders are looked for (DeepBrainSeg: sample_volume/brats/<case>).
SEARCH_DEPTH = 4


def _case_folders(source: Path) -> dict[str, Path]:
    """Folder name -> folder, for every folder up to :data:`SEARCH_DEPTH` levels under ``source`` (hidden ones skipped)."""
    found: dict[str, Path] = {}
    level = [source]
    for _ in range(SEARCH_DEPTH):
        level = [d for parent in level for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        for folder in level:
            found.setdefault(folder.name, folder)
    return found


def _renamed_2020(source: Path) -> dict[str, str]:
    """2018 id -> BraTS 2020 id, from every ``name_mapping.csv`` under ``source`` (none: empty)."""
    mapping: dict[str, str] = {}
    for table in sorted(source.rglob(NAME_MAPPING)):
        with table.open(newline="") as handle:
            for row in csv.DictReader(handle):
                old, new = (row.get(column, "") or "" for column in MAPPING_COLUMNS)
                if old.strip() and new.strip():
                    mapping[old.strip()] = new.strip()
    return mapping


def locate_cases(source: str | Path, subjects: tuple[str, ...] = SUBJECTS) -> dict[str, Path]:
    """2018 id -> the folder holding that case under ``source`` (under its 2018, 2019 or 2020 name).

    Raises :class:`TsgmInputError` naming ``source`` and the missing cases when any is not found.
    """
    source = Path(source)
    if not source.is_dir():
        raise TsgmInputError(source, "source folder does not exist (give a copy of the DeepBrainSeg repository or a BraTS download)")
    folders, renamed = _case_folders(source), _renamed_2020(source)
    located: dict[str, Path] = {}
    for subject in subjects:
        case_id = subject[len(PREFIX_2018) :]
        names = [subject, *(prefix + case_id for prefix in OTHER_PREFIXES), renamed.get(subject, "")]
        folder = next((folders[name] for name in names if name in folders), None)
        if folder is not None:
            located[subject] = folder
    missing = [s for s in subjects if s not in located]
    if missing:
        raise TsgmInputError(
            source,
            f"{len(missing)} of the {len(subjects)} cases not found (e.g. {missing[:3]}): give the DeepBrainSeg repository "
            f"(its sample_volume/brats/ holds them), a BraTS 2018/2019 training download, or BraTS 2020 with {NAME_MAPPING}",
        )
    return located


def lay_out(source: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Copy the 20 cases' t1/t1ce/t2/flair/seg files from ``source`` into ``out/<2018 id>/<2018 id>_<key>.nii.gz``.

    Each case's files are checked as a BraTS subject folder first (all five present); nothing is written on failure
    and ``source`` is only read. Returns 2018 id -> its folder in ``out``.
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise TsgmInputError(out, f"output must be outside the source {source} (inputs are never modified)")
    check_can_write(out, overwrite)
    cases = {subject: folder_subject_files(folder, require_seg=True) for subject, folder in locate_cases(source).items()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for subject, files in cases.items():
            (tmp / subject).mkdir()
            for key in (*MODALITIES, SEG):
                path = Path(files.paths[key])
                suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
                shutil.copyfile(path, tmp / subject / f"{subject}_{key}{suffix}")
    return {subject: out / subject for subject in cases}


def band_tumour_voxels(dataset_dir: str | Path, preprocess: PreprocessConfig = PreprocessConfig()) -> dict[str, int]:
    """2018 id -> whole-tumour voxels (every label > 0) in the axial band ``preprocess.z_min..z_max`` of a laid-out
    dataset, in the orientation of the case's own files (the same for all 20: LPS)."""
    volumes = {}
    for subject in SUBJECTS:
        seg = Path(folder_subject_files(Path(dataset_dir) / subject, require_seg=True).paths[SEG])
        image, _, _ = load_volume(seg, preprocess)
        band = np.asarray(image.dataobj)[:, :, preprocess.z_min : preprocess.z_max + 1]
        volumes[subject] = int(np.count_nonzero(band))
    return volumes


def volume_stratified_split(band_voxels: Mapping[str, int], seed: int = SPLIT_SEED, strata: int = VOLUME_STRATA) -> dict[str, list[str]]:
    """Subject split ``{"train", "val", "test"} -> sorted ids`` stratified by tumour volume in the evaluated band.

    Rule: the healthy-band cases (0 voxels), in sorted order permuted with ``numpy.random.default_rng(seed)``,
    alternate test, validation, test, ...; the others, sorted by (voxels, id), are cut into ``strata`` contiguous
    groups of near-equal size (``numpy.array_split``), and each group permuted the same way gives its first case to
    test, its second to validation and the rest to training.
    """
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    healthy = sorted(s for s, v in band_voxels.items() if v == 0)
    for i, index in enumerate(rng.permutation(len(healthy))):
        split["test" if i % 2 == 0 else "val"].append(healthy[index])
    tumour = sorted((s for s, v in band_voxels.items() if v > 0), key=lambda s: (band_voxels[s], s))
    for group in np.array_split(np.array(tumour, dtype=object), strata):
        picked = [group[i] for i in rng.permutation(len(group))]
        split["test"].append(picked[0])
        split["val"].append(picked[1])
        split["train"] += picked[2:]
    return {name: sorted(ids) for name, ids in split.items()}


def split_manifest(band_voxels: Mapping[str, int]) -> dict[str, Any]:
    """The committed split record: source, rule, every case's band tumour volume and the split."""
    split = volume_stratified_split(band_voxels)
    return {
        "dataset": SOURCE,
        "regenerate": "tsgm real_data --source <copy of DeepBrainSeg> --out <folder> --write_split True",
        "band": "axial z 80-128 (tsgm prepare's default slice band), whole tumour = every label > 0",
        "rule": " ".join(volume_stratified_split.__doc__.split("Rule: ", 1)[1].split()),
        "seed": SPLIT_SEED,
        "band_tumour_voxels": dict(sorted(band_voxels.items())),
        "counts": {name: len(ids) for name, ids in split.items()},
        "healthy_band": {name: sorted(s for s in ids if band_voxels[s] == 0) for name, ids in split.items()},
        "split": split,
    }


def read_split_manifest(path: str | Path = SPLIT_FILE) -> dict[str, Any]:
    """The committed manifest (its ``split`` is what ``tsgm prepare --split_file`` reads)."""
    return json.loads(Path(path).read_text())
