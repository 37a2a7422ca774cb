"""Data layer: BraTS loading/validation, preprocessing geometry, phantom, prepare, CLI errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tsgm_components.data.brats import MODALITIES, find_dataset, load_subject, subject_files
from tsgm_components.data.phantom import PhantomConfig, generate_subject
from tsgm_components.data.preprocessing import PreprocessConfig, normalize_volume, slices_to_volume, volume_to_slices
from tsgm_components.errors import TsgmInputError

SMALL_SHAPE = (12, 10, 8)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
#: preprocessing whose slice range and padding fit SMALL_SHAPE (no training grid: volumes used as stored)
SMALL = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16)


def write_subject(root: Path, name: str = "S001", shape=SMALL_SHAPE, seg: bool = True, suffix: str = ".nii.gz") -> Path:
    """A small valid subject in BraTS layout; returns its folder."""
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    for i, modality in enumerate(MODALITIES):
        data = (rng.random(shape) * 100 + i).astype(np.float32)
        data[0] = 0  # background
        nib.save(nib.Nifti1Image(data, AFFINE), str(folder / f"{name}_{modality}{suffix}"))
    if seg:
        labels = np.zeros(shape, np.uint8)
        labels[3:6, 3:6, 2:4] = 2
        labels[4, 4, 3] = 4
        nib.save(nib.Nifti1Image(labels, AFFINE), str(folder / f"{name}_seg{suffix}"))
    return folder


def replace_volume(folder: Path, key: str, data: np.ndarray, affine=AFFINE) -> Path:
    path = folder / f"{folder.name}_{key}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ---------------------------------------------------------------- BraTS layout and validation


def test_find_subjects_and_files(tmp_path):
    write_subject(tmp_path, "S002")
    write_subject(tmp_path, "S001", seg=False, suffix=".nii")
    (tmp_path / "notes").mkdir()
    dataset = find_dataset(tmp_path)
    assert list(dataset.subjects) == ["S001", "S002"] and dataset.layout == "brats2020" and dataset.skipped == ["notes"]
    files = subject_files(tmp_path / "S001", require_seg=False)
    assert sorted(files.paths) == sorted(MODALITIES) and files.paths["t1"].name == "S001_t1.nii"
    assert "seg" in subject_files(tmp_path / "S002", require_seg=True).paths
    with pytest.raises(TsgmInputError, match="S001_seg.nii.gz: missing seg file for subject S001"):
        subject_files(tmp_path / "S001", require_seg=True)


def test_find_subjects_missing_or_empty(tmp_path):
    with pytest.raises(TsgmInputError, match="does not exist"):
        find_dataset(tmp_path / "nope")
    with pytest.raises(TsgmInputError, match="no BraTS subjects found .*supported layouts: brats2020: .*brats2023: .*msd_task01"):
        find_dataset(tmp_path)


def test_load_subject_valid(tmp_path):
    folder = write_subject(tmp_path)
    subject = load_subject(subject_files(folder, require_seg=True), SMALL)
    assert set(subject.arrays) == set(MODALITIES)
    assert all(a.dtype == np.float32 and a.shape == SMALL_SHAPE for a in subject.arrays.values())
    assert subject.seg.dtype == np.uint8 and set(np.unique(subject.seg)) == {0, 2, 4}
    np.testing.assert_array_equal(subject.reference.affine, AFFINE)
    assert not subject.brain_mask[0].any() and subject.brain_mask[1:].all()


def test_integer_volume_loads_as_float_without_overflow(tmp_path):
    folder = write_subject(tmp_path)
    data = np.zeros(SMALL_SHAPE, np.int16)  # a zero background, as every skull-stripped scan has
    data[1:-1, 1:-1, 1:-1] = 30000
    replace_volume(folder, "t2", data)
    subject = load_subject(subject_files(folder, require_seg=True), SMALL)
    assert subject.arrays["t2"].dtype == np.float32
    assert float(subject.arrays["t2"].sum()) == pytest.approx(30000.0 * np.count_nonzero(data))


def _bad_inputs():
    """(name, function that damages a subject folder and returns the damaged file, expected message)."""
    return [
        ("shape", lambda f: replace_volume(f, "t2", np.ones((12, 10, 9), np.float32)), "shape"),
        ("affine", lambda f: replace_volume(f, "flair", np.ones(SMALL_SHAPE, np.float32), np.diag([1.0, -1, 1, 1])), "affine differs"),
        (
            "nan",
            lambda f: replace_volume(
                f, "t1ce", np.where(np.eye(12, 10)[..., None] > 0, np.nan, 1.0).astype(np.float32) * np.ones(SMALL_SHAPE, np.float32)
            ),
            "NaN",
        ),
        ("inf", lambda f: replace_volume(f, "t1", np.full(SMALL_SHAPE, np.inf, np.float32)), "Inf"),
        ("2d", lambda f: replace_volume(f, "t1", np.ones((12, 10), np.float32)), "2D"),
        ("4d", lambda f: replace_volume(f, "t1ce", np.ones(SMALL_SHAPE + (2,), np.float32)), "4D"),
        ("zero", lambda f: replace_volume(f, "t2", np.zeros(SMALL_SHAPE, np.float32)), "all zero"),
        ("labels", lambda f: replace_volume(f, "seg", np.full(SMALL_SHAPE, 3, np.uint8)), "are not brats2020 labels"),
        ("truncated", _truncate, "truncated or corrupt|cannot read"),
        ("unreadable", _garbage, "cannot read as NIfTI"),
    ]


def _truncate(folder: Path) -> Path:
    path = folder / f"{folder.name}_flair.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _garbage(folder: Path) -> Path:
    path = folder / f"{folder.name}_t2.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti file"))
    return path


@pytest.mark.parametrize("name, damage, message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_input_names_the_file(tmp_path, name, damage, message):
    folder = write_subject(tmp_path)
    damaged = damage(folder)
    with pytest.raises(TsgmInputError, match=message) as info:
        load_subject(subject_files(folder, require_seg=True), SMALL)
    assert info.value.path == str(damaged)


def test_missing_modality_names_subject_and_file(tmp_path):
    folder = write_subject(tmp_path)
    (folder / "S001_t1ce.nii.gz").unlink()
    with pytest.raises(TsgmInputError, match="S001_t1ce.nii.gz: missing t1ce file for subject S001"):
        subject_files(folder, require_seg=False)


# ---------------------------------------------------------------- preprocessing


def test_config_dict_round_trip():
    cfg = PreprocessConfig(z_min=2, z_max=5, image_size=64)
    assert PreprocessConfig.from_dict({**cfg.to_dict(), "seed": 3}) == cfg
    with pytest.raises(ValueError):
        PreprocessConfig(z_min=5, z_max=2)


def test_normalize_volume_brain_median():
    rng = np.random.default_rng(1)
    volume = rng.normal(100, 20, (20, 20, 10)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[2:18, 2:18] = True
    volume[2, 2, 0] = 1e6  # outlier: clipped to 1, the scale does not move
    out = normalize_volume(volume, mask, PreprocessConfig(median_target=0.4))
    assert out.dtype == np.float32 and not out[~mask].any()
    assert np.median(out[mask]) == pytest.approx(0.4, abs=1e-6) and out[2, 2, 0] == 1.0
    expected = np.clip(volume[mask] * 0.4 / np.median(volume[mask]), 0, 1)
    np.testing.assert_allclose(out[mask], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="median brain intensity"):
        normalize_volume(-np.abs(volume), mask, PreprocessConfig())
    # written before the option existed: reads as the only scheme of that time
    assert PreprocessConfig.from_dict({"z_min": 80}).normalization == "percentile"
    with pytest.raises(ValueError, match="normalization must be one of"):
        PreprocessConfig(normalization="zscore")


@pytest.mark.parametrize("normalization", ["brain_median", "percentile"])
def test_normal_tissue_does_not_move_with_lesion_burden(normalization):
    """Lesions of 0-5 % of the brain painted into a healthy phantom FLAIR: the default keeps the normal-tissue
    mean within 0.02; the paper's percentile scheme (kept as an option) does not (the documented confound)."""
    subject = generate_subject(1, PhantomConfig(n_subjects=2), with_lesions=False)
    flair = subject.volumes["flair"].astype(np.float32)
    brain = flair > 0
    coords = np.argwhere(brain)
    centre = coords.mean(axis=0)
    order = np.argsort(((coords - centre) ** 2).sum(axis=1))  # a ball around the brain centre
    cfg = PreprocessConfig(normalization=normalization)
    lesion_value = np.percentile(flair[brain], 99.5) * 1.3  # oedema: brighter than any normal tissue
    means = []
    for fraction in (0.0, 0.005, 0.01, 0.02, 0.05):
        painted = flair.copy()
        ball = coords[order[: int(fraction * len(coords))]]
        painted[tuple(ball.T)] = lesion_value
        normal = brain.copy()
        normal[tuple(ball.T)] = False
        means.append(float(normalize_volume(painted, brain, cfg)[normal].mean()))
    shift = max(abs(m - means[0]) for m in means)
    if normalization == "brain_median":
        assert shift <= 0.02, means
    else:
        assert shift > 0.1, means


