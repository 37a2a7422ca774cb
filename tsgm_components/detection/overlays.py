"""The detection overlay: the FLAIR slices with the most anomaly, the anomaly map as heat and the mask as contour."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

OVERLAY_SLICES = 6


def save_overlay(flair: np.ndarray, anomaly: np.ndarray, mask: np.ndarray | None, z_indices: Sequence[int], path: Path, title: str) -> None:
    """PNG of the ``OVERLAY_SLICES`` axial slices with the most anomaly: FLAIR (grey), anomaly (heat), mask (contour).

    flair, anomaly: (H, W, D) in [0, 1]; mask: (H, W, D) {0, 1} or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z_indices = list(z_indices)
    mass = [float(anomaly[:, :, z].sum()) for z in z_indices]
    chosen = sorted(z_indices[i] for i in np.argsort(mass)[::-1][:OVERLAY_SLICES])
    vmax = float(max(anomaly.max(), 1e-6))
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.6 * len(chosen), 3.0), squeeze=False)
    for ax, z in zip(axes[0], chosen):
        ax.imshow(np.rot90(flair[:, :, z]), cmap="gray", vmin=0, vmax=1)
        heat = np.ma.masked_less_equal(np.rot90(anomaly[:, :, z]), 0.05 * vmax)
        ax.imshow(heat, cmap="hot", alpha=0.55, vmin=0, vmax=vmax)
        if mask is not None and mask[:, :, z].any():
            ax.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"z={z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
