"""Reliability: bad input fails cleanly, outputs are atomic and never silently replaced, inputs are never modified,
runs are reproducible.

The bad-input matrix runs every user-facing entry point on the same damaged inputs, in this process:

* ``prepare``            -- ``tsgm_components.data.prepare.prepare`` (what ``tsgm prepare`` calls),
* ``translate_subject``  -- ``monai.bundle run translate_subject`` of bundles/cyclegan_brats,
* ``translate_volume``   -- ``monai.bundle run translate_volume`` of bundles/cyclegan_brats (single-file cases),
* ``vejp``               -- ``monai.bundle run inference`` of bundles/vejp_anomaly with ``--subject_dir``,

and checks each gives :class:`TsgmInputError` naming the damaged file and the problem, and leaves no output
(not even a hidden temporary). Inputs are tiny BraTS-layout subjects (40×40×20, slices z 8..11 at 32²) and
random-weight checkpoints in the bundles' own formats. Two subprocesses check the command-line exit status.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

import tsgm_components
from tsgm_components.checkpoints import SPEC_KEY, CycleGANSpec, ModelSpec
from tsgm_components.data.brats import MODALITIES
from tsgm_components.data.prepare import prepare
from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError
from tsgm_components.networks.cyclegan import ResnetGenerator
from tsgm_components.networks.score import ScoreUNet

SHAPE = (40, 40, 20)
AFFINE = np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 22], [0, 0, 1.5, -9], [0, 0, 0, 1]])
PREP = PreprocessConfig(z_min=8, z_max=11, image_size=32, pad_to=40)
VEJP_CONFIGS = [str(Path(tsgm_components.bundle_dir("vejp_anomaly")) / "configs" / n) for n in ("inference.yaml", "cpu.yaml")]
CYCLEGAN_CONFIGS = [str(Path(tsgm_components.bundle_dir("cyclegan_brats")) / "configs" / n) for n in ("inference.yaml", "cpu.yaml")]
EVAL_CONFIGS = [str(Path(tsgm_components.bundle_dir("tsgm_evaluation")) / "configs" / n) for n in ("evaluate.yaml", "cpu.yaml")]
SCORE_NET = dict(condition_channels=1, channels=[8, 16], attention_levels=[False, False], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)
SIGMAS = dict(sigma_min=0.01, sigma_max=30.0)
#: VE-JP inference overrides: tiny network, Heun with 2 levels (3 network passes per slice) from a seeded prior draw.
VEJP_SMALL = dict(image_size=32, network_args=SCORE_NET, **SIGMAS, sampler="heun", n_steps=2, sample_batch_size=64)
GENERATOR = dict(ngf=4, n_blocks=1, in_channels=1)  # in_channels 1 (cpu.yaml has 4): translate_volume needs a 1-channel generator


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU they spin-wait (40x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tiny inputs


def write_subject(folder: Path, dtype=np.float32, integer_max: float | None = None) -> Path:
    """A BraTS-layout subject: ellipsoid brain with a bright lesion in T2/FLAIR; whole-tumour ``seg`` label 2.

    With ``integer_max`` every modality is rounded to integers and scaled so its maximum is ``integer_max``,
    then stored as ``dtype`` (so an int16 and a float32 subject can hold exactly the same values).
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(int(folder.name[1:]))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    brain = (grid**2).sum(0) < 0.85
    lesion = ((grid - np.array([0.3, 0.2, 0.3])[:, None, None, None]) ** 2).sum(0) < 0.06
    for i, modality in enumerate(MODALITIES):
        data = brain * (100 + 10 * i + 5 * rng.standard_normal(SHAPE) + 60 * lesion * (modality in ("t2", "flair")))
        if integer_max is not None:
            data = np.round(np.clip(data, 0, None) * (integer_max / data.max()))
        save(data.astype(dtype), folder, modality)
    save((lesion * 2).astype(np.uint8), folder, "seg")
    return folder


def path_of(folder: Path, key: str) -> Path:
    return folder / f"{folder.name}_{key}.nii.gz"


def save(data: np.ndarray, folder: Path, key: str, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path_of(folder, key)))
    return path_of(folder, key)


def voxels(folder: Path, key: str) -> np.ndarray:
    return nib.load(str(path_of(folder, key))).get_fdata(dtype=np.float32)


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hash)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def input_error(error: BaseException) -> TsgmInputError:
    """The TsgmInputError behind ``error`` (MONAI's config evaluation wraps exceptions in RuntimeError)."""
    found: BaseException | None = error
    while found is not None and not isinstance(found, TsgmInputError):
        found = found.__cause__ or found.__context__
    assert found is not None, f"no TsgmInputError behind {error!r}"
    return found


# ---------------------------------------------------------------- damage: (folder) -> (damaged path, problem regex)


def _missing_modality(folder):
    path_of(folder, "flair").unlink()
    return path_of(folder, "flair"), "missing flair file"


def _uncompressed_named_gz(folder):  # a wrong extension: plain .nii content under a .nii.gz name
    path = path_of(folder, "t1ce")
    path.write_bytes(gzip.decompress(path.read_bytes()))
    return path, r"not gzip-compressed.*rename it to .*\.nii\b"


def _other_format(folder):  # a wrong extension: a format tsgm does not read, under the BraTS name
    path_of(folder, "t2").unlink()
    (folder / f"{folder.name}_t2.mha").write_bytes(b"ObjectType = Image\nNDims = 3\n")
    return path_of(folder, "t2"), r"missing t2 file.*found .*_t2\.mha"


