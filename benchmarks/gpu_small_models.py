"""Train the demo's small (cpu.yaml) models for longer on a GPU, to see what the CPU budget costs in quality.

    python benchmarks/gpu_small_models.py --work_dir /tmp/gpu_small --copy_to $OUT
    # then, on any machine, evaluate them exactly as the demo does (same phantom, seed and preprocessing):
    mkdir -p runs/gpu_small/{cyclegan,vejp,vejp_unconditional}
    cp OUT/cyclegan.pt runs/gpu_small/cyclegan/model.pt   # likewise vejp.pt, vejp_unconditional.pt
    tsgm demo --work_dir runs/gpu_small                   # skips the trained steps, runs detection + evaluation

Same networks, data (``tsgm phantom`` + ``tsgm prepare`` at 64², seed 0, as ``tsgm demo``) and configs as the demo
(``train.yaml`` + ``cpu.yaml`` of each bundle); only the training length, batch size and the matching learning-rate
warm-up / EMA horizon are overridden (``OVERRIDES`` below), and each training run also stops at a wall-clock limit
(ignite ``TimeLimit``; the final ``model.pt`` is still written). The logs say how many iterations each model got.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from ignite.engine import Events
from ignite.handlers import TimeLimit

from common import command_line, run_command, run_training
from tsgm_components.pipeline import bundle_command

TSGM = [sys.executable, "-m", "tsgm_components.cli"]
CUDA = "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')"
OVERRIDES: dict[str, dict[str, Any]] = {
    # demo: 5 epochs x 60 iterations of batch 4 (300 iterations); here up to 24 x 250 of batch 8
    "cyclegan": {"device": CUDA, "batch_size": 8, "epoch_length": 250, "n_epochs": 12, "n_epochs_decay": 12, "progress_bar": False, "log_every": 250},
    # demo: 5 x 50 iterations of batch 16, warm-up 50, EMA 0.98; here up to 40 x 100 of batch 32
    "vejp": {"device": CUDA, "batch_size": 32, "epoch_length": 100, "max_epochs": 40, "warmup_steps": 200, "ema_decay": 0.998, "log_interval": 500},
}


def train(bundle: str, configs: Sequence[str], trainer_key: str, overrides: dict[str, Any], limit_s: int) -> dict[str, Any]:
    """Runs a bundle's training in this process with ``overrides`` and a wall-clock limit; returns what it did."""
    attach = lambda trainer: trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(limit_s))  # noqa: E731
    _, trainer, seconds = run_training(bundle, configs, trainer_key, overrides, attach)
    kept = {k: v for k, v in overrides.items() if k != "work_dir"}
    return dict(
        bundle=bundle, configs=list(configs), iterations=trainer.state.iteration, seconds=round(seconds, 1), time_limit_s=limit_s, overrides=kept
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="/tmp/tsgm_gpu_small")
    parser.add_argument("--copy_to", default=None, help="folder that receives cyclegan.pt, vejp.pt, ... and the log")
    parser.add_argument("--cyclegan_s", type=int, default=200, help="wall-clock limit of the CycleGAN training")
    parser.add_argument("--vejp_s", type=int, default=110, help="wall-clock limit of each score-model training")
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    copy_to = Path(args.copy_to) if args.copy_to else None
    record: dict[str, Any] = {
        "command": command_line(__file__, argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "runs": [],
    }

    def save(name: str, model: Path, result: dict[str, Any]) -> None:
        record["runs"].append(result)
        print(json.dumps(result), flush=True)
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model, copy_to / f"{name}.pt")
            (copy_to / "gpu_small_models.json").write_text(json.dumps(record, indent=1))

    if not (work / "prepared" / "volumes.json").exists():
        run_command(TSGM + ["phantom", "--out", str(work / "phantom"), "--workers", "8"], work)
        run_command(TSGM + ["prepare", "--dataset_dir", str(work / "phantom"), "--out", str(work / "prepared"), "--image_size", "64"], work)
    common = {"work_dir": str(work)}
    result = train("cyclegan_brats", ["train.yaml", "cpu.yaml"], "train#trainer", {**common, **OVERRIDES["cyclegan"]}, args.cyclegan_s)
    save("cyclegan", work / "cyclegan" / "model.pt", result)
    run_command(bundle_command("inference", "cyclegan_brats", ["inference.yaml"], work, device=CUDA, checkpoint=work / "cyclegan" / "model.pt"), work)
    for name, extra in (("vejp", []), ("vejp_unconditional", ["train_unconditional.yaml"])):
        result = train("vejp_anomaly", ["train.yaml", "cpu.yaml", *extra], "trainer", {**common, **OVERRIDES["vejp"]}, args.vejp_s)
        save(name, work / name / "model.pt", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