def test_normalize_volume_percentiles_and_background():
    rng = np.random.default_rng(1)
    volume = rng.normal(100, 20, (20, 20, 10)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[2:18, 2:18] = True
    volume[mask.nonzero()[0][0], mask.nonzero()[1][0], 0] = 1e6  # outlier, clipped away
    out = normalize_volume(volume, mask, PreprocessConfig(normalization="percentile"))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert not out[~mask].any()
    low, high = np.percentile(volume[mask], [1, 99])
    expected = (np.clip(volume[mask], low, high) - low) / (high - low)
    np.testing.assert_allclose(out[mask], expected, atol=1e-6)
    assert (out[mask] == 1.0).mean() == pytest.approx(0.01, abs=0.005)


def test_slices_round_trip_exact_at_full_size():
    cfg = PreprocessConfig(z_min=3, z_max=9, image_size=256, pad_to=256)
    rng = np.random.default_rng(2)
    volume = rng.random((240, 240, 12)).astype(np.float32)
    slices = volume_to_slices(volume, cfg)
    assert slices.shape == (7, 256, 256) and slices.dtype == np.float32
    np.testing.assert_array_equal(slices[0, 8:248, 8:248], volume[:, :, 3])
    assert not slices[:, :8].any() and not slices[:, :, 248:].any()
    back = slices_to_volume(slices, volume.shape, cfg)
    np.testing.assert_array_equal(back[:, :, 3:10], volume[:, :, 3:10])
    assert not back[:, :, :3].any() and not back[:, :, 10:].any()


def test_slices_geometry_at_reduced_size():
    cfg = PreprocessConfig(z_min=1, z_max=2, image_size=64, pad_to=256)
    volume = np.zeros((240, 240, 4), np.float32)
    volume[40:80, 120:200, 1] = 1.0  # a block; 240 -> 256 pads 8 each side, then /4
    seg = (volume > 0).astype(np.uint8)
    slices = volume_to_slices(volume, cfg)
    masks = volume_to_slices(seg, cfg, is_mask=True)
    assert slices.shape == (2, 64, 64) and masks.dtype == np.uint8
    np.testing.assert_array_equal(slices[0, 12:22, 32:52], 1.0)  # (40+8)/4=12 .. (80+8)/4=22
    assert slices[0].sum() == pytest.approx(10 * 20) and not slices[1].any()
    np.testing.assert_array_equal(masks[0], slices[0] > 0.5)
    back = slices_to_volume(slices, volume.shape, cfg)
    assert back.shape == volume.shape and not back[:, :, [0, 2, 3]].any()
    np.testing.assert_allclose(back[44:76, 124:196, 1], 1.0, atol=1e-6)  # interior exact, edges blurred
    back_mask = slices_to_volume(masks, volume.shape, cfg, is_mask=True)
    np.testing.assert_array_equal(back_mask, seg)


def test_volume_shape_checks():
    cfg = PreprocessConfig(z_min=80, z_max=128, image_size=32, pad_to=256)
    with pytest.raises(ValueError, match="z_max=128"):
        volume_to_slices(np.zeros((240, 240, 100), np.float32), cfg)
    with pytest.raises(ValueError, match="exceeds pad_to"):
        volume_to_slices(np.zeros((300, 240, 155), np.float32), cfg)


# ---------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def tumour_subject():
    """Subject 0 of the conftest phantom (a tumour subject), regenerated in memory with its tissue map."""
    from conftest import PHANTOM_CONFIG
    from tsgm_components.data.phantom import generate_subject, healthy_subjects

    assert 0 not in healthy_subjects(PHANTOM_CONFIG)
    return generate_subject(0, PHANTOM_CONFIG, with_lesions=True)


def test_phantom_layout_and_geometry(phantom_dir):
    from conftest import PHANTOM_CONFIG
    from tsgm_components.data.phantom import AFFINE, SHAPE, healthy_subjects, subject_id

    subjects = list(find_dataset(phantom_dir).subjects)
    assert subjects == [subject_id(i) for i in range(PHANTOM_CONFIG.n_subjects)]
    healthy = {subject_id(i) for i in healthy_subjects(PHANTOM_CONFIG)}
    assert len(healthy) == 1
    for name in subjects:
        volumes = load_subject(subject_files(phantom_dir / name, require_seg=True), PreprocessConfig())  # passes all validation
        assert volumes.reference.shape == SHAPE
        np.testing.assert_allclose(volumes.reference.affine, AFFINE)
        assert volumes.reference.get_data_dtype() == np.int16
        assert not volumes.seg[~volumes.brain_mask].any()
        assert volumes.seg.any() == (name not in healthy)
        assert all((a[~volumes.brain_mask] == 0).all() for a in volumes.arrays.values())


def test_phantom_deterministic(phantom_dir, tumour_subject, tmp_path):
    from conftest import PHANTOM_CONFIG
    from tsgm_components.data.phantom import generate_subject, save_nifti_deterministic

    name = "BraTS20_Training_001"
    for modality, volume in {**tumour_subject.volumes, "seg": tumour_subject.seg}.items():
        save_nifti_deterministic(volume, tmp_path / f"{modality}.nii.gz")
        assert (tmp_path / f"{modality}.nii.gz").read_bytes() == (phantom_dir / name / f"{name}_{modality}.nii.gz").read_bytes()
    other = generate_subject(0, dataclasses.replace(PHANTOM_CONFIG, seed=1), with_lesions=True)
    assert not np.array_equal(other.volumes["flair"], tumour_subject.volumes["flair"])
    assert not np.array_equal(other.seg, tumour_subject.seg)


def test_healthy_twin_equals_subject_outside_lesions(phantom_dir, twins_dir):
    """Same anatomy, deformation, confounders, bias, gain and noise: outside the lesion and mass-effect region the
    twin equals the tumour volume voxel for voxel; inside it differs; the twin is the subject rendered without
    lesions; the written twins are those."""
    from conftest import PHANTOM_CONFIG
    from tsgm_components.data.phantom import TWINS_RECORD, generate_subject_and_twin, healthy_subjects, subject_id

    subject, twin = generate_subject_and_twin(0, PHANTOM_CONFIG)
    outside = ~subject.lesion_region
    assert subject.lesion_region.any() and outside.mean() > 0.9
    assert not subject.seg[outside].any() and subject.seg.any()
    for modality in MODALITIES:
        np.testing.assert_array_equal(twin.volumes[modality][outside], subject.volumes[modality][outside])
        inside = subject.seg > 0
        assert np.abs(twin.volumes[modality][inside].astype(float) - subject.volumes[modality][inside]).mean() > 10
    assert not twin.seg.any() and not twin.lesion_region.any()
    alone = generate_subject(0, PHANTOM_CONFIG, with_lesions=False)
    assert all(np.array_equal(alone.volumes[m], twin.volumes[m]) for m in MODALITIES)
    # on disk: one twin per tumour subject, no segmentation, identical to the generated twin
    healthy = {subject_id(i) for i in healthy_subjects(PHANTOM_CONFIG)}
    record = json.loads((twins_dir / TWINS_RECORD).read_text())
    assert record["subjects"] == [s for s in find_dataset(phantom_dir).subjects if s not in healthy]
    assert sorted(p.name for p in twins_dir.iterdir() if p.is_dir()) == record["subjects"]
    name = subject_id(0)
    assert sorted(p.name for p in (twins_dir / name).iterdir()) == sorted(f"{name}_{m}.nii.gz" for m in MODALITIES)
    written = nib.load(str(twins_dir / name / f"{name}_flair.nii.gz"))
    np.testing.assert_array_equal(np.asarray(written.dataobj), twin.volumes["flair"])


def test_split_is_stratified_by_healthy_subjects():
    from tsgm_components.data.prepare import split_subjects

    subjects = [f"S{i:02d}" for i in range(40)]
    strata = {s: "healthy" if i % 4 == 0 else "tumour" for i, s in enumerate(subjects)}
    split = split_subjects(subjects, 0, 0.2, 0.2, strata)
    for name, (n_healthy, n_tumour) in {"train": (6, 18), "val": (2, 6), "test": (2, 6)}.items():
        assert sum(strata[s] == "healthy" for s in split[name]) == n_healthy
        assert sum(strata[s] == "tumour" for s in split[name]) == n_tumour
    assert sorted(s for ids in split.values() for s in ids) == subjects
    # one stratum: exactly the unstratified rule (the shipped BraTS2020 split does not change)
    assert split_subjects(subjects, 3, 0.1, 0.1, {s: "tumour" for s in subjects}) == split_subjects(subjects, 3, 0.1, 0.1)
    # a stratum too small to spread stays in training
    tiny = {s: "healthy" if s == "S00" else "tumour" for s in subjects[:10]}
    assert "S00" in split_subjects(subjects[:10], 0, 0.2, 0.2, tiny)["train"]


def test_phantom_contrasts(tumour_subject):
    seg, tissue = tumour_subject.seg, tumour_subject.tissue
    mean = {m: {} for m in MODALITIES}
    for modality, volume in tumour_subject.volumes.items():
        v = volume.astype(np.float64)
        for name, region in [
            ("csf", (tissue == 1) & (seg == 0)),
            ("gm", (tissue == 2) & (seg == 0)),
            ("wm", (tissue == 3) & (seg == 0)),
            ("necrosis", seg == 1),
            ("oedema", seg == 2),
            ("enhancing", seg == 4),
        ]:
            assert region.sum() > 100, name
            mean[modality][name] = v[region].mean() / v[(tissue == 3) & (seg == 0)].mean()
    t1, t1ce, t2, flair = (mean[m] for m in MODALITIES)
    assert t1["wm"] > t1["gm"] > t1["csf"]
    assert t2["csf"] > t2["gm"] > t2["wm"]
    assert flair["oedema"] > 1.3 and t2["oedema"] > 1.2
    # the labelled oedema is no FLAIR iso-contour: its faint margin overlaps the brightest normal tissue
    flair_volume = tumour_subject.volumes["flair"].astype(np.float64)
    normal = (tissue > 0) & (seg == 0)
    assert np.percentile(flair_volume[seg == 2], 10) < np.percentile(flair_volume[normal], 99)
    assert t1ce["enhancing"] > 1.2 and t1ce["enhancing"] > t1["enhancing"] + 0.3
    assert flair["necrosis"] < 1.2 < flair["oedema"]
    assert flair["csf"] < flair["gm"]


# ---------------------------------------------------------------- prepare


def test_prepared_layout(prepared_dir, phantom_dir):
    from conftest import PREPARE_CONFIG

    split = json.loads((prepared_dir / "split.json").read_text())
    ids = [s for name in ("train", "val", "test") for s in split[name]]
    assert sorted(ids) == list(find_dataset(phantom_dir).subjects) and len(set(ids)) == len(ids)
    assert [len(split[n]) for n in ("train", "val", "test")] == [3, 1, 1]
    config = json.loads((prepared_dir / "prepare_config.json").read_text())
    # the training grid is recorded from the data: the phantom is on the BraTS grid
    grid = dict(orientation="LPS", voxel_size=(1.0, 1.0, 1.0), volume_shape=(240, 240, 155))
    assert PreprocessConfig.from_dict(config) == dataclasses.replace(PREPARE_CONFIG, **grid) and config["seed"] == 0
    assert config["layout"] == "brats2020"
    datalist = json.loads((prepared_dir / "datalist.json").read_text())
    volumes = json.loads((prepared_dir / "volumes.json").read_text())
    n_tumour = n_healthy = 0
    for split_name, key in [("train", "training"), ("val", "validation"), ("test", "test")]:
        items = datalist[key]
        assert {it["subject"] for it in items} == set(split[split_name])
        assert [v["subject"] for v in volumes[key]] == split[split_name]
        for entry in volumes[key]:
            assert (
                set(entry) == {"subject", *MODALITIES, "seg", "labels"}
                and entry["labels"] == "brats2020"
                and all(Path(entry[m]).is_file() for m in MODALITIES)
            )
        for subject in split[split_name]:
            seg = np.asarray(nib.load(str(phantom_dir / subject / f"{subject}_seg.nii.gz")).dataobj)
            mine = [it for it in items if it["subject"] == subject]
            assert len(mine) == 4 * len(PREPARE_CONFIG.z_range)  # no blank slices in z 80-128 of a whole brain
            for it in mine:
                assert it["image"] == f"slices/{subject}/{it['modality']}_z{it['z']:03d}.npy"
                assert it["tumour"] == int(seg[:, :, it["z"]].any())
            n_tumour += sum(it["tumour"] for it in mine) // 4
            n_healthy += sum(1 - it["tumour"] for it in mine) // 4
        assert config["counts"][split_name]["tumour_slices"] == sum(it["tumour"] for it in items) // 4
    assert n_tumour > 20 and n_healthy > 49  # both domains present (the healthy subject alone gives 49)
    files = sorted(p.relative_to(prepared_dir).as_posix() for p in (prepared_dir / "slices").rglob("*.npy"))
    listed = sorted({it[k] for items in datalist.values() for it in items for k in ("image", "label")})
    assert files == listed


def test_prepared_slices_values(prepared_dir, phantom_dir):
    from conftest import PREPARE_CONFIG

    datalist = json.loads((prepared_dir / "datalist.json").read_text())
    items = [it for its in datalist.values() for it in its]
    images = np.stack([np.load(prepared_dir / it["image"]) for it in items])
    labels = np.stack([np.load(prepared_dir / it["label"]) for it in items])
    assert images.shape[1:] == (32, 32) and images.dtype == np.float32
    assert images.min() == 0.0 and 0.5 < images.max() <= 1.0  # brain median at 0.4, lesions brighter
    assert not images[:, [0, -1]].any() and not images[:, :, [0, -1]].any()  # 8 px of zero padding -> 1 px at 32
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    tumour = np.array([it["tumour"] for it in items], bool)
    assert not labels[~tumour].any() and labels[tumour].any(axis=(1, 2)).mean() > 0.8
    # One slice recomputed independently from the NIfTI: same normalisation and geometry.
    item = next(it for it in items if it["tumour"] and it["modality"] == "flair")
    subject = load_subject(subject_files(phantom_dir / item["subject"], require_seg=True), PREPARE_CONFIG)
    expected = volume_to_slices(normalize_volume(subject.arrays["flair"], subject.brain_mask, PREPARE_CONFIG), PREPARE_CONFIG)
    np.testing.assert_allclose(np.load(prepared_dir / item["image"]), expected[item["z"] - PREPARE_CONFIG.z_min], atol=1e-6)


def test_datalist_loads_with_monai(prepared_dir):
    from monai.data import load_decathlon_datalist

    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(str(prepared_dir / "datalist.json"), data_list_key=key, base_dir=str(prepared_dir))
        assert items and all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in items)
        assert {it["modality"] for it in items} == set(MODALITIES)