def _truncated(folder):
    path = path_of(folder, "flair")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, "truncated or corrupt"


def _garbage(folder):
    path = path_of(folder, "t2")
    path.write_bytes(gzip.compress(b"this is not a nifti file at all" * 20))
    return path, "cannot read as NIfTI"


def _two_d(folder):
    return save(voxels(folder, "t1")[:, :, 8], folder, "t1"), "expected a 3D volume, got a 2D image"


def _four_d(folder):
    return save(np.stack([voxels(folder, "t1ce")] * 2, -1), folder, "t1ce"), "expected a 3D volume, got a 4D image"


def _shape_mismatch(folder):
    return save(np.ones((40, 40, 21), np.float32), folder, "t2"), r"shape \(40, 40, 21\) differs"


def _affine_mismatch(folder):
    return save(voxels(folder, "flair"), folder, "flair", AFFINE + np.diag([0, 0, 0.5, 0])), "affine differs"


def _nan(folder):
    data = voxels(folder, "t1")
    data[20, 20, 10] = np.nan
    return save(data, folder, "t1"), r"non-finite voxels \(1 NaN, 0 Inf\)"


def _inf(folder):
    data = voxels(folder, "flair")
    data[5:7, 20, 10] = -np.inf
    return save(data, folder, "flair"), r"non-finite voxels \(0 NaN, 2 Inf\)"


def _all_zero(folder):
    return save(np.zeros(SHAPE, np.float32), folder, "t1ce"), "all zero"


def _too_few_slices(folder):  # the configured slice range z 8..11 does not fit a 10-slice volume
    for modality in (*MODALITIES, "seg"):
        save(voxels(folder, modality)[:, :, :10], folder, modality)
    # prepare takes the training grid from the first subject (20 slices): this one then differs from it
    return path_of(folder, "t1"), "z_max=11 needs at least 12|grid 40×40×10 .*differs from the model's training grid 40×40×20"


DAMAGES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "missing_modality": _missing_modality,
    "uncompressed_named_gz": _uncompressed_named_gz,
    "other_format": _other_format,
    "truncated_gz": _truncated,
    "corrupt": _garbage,
    "2d": _two_d,
    "4d": _four_d,
    "shape_mismatch": _shape_mismatch,
    "affine_mismatch": _affine_mismatch,
    "nan": _nan,
    "inf": _inf,
    "all_zero": _all_zero,
    "too_few_slices": _too_few_slices,
}
#: cases that concern a single file, also run through translate_volume
SINGLE_FILE = ("uncompressed_named_gz", "truncated_gz", "corrupt", "2d", "4d", "nan", "inf", "all_zero")


# ---------------------------------------------------------------- the entry points under test


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A valid 3-subject dataset, a prepare_config.json, and random-weight VE-JP and CycleGAN checkpoints."""
    root = tmp_path_factory.mktemp("reliability")
    dataset = root / "dataset"
    for name in ("S001", "S002", "S003"):
        write_subject(dataset / name)
    prepare_config = root / "prepared" / "prepare_config.json"
    prepare_config.parent.mkdir()
    prepare_config.write_text(json.dumps(dict(PREP.to_dict(), seed=0)))
    torch.manual_seed(0)
    spec = ModelSpec(PREP, SCORE_NET, SIGMAS)
    vejp = root / "vejp" / "model.pt"  # the layout the training bundle exports (EMA weights + model spec)
    vejp.parent.mkdir()
    torch.save({"model": ScoreUNet(**SCORE_NET).state_dict(), "model_spec": spec.state_dict()}, vejp)
    cyclegan = root / "cyclegan" / "model.pt"
    cyclegan.parent.mkdir()
    save_cyclegan(cyclegan, PREP, GENERATOR)
    return {"root": root, "dataset": dataset, "prepare_config": prepare_config, "vejp": vejp, "cyclegan": cyclegan}


def save_cyclegan(path: Path, preprocess: PreprocessConfig, generator_args: dict) -> Path:
    """A random-weight checkpoint in the layout of the CycleGAN bundle's model.pt (generators + model spec)."""
    generators = {key: ResnetGenerator(**generator_args) for key in ("G_AB", "G_BA")}
    spec = CycleGANSpec(preprocess, generators["G_AB"].config)
    torch.save({**{key: g.state_dict() for key, g in generators.items()}, SPEC_KEY: spec.state_dict()}, path)
    return path


def run_prepare(assets, dataset: Path, out: Path, **kwargs) -> None:
    prepare(dataset, out, PREP, verbose=False, **kwargs)


def run_vejp(assets, out: Path, **inputs) -> None:
    """VE-JP inference; ``out`` is the detection folder (subject folders appear inside it)."""
    overrides = dict(VEJP_SMALL, work_dir=str(assets["root"]), checkpoint=str(assets["vejp"]), detection_dir=str(out))
    run("inference", config_file=VEJP_CONFIGS, logging_file=False, **{**overrides, **inputs})


def run_cyclegan(assets, run_id: str, **inputs) -> None:
    overrides = dict(  # the generator stated, as the VE-JP helper states its network: a checkpoint must match it
        image_size=32,
        generator_config=ResnetGenerator(**GENERATOR).config,
        work_dir=str(assets["root"]),
        checkpoint=str(assets["cyclegan"]),
        prepare_config=str(assets["prepare_config"]),
        direction="AB",
    )
    run(run_id, config_file=CYCLEGAN_CONFIGS, logging_file=False, **{**overrides, **inputs})


