"""Does a trained CycleGAN translate tumours? The check to run before training VE-JP on its pseudo-pairs.

    python benchmarks/cyclegan_tumour_probe.py --work_dir runs/demo [--checkpoint runs/demo/cyclegan/model.pt]

TSGM learns "remove what G_A→B adds": if G_A→B adds no tumour-like change to healthy slices, the pseudo-pairs teach
VE-JP to copy its condition, tumour included, and no sampler can fix that. On FLAIR slices of the prepared dataset
(training and validation; up to ``--n_slices`` healthy and as many tumour slices) this prints:

- the fraction of brain voxels brighter than the 99th percentile of healthy brain, in healthy slices, tumour slices,
  G_A→B(healthy) (should approach the tumour slices' value) and G_B→A(tumour) (should approach the healthy value);
- the mean brain intensity outside tumours of the same four (per-volume percentile normalisation makes the normal
  tissue of tumour volumes darker; a generator may learn that global shift instead of lesions);
- mean |G_B→A(x) − x| inside and outside the tumour of tumour slices (a tumour-removing G_B→A changes the inside far
  more than the outside);
- AUPRC of |x − G_B→A(x)| for the tumour voxels over brain voxels (the CycleGAN-only baseline's FLAIR map), next to
  that of the FLAIR intensity itself (what thresholding gets) and the tumour prevalence (chance level).

Writes nothing; the config used is the bundle's ``inference.yaml`` (``--config_file`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser

from tsgm_components import REPO_ROOT
from tsgm_components.metrics import average_precision
from tsgm_components.data.brats import MODALITIES
from tsgm_components.checkpoints import training_preprocess
from tsgm_components.translation import load_generator, translate_modalities

CONFIGS = REPO_ROOT / "bundles" / "cyclegan_brats" / "configs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", required=True, help="folder with prepared/ and cyclegan/model.pt")
    parser.add_argument("--checkpoint", default=None, help="default: WORK_DIR/cyclegan/model.pt")
    parser.add_argument("--config_file", nargs="+", default=[str(CONFIGS / "inference.yaml")])
    parser.add_argument("--n_slices", type=int, default=150)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    checkpoint = args.checkpoint or str(work / "cyclegan" / "model.pt")
    prepared = work / "prepared"
    config = ConfigParser()
    config.read_config(args.config_file)
    config.update({"checkpoint": checkpoint})
    size = int(config.get_parsed_content("image_size"))

    datalist = json.loads((prepared / "datalist.json").read_text())
    items = datalist["training"] + datalist["validation"]
    by_slice = {(i["subject"], i["z"], i["modality"]): i for i in items}
    flair = [i for i in items if i["modality"] == "flair"]
    healthy = [i for i in flair if int(i["tumour"]) == 0][: args.n_slices]
    tumour = [i for i in flair if int(i["tumour"]) == 1][: args.n_slices]

    def stack(items: list[dict], key: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.load(prepared / i[key])).float().reshape(1, size, size) for i in items])

    def translate_flair(generator: torch.nn.Module, items: list[dict]) -> torch.Tensor:
        """G(FLAIR slices), given all four modalities of each slice (a 4-channel generator sees them together)."""
        modalities = torch.cat([stack([by_slice[(i["subject"], i["z"], m)] for i in items], "image") for m in MODALITIES])
        return translate_modalities(generator, modalities)[MODALITIES.index("flair") * len(items) :]

    x_a, x_b, seg_b = stack(healthy, "image"), stack(tumour, "image"), stack(tumour, "label") > 0.5
    brain_a, brain_b = x_a > 0, x_b > 0
    preprocess = training_preprocess(prepared, size)
    g_ab = load_generator(config.get_parsed_content("network_def", instantiate=True), checkpoint, "AB", preprocess)
    g_ba = load_generator(config.get_parsed_content("network_def", instantiate=True), checkpoint, "BA", preprocess)
    fake_b, fake_a = translate_flair(g_ab, healthy), translate_flair(g_ba, tumour)
    bright = torch.quantile(x_a[brain_a], 0.99)
    frac = lambda x, brain: float((x[brain] > bright).float().mean())  # noqa: E731
    residual = (x_b - fake_a).abs()
    target = seg_b[brain_b].numpy()
    print(f"{checkpoint}: {len(healthy)} healthy and {len(tumour)} tumour FLAIR slices at {size}²")
    print(f"bright-voxel fraction: healthy {frac(x_a, brain_a):.4f}, tumour {frac(x_b, brain_b):.4f}, "
          f"G_A→B(healthy) {frac(fake_b, brain_a):.4f}, G_B→A(tumour) {frac(fake_a, brain_b):.4f}")
    mean = lambda x, where: float(x[where].mean())  # noqa: E731
    print(f"mean brain intensity outside tumours: healthy {mean(x_a, brain_a):.3f}, tumour slices {mean(x_b, brain_b & ~seg_b):.3f}, "
          f"G_A→B(healthy) {mean(fake_b, brain_a):.3f}, G_B→A(tumour) {mean(fake_a, brain_b & ~seg_b):.3f}")
    print(f"mean |G_B→A(x) − x| on tumour slices: inside the tumour {float(residual[seg_b].mean()):.4f}, "
          f"outside {float(residual[brain_b & ~seg_b].mean()):.4f}")
    print(f"AUPRC over brain voxels: |x − G_B→A(x)| {average_precision(residual[brain_b].numpy(), target):.3f}, "
          f"FLAIR intensity {average_precision(x_b[brain_b].numpy(), target):.3f}, chance {target.mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