def test_shipped_manifests_are_reproducible():
    from tsgm_components.data.manifests import MANIFEST_DIR, build_manifests

    for name, content in build_manifests().items():
        shipped = json.loads((MANIFEST_DIR / name).read_text())
        assert shipped == json.loads(json.dumps(content)), f"{name} is stale: python -m tsgm_components.data.manifests"
    brats = json.loads((MANIFEST_DIR / "brats2020_split.json").read_text())
    assert brats["counts"] == {"train": 295, "val": 37, "test": 37}
    ids = [s for n in ("train", "val", "test") for s in brats["split"][n]]
    assert len(set(ids)) == 369 and min(ids) == "BraTS20_Training_001" and max(ids) == "BraTS20_Training_369"
    from tsgm_components.data.prepare import BRATS2020_SPLIT, shipped_split

    assert shipped_split(BRATS2020_SPLIT, sorted(ids), 0, 0.1, 0.1) == (brats["split"], None)
    assert shipped_split(BRATS2020_SPLIT, sorted(ids), 1, 0.1, 0.1)[0] is None  # another seed: seeded split


# ---------------------------------------------------------------- prepare on bad input, CLI

SMALL_PREP = PreprocessConfig(z_min=2, z_max=5, image_size=16, pad_to=16)


def small_dataset(root: Path, n: int = 3) -> Path:
    dataset = root / "dataset"
    for i in range(n):
        write_subject(dataset, f"S{i:03d}")
    return dataset