def entry_point(stage: str, assets: dict, dataset: Path, subject: Path, out: Path, damaged: Path) -> None:
    """Run ``stage`` on the damaged input, writing to ``out``."""
    if stage == "prepare":
        run_prepare(assets, dataset, out)
    elif stage == "translate_subject":
        run_cyclegan(assets, "translate_subject", input_subject=str(subject), output_dir=str(out))
    elif stage == "translate_volume":
        run_cyclegan(assets, "translate_volume", input_image=str(damaged), output_image=str(out / "translated.nii.gz"))
    else:
        run_vejp(assets, out, subject_dir=str(subject))


STAGES = ("prepare", "translate_subject", "translate_volume", "vejp")
MATRIX = [(stage, case) for stage in STAGES for case in DAMAGES if stage != "translate_volume" or case in SINGLE_FILE]


def assert_nothing_written(out: Path) -> None:
    """No output, and no hidden temporary next to it."""
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("stage, case", MATRIX, ids=[f"{s}-{c}" for s, c in MATRIX])
def test_bad_input_is_named_and_nothing_is_written(assets, tmp_path, stage, case):
    dataset = tmp_path / "dataset"
    shutil.copytree(assets["dataset"], dataset)
    subject = dataset / "S002"
    damaged, problem = DAMAGES[case](subject)
    before = digest(dataset)
    out = tmp_path / "out" / "result"
    out.parent.mkdir()
    with pytest.raises(Exception) as excinfo:
        entry_point(stage, assets, dataset, subject, out, damaged)
    error = input_error(excinfo.value)
    assert error.path == str(damaged), str(error)
    assert re.search(problem, error.problem), str(error)
    assert digest(dataset) == before  # inputs untouched
    assert_nothing_written(out)


# ---------------------------------------------------------------- missing paths, bad datalists, explicit paths


def _vejp_files(assets, tmp_path, **replace) -> dict[str, str]:
    subject = assets["dataset"] / "S001"
    return {m: str(replace.get(m, path_of(subject, m))) for m in MODALITIES if replace.get(m, "") is not None}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _absent_datalist_file(assets, tmp_path):
    """volumes.json whose second subject names a FLAIR file that does not exist."""
    items = [{"subject": s, **{m: str(path_of(assets["dataset"] / s, m)) for m in MODALITIES}} for s in ("S001", "S003")]
    items[1]["flair"] = str(tmp_path / "gone" / "S003_flair.nii.gz")
    (tmp_path / "volumes.json").write_text(json.dumps({"test": items}))
    return dict(datalist=str(tmp_path / "volumes.json"), split="test"), items[1]["flair"], "file not found"


def _datalist_subject_not_in_split(assets, tmp_path):
    """subjects names a subject the datalist's split lacks."""
    items = [{"subject": "S001", **{m: str(path_of(assets["dataset"] / "S001", m)) for m in MODALITIES}}]
    (tmp_path / "volumes.json").write_text(json.dumps({"test": items}))
    return (
        dict(datalist=str(tmp_path / "volumes.json"), split="test", subjects=["S009"]),
        str(tmp_path / "volumes.json"),
        r"\['S009'\] are not in the 'test' split",
    )


INPUT_CASES: dict[str, Callable] = {
    # name: (assets, tmp_path) -> (VE-JP inference overrides, path the error must name, problem regex)
    "subject_dir_missing": lambda a, t: (dict(subject_dir=str(t / "nope")), str(t / "nope"), "subject directory does not exist"),
    "subject_dir_is_a_file": lambda a, t: (
        dict(subject_dir=str(path_of(a["dataset"] / "S001", "t1"))),
        str(path_of(a["dataset"] / "S001", "t1")),
        "is a file, not a subject directory",
    ),
    "calibration_file_missing": lambda a, t: (
        dict(subject_dir=str(a["dataset"] / "S001"), calibration_file=str(t / "calibration.json")),
        str(t / "calibration.json"),
        "cannot read calibration JSON",
    ),
    "calibration_file_damaged": lambda a, t: (
        dict(subject_dir=str(a["dataset"] / "S001"), calibration_file=str(_write(t / "calibration.json", '{"weights": {"t1": 1.0}'))),
        str(t / "calibration.json"),
        "cannot read calibration JSON",
    ),
    "explicit_file_missing": lambda a, t: (_vejp_files(a, t, t2=t / "S001_t2.nii.gz"), str(t / "S001_t2.nii.gz"), "file not found"),
    "explicit_wrong_extension": lambda a, t: (
        _vejp_files(a, t, flair=shutil.copy(path_of(a["dataset"] / "S001", "flair"), t / "S001_flair.png")),
        str(t / "S001_flair.png"),
        "cannot read as NIfTI",
    ),
    "explicit_modality_missing": lambda a, t: (
        _vejp_files(a, t, flair=None),
        str(path_of(a["dataset"] / "S001", "t1")),
        r"no flair file given \(--flair\); the calibration weighs flair",
    ),
    "datalist_names_absent_file": _absent_datalist_file,
    "datalist_subject_not_in_split": _datalist_subject_not_in_split,
}


