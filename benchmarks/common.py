"""What the benchmark scripts share (they import it from their folder, ``sys.path[0]`` when run as scripts): the report
writer, the command line and machine of a record, sampler settings, and the one runner of bundle commands and trainings."""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT, bundle_dir
from tsgm_components.io import atomic_path, save_json

#: where every script writes its NAME.{md,json} by default
RESULTS = REPO_ROOT / "benchmarks" / "results"
#: The evaluation bundle's CPU configuration (what the demo calibrates with)
EVALUATION_CPU_CONFIGS = [f"{bundle_dir('tsgm_evaluation')}/configs/evaluate.yaml", f"{bundle_dir('tsgm_evaluation')}/configs/cpu.yaml"]


def save_report(table: str, record: Any, out_dir: str | os.PathLike, name: str) -> Path:
    """Write a markdown ``table`` to OUT_DIR/NAME.md and ``record`` to OUT_DIR/NAME.json (atomically, replacing
    earlier ones); returns OUT_DIR/NAME (``benchmarks/results/``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{name}.md", overwrite=True) as tmp:
        tmp.write_text(table)
    save_json(record, out_dir / f"{name}.json")
    return out_dir / name


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """``python benchmarks/SCRIPT ARGS``: how a report says what made it (``argv`` default: this process's)."""
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict[str, Any]:
    """The machine of a record: time, processor, CPU count, torch threads and versions, the GPU if any."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def device_label(name: str) -> str:
    """A device name as a file-name part: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(inferer: Any, inputs: torch.Tensor, network: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """``(inferer(inputs, network), seconds)``, the GPU synchronised before and after (no host copy timed)."""
    synchronize()
    start = time.perf_counter()
    out = inferer(inputs, network)
    synchronize()
    return out, time.perf_counter() - start


def parse_setting(text: str) -> dict[str, Any]:
    """A sampler setting as ``inference.yaml`` takes it: ``"heun:n_steps=4,n_draws=2"`` -> ``{"sampler": "heun",
    "n_steps": 4, "n_draws": 2}`` (values as JSON or Python literals: ``null``, ``True``, ``0.5``)."""
    sampler, _, rest = text.partition(":")
    setting: dict[str, Any] = {"sampler": sampler.strip()}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"sampler setting {text!r}: expected key=value, got {pair!r}")
        try:
            setting[key] = json.loads(value)
        except json.JSONDecodeError:
            setting[key] = ast.literal_eval(value)
    return setting


def setting_label(text: str) -> str:
    """A sampler setting as a folder name: ``"heun:n_steps=4,n_draws=2"`` -> ``"heun_n_steps4_n_draws2"``."""
    return text.replace(":", "_").replace(",", "_").replace("=", "")


def evaluation_settings(config_files: list[str] | tuple[str, ...] = tuple(EVALUATION_CPU_CONFIGS)) -> dict[str, Any]:
    """The evaluation bundle's calibration settings (mode, objective, weight grid, bins, sample size, seed): the keyword
    arguments of ``tsgm_components.evaluation.harness.calibrate``."""
    parser = ConfigParser()
    parser.read_config([str(Path(f)) for f in config_files])
    keys = ("mode", "objective", "weight_step", "search_bins", "threshold_bins", "max_voxels", "seed", "modality_tolerance")
    return {key: parser.get_parsed_content(key) for key in keys}


def run_command(command: list[str], cwd: str | os.PathLike) -> float:
    """Runs a command (``tsgm ...`` or a bundle command of ``pipeline.bundle_command``), printed first; returns its
    wall time; stops the benchmark with the command if it fails."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"{Path(sys.argv[0]).name}: command failed (exit {result.returncode}): {shlex.join(command)}")
    return time.perf_counter() - start


def run_training(
    bundle: str, configs: Sequence[str], trainer_key: str, overrides: dict[str, Any], attach: Callable[[Any], None] | None = None
) -> tuple[ConfigParser, Any, float]:
    """Runs a bundle's training configs (``configs`` of BUNDLE/configs) in this process with ``overrides``:
    ``attach(trainer)`` adds handlers first; returns (parser, trainer, seconds of ``initialize`` + ``training``)."""
    parser = ConfigParser()
    parser.read_config([f"{bundle_dir(bundle)}/configs/{name}" for name in configs])
    parser.update(overrides)
    trainer = parser.get_parsed_content(trainer_key)
    if attach is not None:
        attach(trainer)
    start = time.perf_counter()
    for key in ("initialize", "training"):
        parser.get_parsed_content(key)
    return parser, trainer, time.perf_counter() - start