def test_prepare_small_dataset_split_file_and_inputs_untouched(tmp_path):
    from tsgm_components.data.prepare import prepare

    dataset = small_dataset(tmp_path, n=4)
    before = {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()}
    manifest = tmp_path / "split.json"
    manifest.write_text(json.dumps({"split": {"train": ["S000", "S003"], "val": ["S001"], "test": ["S002"]}}))
    counts = prepare(dataset, tmp_path / "out", SMALL_PREP, split_file=manifest, verbose=False)
    assert json.loads((tmp_path / "out" / "split.json").read_text())["train"] == ["S000", "S003"]
    assert counts["train"] == {"subjects": 2, "healthy_subjects": 0, "healthy_slices": 4, "tumour_slices": 4, "discarded_blank": 0}
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    manifest.write_text(json.dumps({"split": {"train": ["S000"], "val": ["S001"], "test": ["S002"]}}))
    with pytest.raises(TsgmInputError, match="not listed"):
        prepare(dataset, tmp_path / "out2", SMALL_PREP, split_file=manifest, verbose=False)
    with pytest.raises(TsgmInputError, match="outside the input dataset"):
        prepare(dataset, dataset / "prepared", SMALL_PREP, verbose=False)
    with pytest.raises(FileExistsError):
        prepare(dataset, tmp_path / "out", SMALL_PREP, verbose=False)