@pytest.mark.parametrize("case", INPUT_CASES)
def test_vejp_bad_paths_and_datalists(assets, tmp_path, case):
    overrides, named, problem = INPUT_CASES[case](assets, tmp_path)
    out = tmp_path / "detections"
    with pytest.raises(Exception) as excinfo:
        run_vejp(assets, out, **overrides)
    error = input_error(excinfo.value)
    assert error.path == named and re.search(problem, error.problem), str(error)
    assert_nothing_written(out)  # a datalist is checked as a whole before its first subject is written


def test_datalist_subjects_detects_only_those(assets, tmp_path):
    """subjects restricts a datalist's split; subject (a single input's output name) with a datalist is refused."""
    items = [{"subject": s, **{m: str(path_of(assets["dataset"] / s, m)) for m in MODALITIES}} for s in ("S001", "S003")]
    (tmp_path / "volumes.json").write_text(json.dumps({"test": items}))
    out = tmp_path / "detections"
    run_vejp(assets, out, datalist=str(tmp_path / "volumes.json"), split="test", subjects=["S003"])
    assert sorted(p.name for p in out.iterdir()) == ["S003"]
    with pytest.raises(Exception) as excinfo:
        run_vejp(assets, tmp_path / "other", datalist=str(tmp_path / "volumes.json"), split="test", subject="S001")
    assert "give subjects ['S001']" in str(excinfo.value.__cause__)
    assert not (tmp_path / "other").exists()


def test_translation_without_an_input_says_which_option_is_missing(assets, tmp_path):
    for run_id, option in (("translate_volume", "--input_image"), ("translate_subject", "--input_subject")):
        with pytest.raises(Exception) as excinfo:
            run_cyclegan(assets, run_id, output_dir=str(tmp_path / "out"), output_image=str(tmp_path / "out.nii.gz"))
        error = input_error(excinfo.value)
        assert error.path == run_id and option in error.problem
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage", ["prepare", "translate_subject", "translate_volume", "pseudo_pairs"])
def test_missing_input_path_is_named(assets, tmp_path, stage):
    missing, out = tmp_path / "no_such_input", tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        if stage == "prepare":
            run_prepare(assets, missing, out)
        elif stage == "translate_subject":
            run_cyclegan(assets, stage, input_subject=str(missing), output_dir=str(out))
        elif stage == "translate_volume":
            run_cyclegan(assets, stage, input_image=str(missing), output_image=str(out / "x.nii.gz"))
        else:
            run_cyclegan(assets, "inference", prepared_dir=str(missing), pseudo_pairs_dir=str(out))
    assert str(missing) in input_error(excinfo.value).path
    assert_nothing_written(out)


# ---------------------------------------------------------------- checkpoints of another model, or damaged


def _truncate_copy(source: Path, tmp_path: Path) -> Path:
    path = tmp_path / "truncated.pt"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def _vejp_other_spec(assets, tmp_path, **changes) -> Path:
    """A VE-JP checkpoint saved for another preprocessing/network (the training bundle's model.pt layout)."""
    network = dict(SCORE_NET, **changes.get("network", {}))
    spec = ModelSpec(PreprocessConfig(**dict(PREP.to_dict(), **changes.get("preprocess", {}))), network, SIGMAS)
    path = tmp_path / "other.pt"
    torch.save({"model": ScoreUNet(**network).state_dict(), "model_spec": spec.state_dict()}, path)
    return path


CHECKPOINT_CASES: dict[str, tuple[str, Callable, str]] = {
    # name: (stage, (assets, tmp_path) -> checkpoint path, problem regex)
    "vejp-other_architecture": (
        "vejp",
        lambda a, t: _vejp_other_spec(a, t, network={"channels": [8, 8]}),
        r"network\.channels: checkpoint \[8, 8\], config \[8, 16\]",
    ),
    "vejp-other_image_size": (
        "vejp",
        lambda a, t: _vejp_other_spec(a, t, preprocess={"image_size": 16}),
        "made for image_size=16 but the config has image_size=32",
    ),
    "vejp-truncated": ("vejp", lambda a, t: _truncate_copy(a["vejp"], t), "cannot read checkpoint"),
    "vejp-cyclegan_checkpoint": ("vejp", lambda a, t: a["cyclegan"], "not a checkpoint of the vejp_anomaly bundle"),
    "vejp-missing": ("vejp", lambda a, t: t / "model.pt", "checkpoint not found"),
    "cyclegan-other_architecture": (
        "cyclegan",
        lambda a, t: save_cyclegan(t / "other.pt", PREP, dict(ngf=8, n_blocks=1)),
        "generator.ngf: checkpoint 8, config 4",
    ),
    "cyclegan-other_image_size": (
        "cyclegan",
        lambda a, t: save_cyclegan(t / "other.pt", replace(PREP, image_size=64), GENERATOR),
        "preprocess.image_size: checkpoint 64, config 32",
    ),
    "cyclegan-other_normalisation": (
        "cyclegan",
        lambda a, t: save_cyclegan(t / "other.pt", replace(PREP, normalization="percentile"), GENERATOR),
        "preprocess.normalization: checkpoint 'percentile', config 'brain_median'",
    ),
    "cyclegan-other_architecture_no_spec": ("cyclegan", lambda a, t: _cyclegan_without_spec(t), "does not fit the configured generator"),
    "cyclegan-truncated": ("cyclegan", lambda a, t: _truncate_copy(a["cyclegan"], t), "cannot read checkpoint"),
    "cyclegan-vejp_checkpoint": ("cyclegan", lambda a, t: a["vejp"], "not a cyclegan_brats checkpoint"),
    "cyclegan-missing": ("cyclegan", lambda a, t: t / "model.pt", "checkpoint not found"),
}


