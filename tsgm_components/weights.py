"""The bundles' shipped weights: what ``tsgm build_weights`` copies from a from-scratch demo run into ``bundles/*/models``.

Each shipped file holds only what inference needs (EMA weights of a score model, or CycleGAN's two generators) and its
``model_spec``; next to it, ``<stem>_provenance.json`` records the command that made it, the commit, the data, the
training iterations and wall time, and the machine. They are trained on the phantom, for the demo, the tests and
MONAI Label trials, not for real scans.
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
from tsgm_components.checkpoints import SPEC_KEY, latest_checkpoint, read_checkpoint
from tsgm_components.data.prepare import read_prepare_record
from tsgm_components.errors import TsgmInputError
from tsgm_components.io import atomic_path, save_json
from tsgm_components.pipeline import PHANTOM_STEP, PREPARE_STEP, STEPS_RECORD, TRAINING_STEPS

BUNDLES = REPO_ROOT / "bundles"
BUILD_COMMAND = "tsgm build_weights --work_dir runs/weights"
#: shipped file -> (run folder in the work dir, entries kept)
SHIPPED: dict[str, tuple[str, tuple[str, ...]]] = {
    "vejp_anomaly/models/model.pt": ("vejp", ("model",)),
    "vejp_anomaly/models/unconditional.pt": ("vejp_unconditional", ("model",)),
    "vejp_anomaly/models/true_pairs.pt": ("vejp_true_pairs", ("model",)),
    "cyclegan_brats/models/model.pt": ("cyclegan", ("G_AB", "G_BA")),
}
#: the TSGM calibration (weights + threshold chosen on the validation split alone: the calibrating step) shipped beside
#: the TSGM weights
CALIBRATION = ("calibration/tsgm/calibration.json", "vejp_anomaly/models/model_calibration.json")
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


def export_weights(
    work_dir: str | os.PathLike, overwrite: bool = False, bundles: Path = BUNDLES, models: Sequence[str] | None = None
) -> list[Path]:
    """Copy the models of a from-scratch demo run in WORK_DIR into ``bundles/*/models`` with their provenance.

    MODELS: the run folders to export (``cyclegan``, ``vejp``, ``vejp_unconditional``, ``vejp_true_pairs``; default
    all), e.g. to re-ship one retrained stage; the others' shipped files and provenance are left as they are. The
    TSGM calibration goes with ``vejp``. Refuses (TsgmInputError) if a model or the TSGM calibration is missing, a
    file would exceed 10 MB, or shipped weights exist and ``overwrite`` is False. Returns the written paths.
    """
    folders = {folder for folder, _ in SHIPPED.values()}
    models = sorted(folders) if models is None else list(models)
    unknown = sorted(set(models) - folders)
    if unknown or not models:
        raise ValueError(f"models must be among {sorted(folders)}, got {list(models)}")
    shipped = {target: entry for target, entry in SHIPPED.items() if entry[0] in models}
    work = Path(work_dir).resolve()
    steps_file = work / STEPS_RECORD
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
    data = read_prepare_record(work / "prepared")
    machine = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    sources = {}
    for target, (folder, keys) in shipped.items():  # every source checked before anything is written
        source = work / folder / "model.pt"
        state = read_checkpoint(source)
        missing = [k for k in (*keys, SPEC_KEY) if k not in state]
        if missing:
            raise TsgmInputError(source, f"lacks {missing}: not a finished training run of the demo")
        sources[target] = (folder, {k: state[k] for k in (*keys, SPEC_KEY)})
    calibration = work / CALIBRATION[0] if "vejp" in models else None
    if calibration is not None and not calibration.is_file():
        raise TsgmInputError(calibration, "no TSGM calibration: the demo's calibrating step has not run")
    targets = [*shipped, *([CALIBRATION[1]] if calibration is not None else [])]
    existing = [str(bundles / t) for t in targets if (bundles / t).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: shipped weights exist (pass --overwrite True to replace them)")
    written = []
    for target, (folder, state) in sources.items():
        out = bundles / target
        with atomic_path(out, overwrite=overwrite) as tmp:
            torch.save(state, tmp)
            if tmp.stat().st_size > MAX_BYTES:
                raise TsgmInputError(work / folder / "model.pt",
                                     f"{tmp.stat().st_size / 2**20:.1f} MB exceeds the 10 MB limit of shipped weights")
        step = TRAINING_STEPS[folder]
        provenance: dict[str, Any] = {
            "file": target,
            "sha256": _sha256(out),
            "trained_on": "the phantom dataset of `tsgm demo` (nilearn's MNI152 brain): for the demo, tests and MONAI "
                          "Label trials, not for real scans",
            "command": BUILD_COMMAND,
            "training_step": steps.get(step, {}).get("command"),
            "wall_time_s": steps.get(step, {}).get("seconds"),
            "note": steps.get(step, {}).get("note"),
            "iterations": _iterations(work / folder),
            "commit": git_commit(),
            "data": {"phantom": steps.get(PHANTOM_STEP, {}).get("command"),
                     "prepare": steps.get(PREPARE_STEP, {}).get("command"), "prepare_config": data},
            "machine": machine,
        }
        save_json(provenance, out.with_name(out.stem + "_provenance.json"))
        written += [out, out.with_name(out.stem + "_provenance.json")]
    if calibration is not None:
        target = bundles / CALIBRATION[1]
        with atomic_path(target, overwrite=overwrite) as tmp:
            shutil.copyfile(calibration, tmp)
        written.append(target)
    return written
