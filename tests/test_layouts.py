"""Data as downloaded: BraTS 2020 (odd segmentation name, CSVs), BraTS 2023/2024 naming and labels, MSD Task01 (4D,
its label map), geometry (reorientation there and back, voxel size and grid checks, singleton axes), the shipped
split on a partial dataset, and output checks before the expensive work."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tsgm_components.data.brats import MODALITIES, SubjectFiles, find_dataset, load_subject, subject_files
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import check_writable

SHAPE = (12, 10, 8)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: fits SHAPE; no training grid recorded (volumes used as stored)
SMALL = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16)


def volumes(seed: int = 0) -> dict[str, np.ndarray]:
    """Four distinct positive modality arrays with a zero border (background) and a lesion label map {0, a, b}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, modality in enumerate(MODALITIES):
        data = (rng.random(SHAPE) * 100 + 10 * (i + 1)).astype(np.float32)
        data[0] = 0
        out[modality] = data
    return out


def save(array: np.ndarray, path: Path, affine: np.ndarray = LPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def labels(values: tuple[int, ...]) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    for k, value in enumerate(values):
        seg[3 + 2 * k : 5 + 2 * k, 3:5, 2:4] = value
    return seg


def test_brats2020_as_downloaded_with_the_odd_segmentation_name_and_csvs(tmp_path):
    data = volumes()
    for name in ("BraTS20_Training_001", "BraTS20_Training_355"):
        for modality, array in data.items():
            save(array, tmp_path / name / f"{name}_{modality}.nii")
    save(labels((1, 2, 4)), tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii")
    save(labels((2, 4)), tmp_path / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii")
    (tmp_path / "name_mapping.csv").write_text("a,b\n")
    (tmp_path / "survival_info.csv").write_text("a,b\n")
    dataset = find_dataset(tmp_path, require_seg=True)
    assert dataset.layout == "brats2020" and dataset.release == "BraTS 2020 naming"
    assert list(dataset.subjects) == ["BraTS20_Training_001", "BraTS20_Training_355"] and dataset.skipped == []
    assert dataset.notes == ["BraTS20_Training_355: segmentation W39_1998.09.19_Segm.nii used (not named BraTS20_Training_355_seg.nii[.gz])"]
    loaded = load_subject(dataset.subjects["BraTS20_Training_355"], SMALL)
    assert set(np.unique(loaded.seg)) == {0, 2, 4}
    # two candidates: nothing is guessed, and the error lists what the folder holds
    save(labels((2,)), tmp_path / "BraTS20_Training_355" / "other_seg.nii")
    with pytest.raises(TsgmInputError, match=r"missing seg file for subject BraTS20_Training_355 .*W39_1998.09.19_Segm.nii"):
        find_dataset(tmp_path, require_seg=True)


@pytest.mark.parametrize(
    "cohort, given, expected",
    [("GLI", (1, 2, 3, 4), {0, 1, 2, 4}), ("MEN", (1, 2, 3), {0, 1, 2, 4}), ("PED", (1, 2, 3, 4), {0, 1, 2, 4})],
)
def test_brats2023_naming_and_labels(tmp_path, cohort, given, expected):
    name = f"BraTS-{cohort}-00001-000"
    data = volumes()
    for modality, key in zip(MODALITIES, ("t1n", "t1c", "t2w", "t2f")):
        save(data[modality], tmp_path / name / f"{name}-{key}.nii.gz")
    seg = labels(given)
    save(seg, tmp_path / name / f"{name}-seg.nii.gz")
    dataset = find_dataset(tmp_path, require_seg=True)
    assert dataset.layout == "brats2023" and cohort in dataset.release
    loaded = load_subject(dataset.subjects[name], SMALL)
    for modality in MODALITIES:
        np.testing.assert_array_equal(loaded.arrays[modality], data[modality])
    np.testing.assert_array_equal(loaded.seg[seg == 3], 4)  # enhancing tumour: 3 -> 4 (BraTS 2020 convention)
    if 4 in given:
        # BraTS 2024 adult glioma: 4 is the resection cavity (not tumour); paediatric: oedema
        np.testing.assert_array_equal(loaded.seg[seg == 4], 0 if cohort == "GLI" else 2)
    assert set(np.unique(loaded.seg)) <= expected
    # the single-subject form finds the same files; the four-file form names the subject from them
    assert subject_files(tmp_path / name, require_seg=False).paths["flair"].name == f"{name}-t2f.nii.gz"
    four = {m: dataset.subjects[name].paths[m] for m in MODALITIES}
    assert SubjectFiles.from_record(four).subject == name


def write_msd(root: Path, n: int, affine: np.ndarray = np.eye(4)) -> dict[str, dict[str, np.ndarray]]:
    """An MSD Task01 folder of ``n`` subjects (4D images FLAIR, T1w, t1gd, T2w; labels 1-3) plus its clutter."""
    written = {}
    for k in range(n):
        data = volumes(k)
        name = f"BRATS_{k + 1:03d}"
        stacked = np.stack([data["flair"], data["t1"], data["t1ce"], data["t2"]], axis=-1)
        save(stacked, root / "imagesTr" / f"{name}.nii.gz", affine)
        save(labels((1, 2, 3)) if k % 3 else np.zeros(SHAPE, np.uint8), root / "labelsTr" / f"{name}.nii.gz", affine)
        (root / "imagesTr" / f"._{name}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        written[name] = data
    save(volumes(99)["t1"], root / "imagesTs" / "BRATS_900.nii.gz", affine)
    (root / "dataset.json").write_text("{}")
    return written


def test_msd_task01_layout_channels_and_labels(tmp_path):
    written = write_msd(tmp_path, 2)
    dataset = find_dataset(tmp_path, require_seg=True)
    assert dataset.layout == "msd_task01" and list(dataset.subjects) == ["BRATS_001", "BRATS_002"]
    files = dataset.subjects["BRATS_002"]
    loaded = load_subject(SubjectFiles.from_record(json.loads(json.dumps(files.record()))), SMALL)  # volumes.json round trip
    for modality in MODALITIES:
        np.testing.assert_array_equal(loaded.arrays[modality], written["BRATS_002"][modality])
    seg = labels((1, 2, 3))
    for source, target in ((1, 2), (2, 1), (3, 4)):  # MSD: 1 oedema, 2 non-enhancing, 3 enhancing
        np.testing.assert_array_equal(loaded.seg[seg == source], target)
    # single-subject form: the 4D image file
    assert subject_files(tmp_path / "imagesTr" / "BRATS_001.nii.gz", require_seg=False).channels["t1ce"] == 2


def test_unknown_layout_lists_the_supported_ones_and_finds_a_nested_dataset(tmp_path):
    write_msd(tmp_path / "Task01_BrainTumour", 1)
    with pytest.raises(TsgmInputError, match=r"did you mean --dataset_dir .*Task01_BrainTumour\?.*supported layouts: brats2020"):
        find_dataset(tmp_path)


def _stored(data: np.ndarray, transform: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` (LPS voxel order, affine ``affine``) stored in another voxel order: nibabel's as_reoriented."""
    image = nib.Nifti1Image(data, affine).as_reoriented(transform)
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize(
    "transform",
    [np.array([[0, -1], [1, -1], [2, 1]]), np.array([[2, 1], [0, 1], [1, -1]])],  # RAS; axial axis stored first
    ids=["RAS", "axial-first"],
)
def test_other_orientations_are_processed_in_the_training_orientation_and_written_back(tmp_path, transform):
    from tsgm_components.detection.detector import Detector, detect_subject
    from tsgm_components.detection.masking import Calibration
    from tsgm_components.detection.ensembling import PAPER_WEIGHTS

    grid = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16, orientation="LPS", voxel_size=(1, 1, 1), volume_shape=SHAPE)
    data = volumes()
    affine = LPS.copy()
    affine[:3, 3] = (11, 9, -3)
    stored = {}
    for name, this in (("LPSX", None), ("OTHR", transform)):
        for modality, array in data.items():
            if this is None:
                save(array, tmp_path / "in" / name / f"{name}_{modality}.nii.gz", affine)
            else:
                stored[modality], moved = _stored(array, this, affine)
                save(stored[modality], tmp_path / "in" / name / f"{name}_{modality}.nii.gz", moved)
    reference = load_subject(subject_files(tmp_path / "in" / "LPSX", False), grid)
    other = load_subject(subject_files(tmp_path / "in" / "OTHR", False), grid)
    assert other.geometry.axcodes != "LPS" and other.geometry.record()["reoriented"]
    for modality in MODALITIES:  # the arrays the model sees are the same, whatever the voxel order on disk
        np.testing.assert_array_equal(other.arrays[modality], reference.arrays[modality])
        np.testing.assert_array_equal(other.geometry.to_input(other.arrays[modality]), stored[modality])

    def darken(slices: torch.Tensor) -> torch.Tensor:
        return slices * 0.5

    outputs = {}
    for name in ("LPSX", "OTHR"):
        settings = Calibration(PAPER_WEIGHTS, "fixed", 0.05)
        folder = detect_subject(subject_files(tmp_path / "in" / name, False), tmp_path / "out", Detector(darken, grid, settings, "half"))
        outputs[name] = {key: nib.load(str(folder / f"{name}_{key}.nii.gz")) for key in ("anomaly", "mask", "anomaly_flair")}
        assert json.loads((folder / f"{name}_detection.json").read_text())["input_geometry"]["reoriented"] == (name == "OTHR")
    source = nib.load(str(tmp_path / "in" / "OTHR" / "OTHR_t1.nii.gz"))
    for key in ("anomaly", "mask", "anomaly_flair"):
        mine, theirs = outputs["OTHR"][key], outputs["LPSX"][key]
        assert mine.shape == source.shape and np.allclose(mine.affine, source.affine)  # the input's exact geometry
        assert np.asarray(theirs.dataobj).any()
        # the same map, in the other voxel order: nibabel's reorientation of the LPS output gives it exactly
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(theirs.as_reoriented(transform).dataobj))


def test_voxel_size_grid_and_singleton_axes(tmp_path):
    grid = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16, orientation="LPS", voxel_size=(1, 1, 1), volume_shape=SHAPE)
    data = volumes()
    fine = np.diag([-0.47, -0.47, 1.0, 1.0])
    for modality, array in data.items():
        save(array, tmp_path / "fine" / f"fine_{modality}.nii.gz", fine)
        save(array[:, :-1], tmp_path / "crop" / f"crop_{modality}.nii.gz")
        save(array[..., None], tmp_path / "single" / f"single_{modality}.nii.gz")  # (H, W, D, 1) as some tools write
    with pytest.raises(
        TsgmInputError, match=r"fine_t1.nii.gz: voxel size 0.47×0.47×1 mm differs from the model's training grid \(1×1×1 mm\): resample"
    ):
        load_subject(subject_files(tmp_path / "fine", False), grid)
    with pytest.raises(TsgmInputError, match=r"crop_t1.nii.gz: grid 12×9×8 .*differs from the model's training grid 12×10×8"):
        load_subject(subject_files(tmp_path / "crop", False), grid)
    loaded = load_subject(subject_files(tmp_path / "single", False), grid)
    np.testing.assert_array_equal(loaded.arrays["t2"], data["t2"])
    # a record written before the grid was recorded reads as the BraTS grid (what every earlier dataset was on)
    legacy = PreprocessConfig.from_dict({"z_min": 80, "normalization": "brain_median"})
    assert (legacy.orientation, legacy.voxel_size, legacy.volume_shape) == ("LPS", (1.0, 1.0, 1.0), (240, 240, 155))


def test_prepare_msd_records_layout_channels_and_training_grid(tmp_path):
    from tsgm_components.data.prepare import prepare

    write_msd(tmp_path / "Task01", 6)
    prepare(tmp_path / "Task01", tmp_path / "prepared", SMALL, val_fraction=0.2, test_fraction=0.2, verbose=False)
    config = json.loads((tmp_path / "prepared" / "prepare_config.json").read_text())
    assert config["layout"] == "msd_task01"
    assert (config["orientation"], config["voxel_size"], config["volume_shape"]) == ("RAS", [1.0, 1.0, 1.0], list(SHAPE))
    items = [i for split in json.loads((tmp_path / "prepared" / "volumes.json").read_text()).values() for i in split]
    assert len(items) == 6 and all(i["labels"] == "msd_task01" and i["channels"] == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3} for i in items)
    split = json.loads((tmp_path / "prepared" / "split.json").read_text())
    assert sum(len(v) for v in split.values()) == 6
    # a subject on another voxel size stops prepare before anything is written, naming its file
    save(np.stack([volumes(7)["t1"]] * 4, -1), tmp_path / "Task01" / "imagesTr" / "BRATS_007.nii.gz", np.diag([2.0, 1, 1, 1]))
    save(labels((1,)), tmp_path / "Task01" / "labelsTr" / "BRATS_007.nii.gz", np.diag([2.0, 1, 1, 1]))
    with pytest.raises(TsgmInputError, match=r"BRATS_007.nii.gz: voxel size 2×1×1 mm differs"):
        prepare(tmp_path / "Task01", tmp_path / "prepared2", SMALL, val_fraction=0.2, test_fraction=0.2, verbose=False)
    assert not (tmp_path / "prepared2").exists()


def test_shipped_split_applies_to_a_dataset_missing_some_subjects_and_warns():
    from tsgm_components.data.manifests import BRATS2020_SUBJECTS
    from tsgm_components.data.prepare import BRATS2020_SPLIT, shipped_split

    full = json.loads(BRATS2020_SPLIT.read_text())["split"]
    assert shipped_split(BRATS2020_SPLIT, BRATS2020_SUBJECTS, 0, 0.1, 0.1) == (full, None)
    dropped = [s for s in BRATS2020_SUBJECTS if s not in full["test"][:1]]
    split, warning = shipped_split(BRATS2020_SPLIT, dropped, 0, 0.1, 0.1)
    assert split["test"] == full["test"][1:] and split["train"] == full["train"]  # nobody else moves
    assert "1 subjects of the shipped split brats2020_split.json are not in the dataset (0 train, 0 val, 1 test" in warning
    split, warning = shipped_split(BRATS2020_SPLIT, BRATS2020_SUBJECTS + ["Mine_001"], 0, 0.1, 0.1)
    assert split is None and "not applied: the dataset holds 369 of its 369 subjects and 1 others" in warning
    split, warning = shipped_split(BRATS2020_SPLIT, BRATS2020_SUBJECTS[:40], 0, 0.1, 0.1)
    assert split is None and "holds 40 of its 369" in warning
    split, warning = shipped_split(BRATS2020_SPLIT, BRATS2020_SUBJECTS, 1, 0.1, 0.1)
    assert split is None and "other split settings" in warning


def test_outputs_are_checked_for_writability_and_free_space_before_the_work(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "subject", 1) == tmp_path / "a" / "b" / "subject"
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # the probe leaves nothing
    with pytest.raises(OSError, match=r"MB free at .*the outputs need about") as info:
        check_writable(tmp_path / "out", 10**18)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        check_writable(tmp_path / "file" / "out")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write the output here"):
            check_writable(locked / "out")


# ---------------------------------------------------------------- the phantom in every release's layout


def _as_release(phantom_dir: Path, root: Path, layout: str) -> Path:
    """The phantom rewritten as a release is downloaded: BraTS 2023 naming and labels (4 -> 3), or MSD Task01
    (4D FLAIR/T1w/t1gd/T2w in RAS voxel order, labels 1 oedema / 2 non-enhancing / 3 enhancing)."""
    for files in find_dataset(phantom_dir).subjects.values():
        image = {k: nib.load(str(p)) for k, p in files.paths.items()}
        data = {k: np.asarray(i.dataobj) for k, i in image.items()}
        affine = image["t1"].affine
        if layout == "brats2023":
            name = f"BraTS-GLI-{files.subject[-3:]}00-000"
            for key, release_key in zip((*MODALITIES, "seg"), ("t1n", "t1c", "t2w", "t2f", "seg")):
                array = np.where(data[key] == 4, 3, data[key]).astype(data[key].dtype) if key == "seg" else data[key]
                save(array, root / name / f"{name}-{release_key}.nii", affine)
        else:
            ras = np.array([[0, -1], [1, -1], [2, 1]])
            stacked = np.stack([data[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1)
            moved = nib.Nifti1Image(stacked, affine).as_reoriented(ras)
            save(np.asarray(moved.dataobj), root / "imagesTr" / f"{files.subject}.nii", moved.affine)
            lookup = np.array([0, 2, 1, 0, 3], np.uint8)  # BraTS 2020 label -> MSD label
            label = nib.Nifti1Image(lookup[data["seg"].astype(np.int64)], affine).as_reoriented(ras)
            save(np.asarray(label.dataobj), root / "labelsTr" / f"{files.subject}.nii", label.affine)
    return root


@pytest.mark.parametrize("layout", ["brats2023", "msd_task01"])
def test_the_phantom_in_each_release_layout_prepares_to_the_same_slices(phantom_dir, prepared_dir, tmp_path, layout):
    from conftest import PREPARE_CONFIG
    from tsgm_components.data.prepare import prepare

    dataset = _as_release(phantom_dir, tmp_path / layout, layout)
    split = json.loads((prepared_dir / "split.json").read_text())
    rename = {s: f"BraTS-GLI-{s[-3:]}00-000" for s in find_dataset(phantom_dir).subjects} if layout == "brats2023" else {}
    (tmp_path / "split.json").write_text(json.dumps({k: [rename.get(s, s) for s in v] for k, v in split.items()}))
    # the phantom's training grid (LPS): MSD's RAS volumes are reoriented to it
    cfg = dataclasses.replace(PREPARE_CONFIG, orientation="LPS")
    prepare(dataset, tmp_path / "prepared", cfg, split_file=tmp_path / "split.json", verbose=False)
    config = json.loads((tmp_path / "prepared" / "prepare_config.json").read_text())
    assert config["layout"] == layout and config["volume_shape"] == [240, 240, 155]
    original = json.loads((prepared_dir / "datalist.json").read_text())
    mine = json.loads((tmp_path / "prepared" / "datalist.json").read_text())
    assert [(rename.get(i["subject"], i["subject"]), i["z"], i["modality"], i["tumour"]) for i in original["test"]] == [
        (i["subject"], i["z"], i["modality"], i["tumour"]) for i in mine["test"]
    ]
    for before, after in zip(original["test"], mine["test"]):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.load(prepared_dir / before[key]), np.load(tmp_path / "prepared" / after[key]))


def test_monai_label_transforms_reorient_to_the_training_grid_and_write_back(tmp_path):
    """The MONAI Label path (LoadImaged -> MultiModalSlicesd -> inferer -> AnomalyFromHealthyd) on one 4-channel
    volume stored in two voxel orders: the model sees the same slices, the label comes back in each input's order."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from tsgm_components.detection.masking import Calibration
    from tsgm_components.monai_label import AnomalyFromHealthyd, MultiModalSlicesd
    from tsgm_components.detection.ensembling import PAPER_WEIGHTS

    grid = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16, orientation="LPS", voxel_size=(1, 1, 1), volume_shape=SHAPE)
    data = volumes()
    stacked = nib.Nifti1Image(np.stack([data[m] for m in MODALITIES], -1), LPS)
    paths = {"LPS": save(np.asarray(stacked.dataobj), tmp_path / "lps.nii.gz")}
    ras = stacked.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    paths["RAS"] = save(np.asarray(ras.dataobj), tmp_path / "ras.nii.gz", ras.affine)
    load = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), MultiModalSlicesd("image", grid)])
    settings = Calibration(PAPER_WEIGHTS, "fixed", 0.05)
    seen, labels = {}, {}
    for name, path in paths.items():
        item = load({"image": str(path)})
        seen[name] = np.asarray(item["image"])
        item["pred"] = item["image"] * 0.5  # a "healthy" reconstruction: half the input
        labels[name] = AnomalyFromHealthyd("pred", "image", grid, settings)(item)["pred"]
    np.testing.assert_array_equal(seen["RAS"], seen["LPS"])  # the network input does not depend on the voxel order
    # nor on the channel order of the file (MSD Task01 stores FLAIR first): slices come out in MODALITIES order
    msd_order = ("flair", "t1", "t1ce", "t2")
    msd = save(np.stack([data[m] for m in msd_order], -1), tmp_path / "msd.nii.gz", LPS)
    load_msd = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), MultiModalSlicesd("image", grid, msd_order)])
    np.testing.assert_array_equal(np.asarray(load_msd({"image": str(msd)})["image"]), seen["LPS"])
    for name, path in paths.items():
        source = nib.load(str(path))
        assert labels[name].shape == (1, *source.shape[:3]) and np.allclose(labels[name].affine.numpy(), source.affine)
    assert labels["LPS"].any()
    expected = nib.Nifti1Image(np.asarray(labels["LPS"][0]), LPS).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    np.testing.assert_array_equal(np.asarray(labels["RAS"][0]), np.asarray(expected.dataobj))


def _subject(root: Path, name: str = "BraTS20_Training_001") -> Path:
    for modality, array in volumes().items():
        save(array, root / name / f"{name}_{modality}.nii.gz")
    return root / name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a - a[a > 0].mean(), r"voxels have negative intensities \(z-scored or otherwise normalised\?\): give the scan with its raw"),
        (lambda a: a + 100.0, r"no zero background \(100\.0% of the voxels are non-zero\): tsgm needs skull-stripped scans"),
    ],
)
def test_z_scored_or_offset_scans_get_a_one_line_error_naming_the_file(tmp_path, damage, message):
    """Real inputs the brain mask and the normalisation cannot serve: a z-scored FLAIR (negative intensities inside the
    brain) and one with a constant background offset are refused before any work, naming the file and what to do."""
    folder = _subject(tmp_path)
    flair = folder / "BraTS20_Training_001_flair.nii.gz"
    data = np.asarray(nib.load(str(flair)).dataobj, dtype=np.float32)
    save(np.where(data != 0, damage(data), 0.0 if "negative" in message else damage(data)).astype(np.float32), flair)
    with pytest.raises(TsgmInputError, match=message) as error:
        load_subject(subject_files(folder, require_seg=False), SMALL)
    assert str(error.value).startswith(str(flair))


def test_an_empty_file_is_reported_as_empty(tmp_path):
    folder = _subject(tmp_path)
    (folder / "BraTS20_Training_001_t2.nii.gz").write_bytes(b"")
    with pytest.raises(TsgmInputError, match=r"_t2\.nii\.gz: file is empty \(0 bytes\)"):
        load_subject(subject_files(folder, require_seg=False), SMALL)