def _cyclegan_without_spec(tmp_path: Path) -> Path:
    """Generators of another width saved without a model spec (older checkpoints): the weights themselves do not fit."""
    path = tmp_path / "other.pt"
    torch.save({key: ResnetGenerator(ngf=8, n_blocks=1).state_dict() for key in ("G_AB", "G_BA")}, path)
    return path


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_for_another_model_or_damaged(assets, tmp_path, case):
    stage, make, problem = CHECKPOINT_CASES[case]
    checkpoint, out = make(assets, tmp_path), tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        if stage == "vejp":
            run_vejp(assets, out, subject_dir=str(assets["dataset"] / "S001"), checkpoint=str(checkpoint))
        else:
            run_cyclegan(assets, "translate_subject", input_subject=str(assets["dataset"] / "S001"), output_dir=str(out), checkpoint=str(checkpoint))
    error = input_error(excinfo.value)
    assert error.path == str(checkpoint) and re.search(problem, error.problem), str(error)
    assert_nothing_written(out)


# ---------------------------------------------------------------- integer volumes: read as float, no wraparound


INTEGER_CASES = [(stage, dtype, limit) for stage in ("prepare", "translate_subject") for dtype, limit in ((np.int16, 32767), (np.uint16, 65535))]
INTEGER_CASES.append(("vejp", np.uint16, 65535))  # same reader as prepare; uint16 above 32767 is the wraparound risk


@pytest.mark.parametrize("stage, dtype, integer_max", INTEGER_CASES, ids=[f"{s}-{d.__name__}" for s, d, _ in INTEGER_CASES])
def test_integer_volumes_near_their_limit_give_the_float_result(assets, tmp_path, stage, dtype, integer_max):
    """The same values stored as int16/uint16 (maximum at the type's limit) and as float32 give identical outputs."""
    outputs = {}
    for variant, variant_dtype in (("int", dtype), ("float", np.float32)):
        dataset = tmp_path / variant / "dataset"
        for name in ("S001", "S002", "S003") if stage == "prepare" else ("S002",):
            write_subject(dataset / name, variant_dtype, integer_max)
        stored = nib.load(str(path_of(dataset / "S002", "flair")))
        assert stored.get_data_dtype() == variant_dtype and np.asarray(stored.dataobj).max() == integer_max
        out = tmp_path / variant / "out"
        if stage == "prepare":
            run_prepare(assets, dataset, out)
        elif stage == "translate_subject":
            run_cyclegan(assets, stage, input_subject=str(dataset / "S002"), output_dir=str(out))
        else:
            run_vejp(assets, out, subject_dir=str(dataset / "S002"))
        outputs[variant] = {
            str(p.relative_to(out)): np.load(p) if p.suffix == ".npy" else nib.load(str(p)).get_fdata(dtype=np.float32)
            for p in sorted(out.rglob("*"))
            if p.suffix == ".npy" or p.name.endswith(".nii.gz")
        }
    assert len(outputs["int"]) >= 4 and outputs["int"].keys() == outputs["float"].keys()
    for name, array in outputs["int"].items():
        np.testing.assert_array_equal(array, outputs["float"][name], err_msg=name)
    assert max(float(a.max()) for a in outputs["int"].values()) > 0.5  # normalised intensities, not wrapped negatives


# ---------------------------------------------------------------- the pipeline's writers on valid input


def run_evaluation(work: Path, **overrides) -> None:
    methods = [{"name": "tsgm", "detection_dir": str(work / "detections" / "tsgm")}]
    run("evaluating", config_file=EVAL_CONFIGS, logging_file=False, work_dir=str(work), methods=methods, **overrides)


@pytest.fixture(scope="module")
def pipeline(assets, tmp_path_factory) -> dict[str, Path | dict]:
    """prepare -> pseudo-pairs -> VE-JP detection (validation, test) -> evaluation on the tiny dataset.

    Records sha256 digests of the dataset before, and of prepared/ after prepare, to check nobody modifies them.
    """
    work = tmp_path_factory.mktemp("pipeline") / "work"
    dataset_before = digest(assets["dataset"])
    run_prepare(assets, assets["dataset"], work / "prepared")
    prepared_before = digest(work / "prepared")
    run_cyclegan(assets, "inference", prepared_dir=str(work / "prepared"), pseudo_pairs_dir=str(work / "pseudo_pairs"))
    volumes = str(work / "prepared" / "volumes.json")
    for split in ("validation", "test"):
        run_vejp(assets, work / "detections" / "tsgm" / split, datalist=volumes, split=split)
    run_vejp(assets, work / "detections" / "seed1" / "test", datalist=volumes, split="test", sample_seed=1)
    run_evaluation(work)
    return {"work": work, "dataset_before": dataset_before, "prepared_before": prepared_before}


def test_pipeline_never_modifies_its_inputs(assets, pipeline):
    work = pipeline["work"]
    assert digest(assets["dataset"]) == pipeline["dataset_before"]
    assert digest(work / "prepared") == pipeline["prepared_before"]
    summary = json.loads((work / "evaluation" / "summary.json").read_text())
    assert summary["tsgm"]["volume"]["dice"]["n"] == 1  # the pipeline really ran to the end
    assert not [p for p in work.rglob(".*")]  # no temporaries left anywhere


