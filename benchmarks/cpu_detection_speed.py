"""CPU sampling speed of the demo's score network: chunk size and memory layout, side by side in one run.

    python benchmarks/cpu_detection_speed.py --threads 2

Times one Heun-4 draw (7 NFE per slice) through ``DiffusionSamplerInferer`` on a stack of random 64² slices with
the cpu.yaml network (random weights: the cost does not depend on them), for each chunk size and memory layout,
interleaved over ``--repeats`` rounds, and extrapolates to one volume (49 slices × 4 modalities) at each setting's
draws per slice: the 0.5.0 demo (mean of 4 draws = 28 NFE, chunks of 256, default layout), the same sampler in
chunks of 32 and channels-last, the current default (2 draws = 14 NFE, chunks of 32, channels-last) and 1 draw. Prints a table
with the ratio to the 0.5.0 demo and writes ``benchmarks/results/cpu_detection_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from tsgm_components.inferers import DiffusionSamplerInferer
from tsgm_components.io import save_report
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.sde import VESDE

RESULTS = Path(__file__).resolve().parent / "results"

#: cpu.yaml's network
NETWORK = dict(condition_channels=1, channels=[16, 32, 64], attention_levels=[False] * 3, num_res_blocks=1,
               num_head_channels=16, norm_num_groups=8, sigma_data=0.5)
#: setting -> (inferer arguments, draws per slice)
SETTINGS = {
    "0.5.0 demo: 4 draws, chunks of 256, default layout": (dict(batch_size=256, channels_last=False), 4),
    "4 draws, chunks of 32, default layout": (dict(batch_size=32, channels_last=False), 4),
    "4 draws, chunks of 32, channels-last": (dict(batch_size=32, channels_last=True), 4),
    "default: 2 draws, chunks of 32, channels-last": (dict(batch_size=32, channels_last=True), 2),
    "1 draw, chunks of 32, channels-last": (dict(batch_size=32, channels_last=True), 1),
}
SLICES_PER_VOLUME = 49 * 4


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
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    nfe = 0
    for _ in range(args.repeats):
        for name, (setting, _) in SETTINGS.items():
            network = ScoreUNet(**NETWORK).eval()  # a fresh one: channels_last converts the network in place
            inferer = DiffusionSamplerInferer(sde, sampler="heun", n_steps=4, n_draws=1, **setting)
            nfe = inferer.nfe_per_slice
            start = time.perf_counter()
            inferer(inputs, network)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, values in times.items():
        per_slice_nfe_ms = 1000 * min(values) / (args.slices * nfe)
        nfe_per_slice = nfe * SETTINGS[name][1]
        rows.append({
            "setting": name,
            "ms_per_slice_nfe": round(per_slice_nfe_ms, 2),
            "nfe_per_slice": nfe_per_slice,
            "s_per_volume": round(per_slice_nfe_ms * nfe_per_slice * SLICES_PER_VOLUME / 1000, 1),
        })
    for row in rows:
        row["speed_up"] = round(rows[0]["s_per_volume"] / row["s_per_volume"], 2)
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = [
        f"# CPU sampling speed of the demo's score network ({machine})",
        "",
        f"`python benchmarks/cpu_detection_speed.py --threads {args.threads} --slices {args.slices} --repeats {args.repeats}`; "
        f"Heun, 4 levels ({nfe} NFE per draw), {args.slices} random 64² slices per call, best of {args.repeats} "
        "interleaved rounds; per volume = 49 slices × 4 modalities × the setting's NFE per slice.",
        "",
        "| setting | ms per slice per NFE | NFE per slice | s per volume | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['setting']} | {r['ms_per_slice_nfe']} | {r['nfe_per_slice']} | {r['s_per_volume']} | {r['speed_up']}× |"
              for r in rows]
    save_report("\n".join(lines) + "\n", {"machine": machine, "rows": rows, "times_s": times}, RESULTS, "cpu_detection_speed")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
