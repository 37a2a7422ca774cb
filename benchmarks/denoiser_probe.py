"""How well does a trained VE-JP model denoise, per noise level? The check before blaming (or tuning) a sampler.

    python benchmarks/denoiser_probe.py --work_dir runs/demo

On validation pseudo-pairs (x_A, x_B~) of WORK_DIR: noise x_A at each σ, ask the model for its clean estimate
D(x_A + σz, σ, x_B~) (``ScoreUNet.denoise``; EMA weights, loaded by the inference config exactly as the bundle does),
and print mean |D − x_A| on the [0, 1] scale next to the noise's own mean |σz| and the copy-the-condition error
|x_B~ − x_A|. Samplers that start from the prior pass through every σ; a model whose error at large σ is far above
the copy-the-condition error gives poor healthy reconstructions whatever the sampler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.data.pseudo_pairs import load_pseudo_pairs

CONFIGS = REPO_ROOT / "bundles" / "vejp_anomaly" / "configs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="folder with pseudo_pairs/ and vejp/model.pt")
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "inference.yaml"), str(CONFIGS / "cpu.yaml")])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 20.0])
    parser.add_argument("--n_pairs", type=int, default=32)
    args = parser.parse_args(argv)
    work = Path(args.work_dir).resolve()
    config = ConfigParser()
    config.read_config(args.config_file)
    config.update({"work_dir": str(work), "device": "$torch.device('cpu')"})
    network = config.get_parsed_content("network")
    size = int(config.get_parsed_content("image_size"))
    items = load_pseudo_pairs(work / "pseudo_pairs", "validation", size)
    items = items[:: max(1, len(items) // args.n_pairs)][: args.n_pairs]

    def stack(key: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.load(i[key])).float().reshape(1, size, size) for i in items])

    x_a, condition = stack("image"), stack("condition")
    generator = torch.Generator().manual_seed(0)
    print(f"{len(items)} validation pseudo-pairs at {size}²; copy-the-condition error |x_B~ − x_A| "
          f"{float((condition - x_a).abs().mean()):.4f}")
    print("sigma    |D − x_A|   |σz|")
    with torch.no_grad():
        for sigma in args.sigmas:
            noise = sigma * torch.randn(x_a.shape, generator=generator)
            denoised = network.denoise(x_a + noise, torch.tensor(sigma), condition if network.conditional else None)
            print(f"{sigma:6.2f}   {float((denoised - x_a).abs().mean()):.4f}     {float(noise.abs().mean()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