def test_pipeline_outputs_are_readable_as_the_umask_says(pipeline):
    """Atomic writes go through mkstemp/mkdtemp (0600 / 0700); the outputs must get the modes a plain write would."""
    mask = os.umask(0)
    os.umask(mask)
    modes = {path: path.stat().st_mode & 0o777 for path in pipeline["work"].rglob("*")}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o777 if p.is_dir() else 0o666) & ~mask}
    assert not wrong


def test_two_runs_writing_one_output_never_replace_each_other(tmp_path):
    """The output is checked at the start; another run may create it before this one finishes: without overwrite the
    first one kept wins, the second fails naming the path, and no temporary is left (files and folders)."""
    from tsgm_components.io import atomic_dir, atomic_path

    target = tmp_path / "record.json"
    with pytest.raises(FileExistsError, match="appeared while this run was writing it"):
        with atomic_path(target) as tmp:
            tmp.write_text("second run")
            target.write_text("first run")  # the other run commits first
    assert target.read_text() == "first run"
    folder = tmp_path / "S001"
    with pytest.raises(FileExistsError, match=f"{folder}: output appeared"):
        with atomic_dir(folder) as tmp:
            (tmp / "mask.nii.gz").write_text("second run")
            folder.mkdir()
            (folder / "mask.nii.gz").write_text("first run")
    assert (folder / "mask.nii.gz").read_text() == "first run"
    with atomic_path(target, overwrite=True) as tmp:  # asked for: replaced
        tmp.write_text("third run")
    assert target.read_text() == "third run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S001", "record.json"]


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, caplog):
    import socket

    from tsgm_components.io import save_json

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host = int(finished.stdout), socket.gethostname()
    stale_file = tmp_path / f".record.json.tsgm-{host}-{dead}-abc.tmp.json"
    stale_dir = tmp_path / f".record.json.tsgm-{host}-{dead}-def.tmp"
    live = tmp_path / f".record.json.tsgm-{host}-{os.getpid()}-ghi.tmp.json"  # a run still writing: kept
    other = tmp_path / f".record.json.tsgm-otherhost-{dead}-jkl.tmp.json"  # another host's: cannot tell, kept
    stale_file.write_text("half")
    stale_dir.mkdir()
    for path in (live, other):
        path.write_text("writing")
    with caplog.at_level("WARNING", logger="tsgm_components.io"):
        save_json({"a": 1}, tmp_path / "record.json")
    assert not stale_file.exists() and not stale_dir.exists() and live.exists() and other.exists()
    assert "left by a killed run" in caplog.text and str(stale_file) in caplog.text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    from tsgm_components.io import atomic_dir, save_json

    previous = os.umask(umask)
    try:
        save_json({"a": 1}, tmp_path / "record.json")
        with atomic_dir(tmp_path / "subject") as folder:
            save_json({"b": 2}, folder / "inner.json")
    finally:
        os.umask(previous)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "subject").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "subject" / "inner.json").stat().st_mode & 0o777 == 0o666 & ~umask


#: writer: (call(assets, work, overwrite), output path, files whose bytes may differ on a rerun (timestamps, timings))
WRITERS: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    "prepare": (lambda a, w, o: run_prepare(a, a["dataset"], w / "prepared", overwrite=o), "prepared", ()),
    "pseudo_pairs": (
        lambda a, w, o: run_cyclegan(a, "inference", prepared_dir=str(w / "prepared"), pseudo_pairs_dir=str(w / "pseudo_pairs"), overwrite=o),
        "pseudo_pairs",
        (),
    ),
    "detection": (  # not the folder evaluated below: its provenance timings would change the evaluation report
        lambda a, w, o: run_vejp(
            a, w / "detections" / "seed1" / "test", datalist=str(w / "prepared" / "volumes.json"), split="test", sample_seed=1, overwrite=o
        ),
        "detections/seed1/test",
        ("_detection.json", "_overlay.png"),
    ),
    "evaluation": (lambda a, w, o: run_evaluation(w, overwrite=o), "evaluation", (".png",)),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_existing_output_is_kept_and_a_rerun_reproduces_it(assets, pipeline, writer):
    """Without overwrite an existing output is refused and left byte-identical; with it, the same inputs and seeds
    write the same bytes again (except provenance timestamps/timings and rendered PNGs)."""
    call, relative, volatile = WRITERS[writer]
    work = pipeline["work"]
    output = work / relative
    before = digest(output)
    with pytest.raises(Exception) as excinfo:
        call(assets, work, False)
    chain, error = [], excinfo.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, FileExistsError) and str(output) in str(e) for e in chain), chain
    assert digest(output) == before
    call(assets, work, True)
    after = digest(output)
    assert after.keys() == before.keys()
    stable = [name for name in before if not name.endswith(volatile)]
    assert len(stable) >= 3 and {n: after[n] for n in stable} == {n: before[n] for n in stable}
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]


def test_vejp_sampler_seed_changes_the_reconstruction(pipeline):
    """Reruns are identical (above) because of the seed, not because sampling ignores it."""
    detections = pipeline["work"] / "detections"
    for folder in (detections / "tsgm" / "test").iterdir():
        name = f"{folder.name}/{folder.name}_healthy_flair.nii.gz"
        seed0, seed1 = (nib.load(str(d / "test" / name)).get_fdata() for d in (detections / "tsgm", detections / "seed1"))
        assert seed0.shape == SHAPE and not np.array_equal(seed0, seed1)


