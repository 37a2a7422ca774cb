"""End-to-end demo: phantom → prepare → detection (TSGM, baselines and the ceiling rows) with the shipped weights →
calibration on validation → evaluation on test; ``from_scratch`` trains every model first (CycleGAN → pseudo-pairs →
VE-JP, the SDEdit and true-pairs models).

Each step is the exact command a user would type (``tsgm ...`` or ``python -m monai.bundle run ...``), run as a
subprocess and printed first, so the demo doubles as a worked example. A step whose output already exists is
skipped, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tsgm_components import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"
STEPS_RECORD = "demo_steps.json"  # in the work dir: every step's command and wall time
PHANTOM_STEP, PREPARE_STEP = "phantom dataset (+ healthy twins for the ceiling rows)", "prepare slices"
#: run folder in the work dir -> the from-scratch step that trains it
TRAINING_STEPS = {
    "cyclegan": "train CycleGAN (stage 1)",
    "vejp": "train VE-JP score model (stage 2)",
    "vejp_unconditional": "train unconditional score model (SDEdit baseline)",
    "vejp_true_pairs": "CEILING train VE-JP on true pairs",
}


@dataclass(frozen=True)
class Step:
    """One pipeline command and the file whose existence means it has already run.

    ``output`` None: the step always runs and skips finished work itself (detection over a split with
    ``--skip_existing True``: each subject's folder appears atomically, so a killed split resumes per subject).
    """

    name: str
    command: list[str]
    output: Path | None
    checkpoint_dir: Path | None = None  # training steps: an interrupted run here is resumed (--resume True)

    def resolved_command(self) -> list[str]:
        """The command, with ``--resume True`` when an interrupted training run left checkpoints."""
        # checkpoints.latest_checkpoint's pattern (not imported: this driver runs the bundles without importing torch)
        if self.checkpoint_dir is not None and any(self.checkpoint_dir.glob("checkpoint_*.pt")):
            return self.command + ["--resume", "True"]
        return self.command


def bundle_command(run_id: str, bundle: str, configs: list[str], work_dir: Path, **overrides: object) -> list[str]:
    """``python -m monai.bundle run RUN_ID --config_file [...] --work_dir W --key value ...`` for a bundle here."""
    files = [str(BUNDLES / bundle / "configs" / name) for name in configs]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(files)]
    command += ["--work_dir", str(work_dir)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def demo_steps(
    work_dir: Path,
    n_subjects: int = 40,
    seed: int = 0,
    image_size: int = 64,
    split_fraction: float = 0.2,
    from_scratch: bool = False,
) -> list[Step]:
    """The demo's commands on the embedded phantom dataset.

    Default: detection with the bundles' shipped weights (``bundles/*/models``, trained on the phantom by
    ``tsgm build_weights``). ``from_scratch``: train every model first with the CPU configs (CycleGAN, pseudo-pairs,
    VE-JP, the unconditional SDEdit model, the true-pairs CEILING model) and detect with those.
    ``split_fraction`` of the healthy and of the tumour subjects go to validation, and as many to test
    (stratified split): with the defaults, 6 tumour + 2 healthy subjects in each.
    """
    tsgm = [sys.executable, "-m", "tsgm_components.cli"]
    prepared = work_dir / "prepared"
    splits = ("validation", "test")

    def trained(folder: str) -> dict[str, Path]:
        return {"checkpoint": work_dir / folder / "model.pt"} if from_scratch else {}

    def detect(name: str, overlay: list[str], folder: str) -> list[Step]:
        return [
            Step(f"{name} detection, {split}",
                 bundle_command("inference", "vejp_anomaly", ["inference.yaml", *overlay], work_dir,
                                datalist=prepared / "volumes.json", split=split, skip_existing=True,
                                reconstruct_modalities="all", **trained(folder)),
                 None)
            for split in splits
        ]

    def train(overlay: list[str], folder: str) -> Step:
        return Step(TRAINING_STEPS[folder], bundle_command("training", "vejp_anomaly", ["train.yaml", "cpu.yaml", *overlay], work_dir),
                    work_dir / folder / "model.pt", work_dir / folder / "checkpoints")

    data = [
        Step(PHANTOM_STEP,
             tsgm + ["phantom", "--out", str(work_dir / "phantom"), "--n_subjects", str(n_subjects), "--seed", str(seed),
                     "--twins_out", str(work_dir / "twins")],
             work_dir / "phantom"),
        Step(PREPARE_STEP, tsgm + ["prepare", "--dataset_dir", str(work_dir / "phantom"), "--out", str(prepared),
                                       "--image_size", str(image_size), "--seed", str(seed),
                                       "--val_fraction", str(split_fraction), "--test_fraction", str(split_fraction)],
             prepared),
    ]
    training = [
        Step(TRAINING_STEPS["cyclegan"],
             bundle_command("training", "cyclegan_brats", ["train.yaml", "cpu.yaml"], work_dir),
             work_dir / "cyclegan" / "model.pt", work_dir / "cyclegan"),
        Step("pseudo-pairs G_A→B(healthy)",
             bundle_command("inference", "cyclegan_brats", ["inference.yaml"], work_dir,
                            checkpoint=work_dir / "cyclegan" / "model.pt"),
             work_dir / "pseudo_pairs" / "pseudo_pairs.json"),
        train([], "vejp"),
        train(["train_unconditional.yaml"], "vejp_unconditional"),
        Step("CEILING true pairs (twin slice, real slice)",
             bundle_command("true_pairs", "tsgm_evaluation", ["ceilings.yaml"], work_dir),
             work_dir / "true_pairs" / "pseudo_pairs.json"),
        train(["train_true_pairs.yaml"], "vejp_true_pairs"),
    ]
    cyclegan = {"cyclegan_checkpoint": work_dir / "cyclegan" / "model.pt"} if from_scratch else {}
    detection = [
        *detect("TSGM", [], "vejp"),
        Step("FLAIR-threshold baseline detection",
             bundle_command("flair_threshold", "tsgm_evaluation", ["baselines.yaml", "cpu.yaml"], work_dir,
                            skip_existing=True),
             None),
        Step("CycleGAN-only baseline detection",
             bundle_command("cyclegan", "tsgm_evaluation", ["baselines.yaml", "cpu.yaml"], work_dir,
                            skip_existing=True, **cyclegan),
             None),
        *detect("SDEdit baseline", ["sdedit.yaml"], "vejp_unconditional"),
        Step("CEILING oracle reconstruction detection (healthy = twin)",
             bundle_command("oracle_reconstruction", "tsgm_evaluation", ["ceilings.yaml"], work_dir, skip_existing=True),
             None),
        *detect("CEILING VE-JP on true pairs", ["true_pairs.yaml"], "vejp_true_pairs"),
        Step("calibrate on validation, evaluate on test",
             bundle_command("evaluating", "tsgm_evaluation", ["evaluate.yaml", "cpu.yaml", "ceilings.yaml"], work_dir),
             work_dir / "evaluation" / "summary.json"),
    ]
    return data + (training if from_scratch else []) + detection


def run_demo(
    work_dir: str = "runs/demo",
    n_subjects: int = 40,
    seed: int = 0,
    image_size: int = 64,
    split_fraction: float = 0.2,
    from_scratch: bool = False,
) -> None:
    """Run (or continue) the whole pipeline in WORK_DIR and print the evaluation table.

    Every step's command and wall time go to WORK_DIR/demo_steps.json (``tsgm build_weights`` puts the training
    steps' times in the weights' provenance).
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = demo_steps(work, n_subjects=n_subjects, seed=seed, image_size=image_size, split_fraction=split_fraction,
                       from_scratch=from_scratch)
    record_path = work / STEPS_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    start = time.perf_counter()
    for index, step in enumerate(steps, 1):
        header = f"[{index}/{len(steps)}] {step.name}"
        if step.output is not None and step.output.exists():
            print(f"{header}: done already ({step.output})", flush=True)
            continue
        command = step.resolved_command()
        print(f"{header}\n$ {shlex.join(command)}", flush=True)
        step_start = time.perf_counter()
        result = subprocess.run(command, cwd=work)
        if result.returncode != 0:
            raise SystemExit(f"tsgm demo: step '{step.name}' failed (exit {result.returncode}); fix it and rerun "
                             "the same command to continue from this step")
        seconds = time.perf_counter() - step_start
        record[step.name] = {"command": shlex.join(command), "seconds": round(seconds, 1)}
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{header}: {seconds:.0f} s", flush=True)
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s. Report: {work / 'evaluation'}\n")
    print((work / "evaluation" / "results.md").read_text())