def test_prepare_discards_blank_slices(tmp_path):
    from tsgm_components.data.prepare import prepare

    dataset = small_dataset(tmp_path, n=3)
    for modality in MODALITIES:  # slice z=3 of S001 has no brain in any modality
        path = dataset / "S001" / f"S001_{modality}.nii.gz"
        data = nib.load(str(path)).get_fdata(dtype=np.float32)
        data[:, :, 3] = 0
        nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    counts = prepare(dataset, tmp_path / "out", SMALL_PREP, verbose=False)
    assert sum(c["discarded_blank"] for c in counts.values()) == 1
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert not [it for its in datalist.values() for it in its if it["subject"] == "S001" and it["z"] == 3]


@pytest.mark.parametrize("name, damage, message", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_prepare_bad_input_writes_nothing(tmp_path, name, damage, message):
    from tsgm_components.data.prepare import prepare

    dataset = small_dataset(tmp_path)
    damaged = damage(dataset / "S001")
    with pytest.raises(TsgmInputError, match=message) as info:
        prepare(dataset, tmp_path / "out", SMALL_PREP, verbose=False)
    assert info.value.path == str(damaged)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_cli_errors_exit_2_without_traceback(tmp_path):
    import subprocess
    import sys

    dataset = small_dataset(tmp_path)
    (dataset / "S002" / "S002_t1ce.nii.gz").unlink()
    out = tmp_path / "out"
    args = ["prepare", "--dataset_dir", str(dataset), "--out", str(out), "--z_min", "2", "--z_max", "5", "--image_size", "16"]
    result = subprocess.run([sys.executable, "-m", "tsgm_components.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "S002_t1ce.nii.gz: missing t1ce file for subject S002" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()

    from tsgm_components.cli import main

    out.mkdir()
    (dataset / "S002" / "S002_t1ce.nii").write_bytes((dataset / "S002" / "S002_t1.nii.gz").read_bytes())
    with pytest.raises(SystemExit) as info:
        main([*args, "--overwrite", "False"])
    assert info.value.code == 2


def test_phantom_flair_threshold_informative_but_not_trivial(prepared_dir):
    """Best single FLAIR threshold (pooled Dice over all prepared slices): tumour is visible, but confounders
    (periventricular caps, WM hyperintensities, CSF edges, faint oedema, subject variation) keep it far from 1."""
    datalist = json.loads((prepared_dir / "datalist.json").read_text())
    items = [it for its in datalist.values() for it in its if it["modality"] == "flair"]
    flair = np.stack([np.load(prepared_dir / it["image"]) for it in items])
    truth = np.stack([np.load(prepared_dir / it["label"]) for it in items]).astype(bool)
    dice = [2 * (truth & (flair > t)).sum() / (truth.sum() + (flair > t).sum()) for t in np.linspace(0.3, 0.99, 70)]
    assert 0.4 < max(dice) < 0.85


def test_prepare_logs_its_steps_and_the_command_shows_them(tmp_path, capsys, caplog):
    """prepare() logs (INFO; nothing at INFO when not verbose); the tsgm command shows the lines on stdout."""
    from tsgm_components.cli import show_progress
    from tsgm_components.data.prepare import prepare

    dataset = small_dataset(tmp_path, n=3)
    with caplog.at_level("INFO", logger="tsgm_components.data.prepare"):
        prepare(dataset, tmp_path / "quiet", SMALL_PREP, verbose=False)
        assert not [r for r in caplog.records if r.levelno >= logging.INFO]
        prepare(dataset, tmp_path / "out", SMALL_PREP)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("prepare: layout brats2020") and messages[-1].startswith(f"prepared {tmp_path / 'out'} in ")
    assert any(m.startswith("prepare: training grid") for m in messages) and any(m.startswith("  train S00") for m in messages)
    package = logging.getLogger("tsgm_components")
    handlers, level, propagate = list(package.handlers), package.level, package.propagate
    try:
        package.handlers.clear()
        show_progress()
        logging.getLogger("tsgm_components.data.prepare").info("prepare: shown")
    finally:
        package.handlers[:], package.level, package.propagate = handlers, level, propagate
    assert capsys.readouterr().out == "prepare: shown\n"