# ---------------------------------------------------------------- outputs never replace or land inside inputs


def _refuse_over_input(stage: str, assets: dict, tmp_path: Path) -> tuple[Path, Path]:
    """Run ``stage`` with overwrite=True and an output that is (or holds) its input; return (input, named output)."""
    dataset = tmp_path / "dataset"
    shutil.copytree(assets["dataset"], dataset)
    subject = dataset / "S001"
    if stage == "prepare":
        run_prepare(assets, dataset, dataset, overwrite=True)
        return dataset, dataset
    if stage == "detection":  # detection_dir/<subject> would be the subject's own folder
        run_vejp(assets, dataset, subject_dir=str(subject), overwrite=True)
        return dataset, subject
    if stage == "translate_subject":
        run_cyclegan(assets, stage, input_subject=str(subject), output_dir=str(subject), overwrite=True)
        return dataset, subject
    if stage == "translate_volume":
        run_cyclegan(assets, stage, input_image=str(path_of(subject, "t1")), output_image=str(path_of(subject, "t1")), overwrite=True)
        return dataset, path_of(subject, "t1")
    prepared = tmp_path / "prepared"
    run_prepare(assets, dataset, prepared)
    if stage == "pseudo_pairs":
        run_cyclegan(assets, "inference", prepared_dir=str(prepared), pseudo_pairs_dir=str(prepared), overwrite=True)
        return prepared, prepared
    run_evaluation(tmp_path, evaluation_dir=str(tmp_path), overwrite=True)  # the work dir holds prepared/
    return prepared, tmp_path


@pytest.mark.parametrize("stage", ["prepare", "detection", "translate_subject", "translate_volume", "pseudo_pairs", "evaluation"])
def test_output_over_an_input_is_refused_even_with_overwrite(assets, tmp_path, stage):
    with pytest.raises(Exception) as excinfo:
        _refuse_over_input(stage, assets, tmp_path)
    error = input_error(excinfo.value)
    assert "input" in error.problem, str(error)
    protected = tmp_path / ("prepared" if stage in ("pseudo_pairs", "evaluation") else "dataset")
    assert protected.is_dir() and len(digest(protected)) >= 15  # still all there


# ---------------------------------------------------------------- interrupted writes


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "overwriting"])
def test_prepare_interrupted_midway_leaves_the_previous_state(assets, tmp_path, monkeypatch, previous):
    """Ctrl-C while slicing the last subject: no output (fresh), or the previous output intact (overwrite)."""
    import tsgm_components.data.prepare as prepare_module

    out = tmp_path / "prepared"
    if previous:
        run_prepare(assets, assets["dataset"], out)
    before = digest(out) if previous else None
    calls = []
    real = prepare_module._slice_records

    def interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_slice_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(assets, assets["dataset"], out, overwrite=previous)
    assert len(calls) == 3
    assert (digest(out) == before) if previous else not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["prepared"] if previous else [])


def test_detection_interrupted_while_writing_leaves_nothing(assets, tmp_path, monkeypatch):
    import tsgm_components.detection.detector as detection

    def interrupted(*args, **kwargs):  # the overlay is written after the NIfTI maps
        raise KeyboardInterrupt

    monkeypatch.setattr(detection, "save_overlay", interrupted)
    out = tmp_path / "detections"
    with pytest.raises(KeyboardInterrupt):
        run_vejp(assets, out, subject_dir=str(assets["dataset"] / "S001"))
    assert_nothing_written(out)


