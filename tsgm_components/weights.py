"""The bundles' shipped weights: two sets, each copied from a run that trained every model into ``bundles/*/models``.

- ``real`` (the bundles' defaults, ``models/model.pt``): trained by ``tsgm run`` on the project's real dataset (20
  BraTS 2018 cases, ``tsgm real_data``, the committed split's training subjects; calibration from its validation split).
- ``phantom`` (``models/phantom*.pt``): trained by ``tsgm build_weights`` on the phantom dataset of ``tsgm demo``; for
  the demo, the tests and MONAI Label trials, not for real scans.

Each shipped file holds only what inference needs (EMA weights of a score model, or CycleGAN's two generators) and its
``model_spec``; next to it, ``<stem>_provenance.json`` records what it was trained on (``data_kind``, checked against
every scan at inference), the command that made it, the commit, the data, the training iterations and wall time, the
machine and the file's SHA-256 (checked at load).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from tsgm_components import REPO_ROOT, git_commit
from tsgm_components.checkpoints import PROVENANCE_SUFFIX, SPEC_KEY, latest_checkpoint, read_checkpoint
from tsgm_components.data.prepare import read_prepare_record
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_path, save_json
from tsgm_components.pipeline import PHANTOM_STEP, PREPARE_STEP, STEPS_RECORD, TRAINING_STEPS, WEIGHT_SETS

BUNDLES = REPO_ROOT / "bundles"
#: entries kept from a run folder's model.pt: CycleGAN's generators (not its discriminators), else the EMA model
KEPT_ENTRIES = {"cyclegan": ("G_AB", "G_BA")}
TRAINED_ON = {
    "real": "20 real BraTS 2018 training cases with expert labels (github.com/koriavinash1/DeepBrainSeg, "
    "sample_volume/brats; `tsgm real_data`), the training subjects of data_manifests/brats18_sample_split.json; "
    "healthy slices = the tumour-free slices of these patients",
    "phantom": "the training split of the phantom of seed 0 (nilearn's MNI152 brain; `tsgm build_weights`): for the demo "
    "(which reports on the phantom of seed 1), tests and MONAI Label trials, not for real scans",
}
BUILD_COMMANDS = {
    "real": "tsgm real_data --source <DeepBrainSeg copy> --out DATA && tsgm run DATA runs/real --scale cpu "
    "--init_checkpoint bundles/vejp_anomaly/models/phantom.pt --lesion_blend_threshold 0.2 --score_model_epochs 32 "
    "&& tsgm export_weights --work_dir runs/real --weights real",
    "phantom": "tsgm build_weights --work_dir runs/weights",
}
#: the TSGM calibration (weights + threshold chosen on the validation split alone: the calibrating step)
CALIBRATION_SOURCE = "calibration/tsgm/calibration.json"
MAX_BYTES = 10 * 2**20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _iterations(run_dir: Path) -> int | None:
    """Training iterations of a finished run: the trainer state of its newest training checkpoint."""
    for folder in (run_dir / "checkpoints", run_dir):
        latest = latest_checkpoint(folder)
        if latest is not None:
            trainer = read_checkpoint(latest).get("trainer")
            return int(trainer["iteration"]) if trainer else None
    return None


def calibration_target(vejp_target: str) -> str:
    """The TSGM calibration shipped beside a VE-JP file: ``<stem>_calibration.json`` (what inference reads beside it)."""
    return vejp_target[: -len(".pt")] + "_calibration.json"


def export_weights(
    work_dir: str | os.PathLike,
    weights: str = "phantom",
    overwrite: bool = False,
    bundles: Path = BUNDLES,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Copy the models of a run in WORK_DIR (``tsgm demo --from_scratch True`` for ``weights="phantom"``, ``tsgm run``
    on the real dataset for ``"real"``) into ``bundles/*/models`` as that weight set (:data:`WEIGHT_SETS`), each with its
    provenance.

    MODELS: the run folders to export (default: all of the set), e.g. to re-ship one retrained stage; the others'
    shipped files and provenance are left as they are. The TSGM calibration goes with ``vejp``. Refuses
    (TsgmInputError) if a model or the TSGM calibration is missing, a file would exceed 10 MB, or shipped weights exist
    and ``overwrite`` is False. Returns the written paths.
    """
    if weights not in WEIGHT_SETS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_SETS)}, got {weights!r}")
    targets_of = WEIGHT_SETS[weights]
    models = sorted(targets_of) if models is None else list(models)
    unknown = sorted(set(models) - set(targets_of))
    if unknown or not models:
        raise ValueError(f"models must be among {sorted(targets_of)}, got {list(models)}")
    work = Path(work_dir).resolve()
    steps_file = work / STEPS_RECORD
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
    data = read_prepare_record(work / "prepared")
    machine = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    # the commit a model was trained at (recorded by run_steps), else the code's now, read before any file is replaced
    commit_now = git_commit()
    sources = {}
    for folder in models:  # every source checked before anything is written
        source, keys = work / folder / "model.pt", KEPT_ENTRIES.get(folder, ("model",))
        state = read_checkpoint(source)
        missing = [k for k in (*keys, SPEC_KEY) if k not in state]
        if missing:
            raise TsgmInputError(source, f"lacks {missing}: not a finished training run")
        sources[targets_of[folder]] = (folder, {k: state[k] for k in (*keys, SPEC_KEY)})
    calibration = work / CALIBRATION_SOURCE if "vejp" in models else None
    if calibration is not None and not calibration.is_file():
        raise TsgmInputError(calibration, "no TSGM calibration: the run's calibrating step has not run")
    calibration_out = calibration_target(targets_of["vejp"]) if calibration is not None else None
    targets = [*sources, *([calibration_out] if calibration_out else [])]
    existing = [str(bundles / t) for t in targets if (bundles / t).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: shipped weights exist (pass --overwrite True to replace them)")
    written = []
    for target, (folder, state) in sources.items():
        out = bundles / target
        with atomic_path(out, overwrite=overwrite) as tmp:
            torch.save(state, tmp)
            if tmp.stat().st_size > MAX_BYTES:
                raise TsgmInputError(work / folder / "model.pt", f"{tmp.stat().st_size / 2**20:.1f} MB exceeds the 10 MB limit of shipped weights")
        step = TRAINING_STEPS[folder]
        provenance: dict[str, Any] = {
            "file": target,
            "sha256": _sha256(out),
            "data_kind": weights,
            "trained_on": TRAINED_ON[weights],
            "command": BUILD_COMMANDS[weights],
            "training_step": steps.get(step, {}).get("command"),
            "wall_time_s": steps.get(step, {}).get("seconds"),
            "note": steps.get(step, {}).get("note"),
            "iterations": _iterations(work / folder),
            "commit": steps.get(step, {}).get("commit") or commit_now,
            "data": {
                "phantom": steps.get(PHANTOM_STEP, {}).get("command"),
                "prepare": steps.get(PREPARE_STEP, {}).get("command"),
                "prepare_config": data,
            },
            "machine": machine,
        }
        save_json(provenance, out.with_name(out.stem + PROVENANCE_SUFFIX))
        written += [out, out.with_name(out.stem + PROVENANCE_SUFFIX)]
    if calibration is not None:
        target = bundles / calibration_out
        with atomic_path(target, overwrite=overwrite) as tmp:
            shutil.copyfile(calibration, tmp)
        written.append(target)
    return written
