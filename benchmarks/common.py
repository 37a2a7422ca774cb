"""What the benchmark scripts share (they import it from their folder, ``sys.path[0]`` when run as scripts)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from tsgm_components import bundle_dir
from tsgm_components.io import atomic_path, save_json

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


def device_label(name: str) -> str:
    """A device name as a file-name part: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def timed(inferer: Any, inputs: torch.Tensor, network: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """``(inferer(inputs, network), seconds)``, the GPU synchronised before and after (no host copy timed)."""
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    start = time.perf_counter()
    out = inferer(inputs, network)
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
    return out, time.perf_counter() - start


def evaluation_settings(config_files: list[str] | tuple[str, ...] = tuple(EVALUATION_CPU_CONFIGS)) -> dict[str, Any]:
    """The evaluation bundle's calibration settings (mode, objective, weight grid, bins, sample size, seed): the keyword
    arguments of ``tsgm_components.evaluation.harness.calibrate``."""
    parser = ConfigParser()
    parser.read_config([str(Path(f)) for f in config_files])
    keys = ("mode", "objective", "weight_step", "search_bins", "threshold_bins", "max_voxels", "seed", "modality_tolerance")
    return {key: parser.get_parsed_content(key) for key in keys}