def test_prepare_killed_with_sigkill_leaves_no_output_and_reruns(assets, tmp_path):
    """A SIGKILL (OOM killer, scheduler) mid-run cannot clean up: the output path must still be absent, and a
    rerun must succeed despite the orphaned hidden temporary."""
    import tsgm_components.data.prepare as prepare_module

    out = tmp_path / "prepared"
    pid = os.fork()
    if pid == 0:  # child: die at the first subject, inside the atomic write
        try:
            prepare_module._slice_records = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            run_prepare(assets, assets["dataset"], out)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not out.exists()
    orphans = [p.name for p in tmp_path.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".prepared.") and orphans[0].endswith(".tmp")
    run_prepare(assets, assets["dataset"], out)
    assert (out / "datalist.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # the rerun removed the killed run's temporary


# ---------------------------------------------------------------- command lines: non-zero exit, one-line error


def test_tsgm_prepare_exits_2_with_one_line_error(assets, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(assets["dataset"], dataset)
    damaged, _ = _nan(dataset / "S003")
    out = tmp_path / "out"
    args = ["prepare", "--dataset_dir", str(dataset), "--out", str(out), "--z_min", "6", "--z_max", "13", "--image_size", "32"]
    result = subprocess.run([sys.executable, "-m", "tsgm_components.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tsgm: error: {damaged}: contains non-finite voxels (1 NaN, 0 Inf)"]
    assert not out.exists()


def test_tsgm_unwritable_output_exits_2_naming_the_path(assets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "prepared"
    args = ["prepare", "--dataset_dir", str(assets["dataset"]), "--out", str(out), "--z_min", "6", "--z_max", "13", "--image_size", "32"]
    result = subprocess.run([sys.executable, "-m", "tsgm_components.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsgm: error: ") and str(blocker) in lines[0], lines


def test_bundle_command_ends_with_the_one_line_error_naming_the_file(assets, tmp_path):
    source = tmp_path / "S001_flair.nii.gz"
    source.write_bytes(path_of(assets["dataset"] / "S001", "flair").read_bytes()[:2000])
    output = tmp_path / "out" / "flair_AB.nii.gz"
    overrides = dict(
        image_size=32, **GENERATOR, checkpoint=assets["cyclegan"], prepare_config=assets["prepare_config"], input_image=source, output_image=output
    )
    command = [sys.executable, "-m", "monai.bundle", "run", "translate_volume", "--config_file", repr(CYCLEGAN_CONFIGS)]
    command += [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    # the traceback and MONAI's dump of the config expression come first; the project's one-line message ends the run
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tsgm: error: {source}: cannot read voxel data, file truncated or corrupt"), last
    assert not output.parent.exists()


# ---------------------------------------------------------------- datalists that name absent or damaged files


def _evaluation_absent_seg(work: Path) -> Path:
    volumes = json.loads((work / "prepared" / "volumes.json").read_text())
    volumes["test"][0]["seg"] = str(work / "gone" / "S_seg.nii.gz")
    (work / "prepared" / "volumes.json").write_text(json.dumps(volumes))
    return work / "gone" / "S_seg.nii.gz"


def _evaluation_corrupt_record(work: Path) -> Path:
    path = next((work / "detections" / "tsgm" / "test").glob("*/*_detection.json"))
    path.write_text('{"method": "vejp", "seconds": {"tot')
    return path


def _pseudo_pairs_absent_slice(work: Path) -> Path:
    datalist = json.loads((work / "prepared" / "datalist.json").read_text())
    item = next(i for i in datalist["validation"] if i["tumour"] == 0)
    (work / "prepared" / item["image"]).unlink()
    return work / "prepared" / item["image"]


DATALIST_CASES: dict[str, tuple[Callable, str, str]] = {
    # name: (damage the copied work dir -> named path, run id, problem regex)
    "evaluation-absent_seg": (_evaluation_absent_seg, "evaluating", "file not found"),
    "evaluation-corrupt_detection_record": (_evaluation_corrupt_record, "evaluating", "cannot read the detection record"),
    "pseudo_pairs-absent_slice": (_pseudo_pairs_absent_slice, "pseudo_pairs", "slice file not found"),
}


@pytest.mark.parametrize("case", DATALIST_CASES)
def test_datalist_naming_absent_or_damaged_files(assets, pipeline, tmp_path, case):
    damage, run_id, problem = DATALIST_CASES[case]
    work = tmp_path / "work"
    shutil.copytree(pipeline["work"], work, ignore=shutil.ignore_patterns("evaluation", "pseudo_pairs", "seed1"))
    named = damage(work)
    out = work / ("evaluation" if run_id == "evaluating" else "pseudo_pairs")
    with pytest.raises(Exception) as excinfo:
        if run_id == "evaluating":
            run_evaluation(work)
        else:
            run_cyclegan(assets, "inference", prepared_dir=str(work / "prepared"), pseudo_pairs_dir=str(out))
    error = input_error(excinfo.value)
    assert error.path == str(named) and re.search(problem, error.problem), str(error)
    assert_nothing_written(out)


# ---------------------------------------------------------------- resuming a split, diverged reconstructions


def test_vejp_split_resumes_with_skip_existing(assets, tmp_path):
    """An interrupted split: finished subject folders are complete (atomic) and kept; the rest is done on rerun."""
    items = [{"subject": s, **{m: str(path_of(assets["dataset"] / s, m)) for m in MODALITIES}} for s in ("S001", "S003")]
    (tmp_path / "volumes.json").write_text(json.dumps({"test": items}))
    out = tmp_path / "detections"
    split = dict(datalist=str(tmp_path / "volumes.json"), split="test")
    run_vejp(assets, out, **split)
    shutil.rmtree(out / "S003")  # as if killed before S003 was renamed into place
    finished = digest(out / "S001")
    with pytest.raises(Exception) as excinfo:  # without skip_existing: refused before anything is written
        run_vejp(assets, out, **split)
    assert "S001: output already exists" in str(excinfo.value.__cause__ or excinfo.value) and not (out / "S003").exists()
    run_vejp(assets, out, skip_existing=True, **split)
    assert digest(out / "S001") == finished  # not recomputed (its _detection.json timestamp is unchanged)
    assert (out / "S003" / "S003_anomaly.nii.gz").is_file()


def test_diverged_reconstruction_stops_detection_without_output(assets, tmp_path):
    """Weights that produce NaN (a diverged training run) stop inference with an error naming the input."""
    state = torch.load(assets["vejp"], weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint = tmp_path / "nan.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "detections"
    with pytest.raises(Exception) as excinfo:
        run_vejp(assets, out, subject_dir=str(assets["dataset"] / "S001"), checkpoint=str(checkpoint))
    assert "S001_t1.nii.gz contains non-finite values" in str(excinfo.value.__cause__ or excinfo.value)
    assert_nothing_written(out)


def test_importing_the_package_changes_no_global_state():
    """The one-line error hook is installed by the bundles' entry module (their configs import it), not by the package."""
    code = (
        "import sys; hook = sys.excepthook; import tsgm_components, tsgm_components.detection.detector, tsgm_components.evaluation.harness; "
        "assert sys.excepthook is hook; import tsgm_components.bundle_entry; assert sys.excepthook is not hook"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
