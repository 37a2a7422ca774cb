"""The ``tsgm`` command: ``tsgm <subcommand> --flag value``. Add a subcommand by adding it to COMMANDS.

Bad input (:class:`TsgmInputError`), refusing to overwrite (``FileExistsError``) and any other ``OSError`` (an
unwritable or full output folder, a path through a file: the message names the path) print one line on stderr and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire

from tsgm_components.errors import TsgmInputError
from tsgm_components.pipeline import WEIGHTS_SEED, run_demo  # stdlib only: the driver runs the bundles as subprocesses


def phantom(
    out: str,
    n_subjects: int = 40,
    seed: int = 0,
    healthy_fraction: float = 0.25,
    twins_out: str | None = None,
    workers: int = 2,
    overwrite: bool = False,
) -> None:
    """Write an MNI152-based phantom dataset in BraTS2020 layout (240x240x155, t1/t1ce/t2/flair/seg) to OUT.

    TWINS_OUT (outside OUT): also write every tumour subject's healthy twin (no lesions, no mass effect, all else
    identical), read only by the evaluation's ceiling rows. WORKERS processes generate subjects in parallel
    (the files are identical for any number).
    """
    from tsgm_components.data.phantom import PhantomConfig, make_phantom

    try:
        cfg = PhantomConfig(n_subjects=int(n_subjects), seed=int(seed), healthy_fraction=float(healthy_fraction))
    except ValueError as error:
        raise TsgmInputError("tsgm phantom", str(error)) from error
    make_phantom(str(out), cfg, overwrite=bool(overwrite), workers=int(workers), twins_out=None if twins_out is None else str(twins_out))


def prepare(
    dataset_dir: str,
    out: str,
    image_size: int = 256,
    z_min: int = 80,
    z_max: int = 128,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_file: str | None = None,
    normalization: str = "brain_median",
    overwrite: bool = False,
) -> None:
    """Split a BraTS-layout dataset by subject (stratified by healthy/tumour subject), normalise, slice axially and
    write MONAI datalists to OUT.

    NORMALIZATION: brain_median (default: the brain median maps to 0.4, robust to lesion burden) or percentile (the
    paper's 1st/99th percentile clip + min-max, which darkens normal tissue once a lesion covers > ~1 % of the brain).
    """
    from tsgm_components.data.preprocessing import PreprocessConfig
    from tsgm_components.data.prepare import prepare as run_prepare

    try:
        cfg = PreprocessConfig(z_min=int(z_min), z_max=int(z_max), image_size=int(image_size), normalization=str(normalization))
    except ValueError as error:
        raise TsgmInputError("tsgm prepare", str(error)) from error
    run_prepare(
        str(dataset_dir),
        str(out),
        cfg,
        seed=int(seed),
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
        split_file=None if split_file is None else str(split_file),
        overwrite=bool(overwrite),
    )


def real_data(source: str, out: str, write_split: bool = False, overwrite: bool = False) -> None:
    """Lay out the project's real dataset: the 20 BraTS 2018 cases with expert labels of the public DeepBrainSeg
    repository (SOURCE: a copy of it, or a BraTS 2018/2019 download, or BraTS 2020 with name_mapping.csv), copied into
    OUT in BraTS layout (t1, t1ce, t2, flair, seg per case; DeepBrainSeg's own predictions are left behind).
    `tsgm prepare` and `tsgm run` on OUT use the committed split data_manifests/brats18_sample_split.json.
    --write_split True: also recompute that split from OUT's labels and write it (maintainers)."""
    from tsgm_components.data import real_brats

    cases = real_brats.lay_out(str(source), str(out), overwrite=bool(overwrite))
    print(f"wrote {len(cases)} cases to {out}")
    if bool(write_split):
        manifest = real_brats.split_manifest(real_brats.band_tumour_voxels(str(out)))
        real_brats.SPLIT_FILE.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"wrote {real_brats.SPLIT_FILE}: {manifest['counts']}")


def run(
    dataset_dir: str,
    work_dir: str,
    scale: str = "auto",
    gpus: str = "auto",
    seed: int = 0,
    split_file: str | None = None,
    read_test: bool = True,
    init_checkpoint: str | None = None,
    lesion_blend_threshold: float | None = None,
    score_model_epochs: int | None = None,
) -> None:
    """The whole pipeline on your dataset (BraTS 2018-2024 or MSD Task01 as downloaded): prepare, train CycleGAN,
    pseudo-pairs, VE-JP and the SDEdit model, detect on validation and test (TSGM and the baselines), calibrate on
    validation, evaluate on test, print the table next to the published BraTS2020 figures. --scale auto (default:
    paper on a machine with a GPU, cpu otherwise), paper (256², the paper's networks; GPUs) or cpu (64², the small
    configs); each training step first prints its expected duration. --gpus auto uses every visible GPU (torchrun when more
    than one). Rerunning the same command continues after the last finished step. --read_test False: stop after
    calibration and score the validation split in-sample (W/evaluation_validation), to compare settings without
    reading test. --init_checkpoint FILE: the TSGM score model starts from FILE's weights (fine-tuning, e.g.
    bundles/vejp_anomaly/models/phantom.pt, the phantom-trained model of the same configs). --lesion_blend_threshold T:
    blend the pseudo-pairs' lesions at T instead of the scale's setting (cpu: 0.1; paper: none, the paper's pairs).
    --score_model_epochs N: train the TSGM score model and its regression CONTROL for N epochs instead of the scale's
    config (cpu: 80 epochs of 50 iterations)."""
    from tsgm_components.pipeline import SCALES, run_dataset

    if str(scale) not in (*SCALES, "auto"):
        raise TsgmInputError("tsgm run", f"--scale must be auto or one of {sorted(SCALES)}, got {scale!r}")
    if str(gpus) != "auto" and not str(gpus).isdigit():
        raise TsgmInputError("tsgm run", f"--gpus must be 'auto' or a number, got {gpus!r}")
    run_dataset(
        str(dataset_dir),
        str(work_dir),
        str(scale),
        str(gpus) if str(gpus) == "auto" else int(gpus),
        int(seed),
        None if split_file is None else str(split_file),
        bool(read_test),
        None if init_checkpoint is None else str(init_checkpoint),
        None if lesion_blend_threshold is None else float(lesion_blend_threshold),
        None if score_model_epochs is None else int(score_model_epochs),
    )


def build_weights(work_dir: str = "runs/weights", overwrite: bool = False) -> None:
    """Train every model of the demo from scratch in WORK_DIR (`tsgm demo --from_scratch True`) and copy the weights,
    the TSGM calibration and a provenance file per model into bundles/*/models as the phantom weight set
    (models/phantom*.pt): the command that made them. --overwrite True replaces shipped weights."""
    from tsgm_components.weights import export_weights

    run_demo(str(work_dir), seed=WEIGHTS_SEED, from_scratch=True)
    for path in export_weights(str(work_dir), "phantom", overwrite=bool(overwrite)):
        print(f"wrote {path}")


def export_weights(work_dir: str, weights: str = "real", models: str | None = None, overwrite: bool = False) -> None:
    """Copy the trained models of a run in WORK_DIR into bundles/*/models with their provenance: --weights real (the
    bundles' defaults, models/model.pt: a `tsgm run` on the real dataset) or phantom (models/phantom*.pt: a
    from-scratch demo, the last step of `tsgm build_weights`). MODELS: comma-separated run folders (default: all of
    the set), to re-ship only retrained stages; the other shipped files stay as they are."""
    from tsgm_components.weights import export_weights as run_export

    names = None if models is None else [m.strip() for m in (models if isinstance(models, str) else ",".join(models)).split(",") if m.strip()]
    try:
        written = run_export(str(work_dir), str(weights), overwrite=bool(overwrite), models=names)
    except ValueError as error:
        raise TsgmInputError("tsgm export_weights", str(error)) from error
    for path in written:
        print(f"wrote {path}")


def compare(
    work_dir: str,
    dataset_dir: str | None = None,
    scale: str = "cpu",
    peers: str | None = None,
    split_file: str | None = None,
    init_checkpoint: str | None = None,
    lesion_blend_threshold: float | None = None,
    score_model_epochs: int | None = None,
) -> None:
    """Train and evaluate the peer methods (bundles/peer_methods) next to TSGM, its controls and baselines on one dataset
    (default: the demo's phantom; DATASET_DIR: a dataset `tsgm prepare` reads), each peer's setting chosen on validation,
    the test split read once; prints the table and the paper's Table II. Resumable: rerun the same command.
    --init_checkpoint, --lesion_blend_threshold, --score_model_epochs: as for `tsgm run` (TSGM's training on
    DATASET_DIR); give the run's own when WORK_DIR is a `tsgm run` work dir."""
    from tsgm_components.comparison import run_comparison

    options = {
        "init_checkpoint": None if init_checkpoint is None else Path(str(init_checkpoint)).resolve(),
        "lesion_blend_threshold": None if lesion_blend_threshold is None else float(lesion_blend_threshold),
        "score_model_epochs": None if score_model_epochs is None else int(score_model_epochs),
    }
    run_comparison(str(work_dir), dataset_dir, scale, peers, split_file, {k: v for k, v in options.items() if v is not None})


COMMANDS = {
    "phantom": phantom,
    "real_data": real_data,
    "prepare": prepare,
    "demo": run_demo,
    "run": run,
    "build_weights": build_weights,
    "export_weights": export_weights,
    "compare": compare,
}


def show_progress() -> None:
    """Show the package's INFO log records (the progress lines of ``tsgm prepare`` and others) on stdout, one plain
    line each: the commands log through :mod:`logging`, this entry point decides where it goes."""
    package = logging.getLogger("tsgm_components")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``tsgm`` console script."""
    show_progress()
    try:
        fire.Fire(COMMANDS, command=argv, name="tsgm")
    except (TsgmInputError, OSError) as error:
        print(f"tsgm: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
