"""CPU sampling speed of the demo's score network: sampler, chunk size and memory layout, side by side in one run.

    python benchmarks/cpu_detection_speed.py --threads 2

Times one draw of each distinct sampler setting through ``DiffusionSamplerInferer`` on a stack of random 64² slices
with the cpu.yaml network (random weights: the cost does not depend on them), interleaved over ``--repeats`` rounds,
and extrapolates to one volume (49 slices × the modalities sampled × the row's draws): the 0.5.0 demo (mean of 4
Heun-4 draws = 28 NFE, chunks of 256, default layout, 4 modalities), the same in chunks of 32 and channels-last, the
previous inference default (2 Heun-4 draws of the 3 modalities the previous calibration weighed), the posterior mean
of all 4 modalities (the demo's validation split, ``reconstruct_modalities: all``) and the inference default (the
posterior mean of the modalities the shipped calibration weighs, ``reconstruct_modalities: weighted``). Prints a
table with the ratio to the 0.5.0 demo and writes ``benchmarks/results/cpu_detection_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tsgm_components import REPO_ROOT
from tsgm_components.diffusion.inferers import DiffusionSamplerInferer
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.diffusion.sde import VESDE

from common import save_report  # benchmarks/common.py (this script's folder is sys.path[0])

RESULTS = Path(__file__).resolve().parent / "results"

#: cpu.yaml's network
NETWORK = dict(
    condition_channels=1,
    channels=[16, 32, 64],
    attention_levels=[False] * 3,
    num_res_blocks=1,
    num_head_channels=16,
    norm_num_groups=8,
    sigma_data=0.5,
)
#: how many modalities the shipped TSGM calibration weighs (what single-subject inference samples)
SHIPPED_MODALITIES = sum(
    w > 0 for w in json.loads((REPO_ROOT / "bundles" / "vejp_anomaly" / "models" / "model_calibration.json").read_text())["weights"].values()
)
HEUN4 = dict(sampler="heun", n_steps=4)
POSTERIOR_MEAN = dict(sampler="posterior_mean")
#: setting -> (inferer arguments of one draw, draws per slice, modalities sampled per volume)
SETTINGS = {
    "0.5.0 demo: Heun-4, 4 draws, chunks of 256, default layout, 4 modalities": (dict(**HEUN4, batch_size=256, channels_last=False), 4, 4),
    "Heun-4, 4 draws, chunks of 32, channels-last, 4 modalities": (dict(**HEUN4, batch_size=32, channels_last=True), 4, 4),
    "previous default: Heun-4, 2 draws, chunks of 32, channels-last, 3 modalities": (dict(**HEUN4, batch_size=32, channels_last=True), 2, 3),
    "posterior mean, chunks of 32, channels-last, 4 modalities (the demo's validation split: reconstruct_modalities all)": (
        dict(**POSTERIOR_MEAN, batch_size=32, channels_last=True),
        1,
        4,
    ),
    f"default: posterior mean, chunks of 32, channels-last, the {SHIPPED_MODALITIES} modalit{'y' if SHIPPED_MODALITIES == 1 else 'ies'} the shipped calibration weighs": (
        dict(**POSTERIOR_MEAN, batch_size=32, channels_last=True),
        1,
        SHIPPED_MODALITIES,
    ),
}
SLICES_PER_MODALITY = 49


def cpu_model() -> str:
    """The CPU's model name and vector extensions (the speed differs several-fold between machines of this project)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({vector})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=256, help="slices per timed call (one draw each; >= 256 so that every chunk size is exercised)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = torch.rand(args.slices, 1, 64, 64)
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    # one timing per distinct inferer setting (rows differ only in draws and modalities share it)
    timed = {tuple(sorted(setting.items())): setting for setting, _, _ in SETTINGS.values()}
    times: dict[tuple, list[float]] = {key: [] for key in timed}
    nfe: dict[tuple, int] = {}
    for _ in range(args.repeats):
        for key, setting in timed.items():
            network = ScoreUNet(**NETWORK).eval()  # a fresh one: channels_last converts the network in place
            inferer = DiffusionSamplerInferer(sde, n_draws=1, **setting)
            nfe[key] = inferer.nfe_per_slice
            start = time.perf_counter()
            inferer(inputs, network)
            times[key].append(time.perf_counter() - start)
    rows = []
    for name, (setting, draws, modalities) in SETTINGS.items():
        key = tuple(sorted(setting.items()))
        per_slice_nfe_ms = 1000 * min(times[key]) / (args.slices * nfe[key])
        nfe_per_slice = nfe[key] * draws
        rows.append(
            {
                "setting": name,
                "ms_per_slice_nfe": round(per_slice_nfe_ms, 2),
                "nfe_per_slice": nfe_per_slice,
                "slices_per_volume": SLICES_PER_MODALITY * modalities,
                "s_per_volume": round(per_slice_nfe_ms * nfe_per_slice * SLICES_PER_MODALITY * modalities / 1000, 2),
            }
        )
    for row in rows:
        row["speed_up"] = round(rows[0]["s_per_volume"] / row["s_per_volume"], 2)
    machine = f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}"
    lines = [
        f"# CPU sampling speed of the demo's score network ({machine})",
        "",
        f"`python benchmarks/cpu_detection_speed.py --threads {args.threads} --slices {args.slices} --repeats {args.repeats}`; "
        f"one draw per timed call ({args.slices} random 64² slices), best of {args.repeats} interleaved rounds; per "
        "volume = 49 slices × the modalities sampled × the row's NFE per slice (its draws × the sampler's NFE per draw); "
        "network passes only (I/O, preprocessing and the maps: the demo's per-volume seconds).",
        "",
        "| setting | ms per slice per NFE | NFE per slice | slices per volume | s per volume | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['setting']} | {r['ms_per_slice_nfe']} | {r['nfe_per_slice']} | {r['slices_per_volume']} | {r['s_per_volume']} | {r['speed_up']}× |"
        for r in rows
    ]
    record = {"machine": machine, "rows": rows, "times_s": {str(dict(key)): values for key, values in times.items()}}
    save_report("\n".join(lines) + "\n", record, RESULTS, "cpu_detection_speed")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
