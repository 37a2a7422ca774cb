"""Preprocessing shared by training and inference: intensity normalisation and volume <-> axial slices.

Geometry: axial slices ``volume[:, :, z]`` for ``z_min <= z <= z_max`` are zero-padded (centred) from
(H, W) to (pad_to, pad_to) and resized to (image_size, image_size). :func:`slices_to_volume` inverts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreprocessConfig:
    """Slice range (``z_max`` inclusive), padding/resizing and percentile clipping (paper: 80-128, 256, 1/99)."""

    z_min: int = 80
    z_max: int = 128
    image_size: int = 256
    pad_to: int = 256
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0

    def __post_init__(self) -> None:
        if not 0 <= self.z_min <= self.z_max:
            raise ValueError(f"need 0 <= z_min <= z_max, got z_min={self.z_min}, z_max={self.z_max}")
        if self.image_size < 1 or self.pad_to < 1:
            raise ValueError(f"image_size and pad_to must be positive, got {self.image_size}, {self.pad_to}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {self.lower_percentile}, {self.upper_percentile}"
            )

    @property
    def z_range(self) -> range:
        """The processed axial indices ``z_min..z_max``."""
        return range(self.z_min, self.z_max + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PreprocessConfig":
        """Build from a dict; keys that are not fields (e.g. the seed in ``prepare_config.json``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def check_volume_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if a (H, W, D) volume cannot be processed with this config."""
        if len(shape) != 3:
            raise ValueError(f"expected a (H, W, D) volume, got shape {tuple(shape)}")
        height, width, depth = shape
        if height > self.pad_to or width > self.pad_to:
            raise ValueError(f"in-plane size {height}x{width} exceeds pad_to={self.pad_to}")
        if depth <= self.z_max:
            raise ValueError(f"volume has {depth} axial slices, but z_max={self.z_max} needs at least {self.z_max + 1}")


def normalize_volume(
    volume: np.ndarray, brain_mask: np.ndarray, lower: float = 1.0, upper: float = 99.0
) -> np.ndarray:
    """Clip to the ``lower``/``upper`` percentiles of brain voxels, min-max to [0, 1] inside the brain.

    volume: (H, W, D) any real dtype; brain_mask: (H, W, D) bool. Returns float32 (H, W, D) in [0, 1],
    0 outside the brain; a brain of constant intensity maps to 0.
    """
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if brain_mask.shape != volume.shape:
        raise ValueError(f"brain mask shape {brain_mask.shape} differs from volume shape {volume.shape}")
    brain = volume[brain_mask].astype(np.float64)
    if brain.size == 0:
        raise ValueError("brain mask is empty")
    low, high = np.percentile(brain, [lower, upper])
    clipped = np.clip(brain, low, high)
    low, high = clipped.min(), clipped.max()
    out = np.zeros(volume.shape, dtype=np.float32)
    if high > low:
        out[brain_mask] = ((clipped - low) / (high - low)).astype(np.float32)
    return out


def _resize(stack: torch.Tensor, size: int, is_mask: bool) -> torch.Tensor:
    """Resize (S, h, w) to (S, size, size): nearest for masks, area when shrinking, bilinear when enlarging."""
    if stack.shape[-2:] == (size, size):
        return stack
    if is_mask:
        mode, kwargs = "nearest-exact", {}
    elif size < stack.shape[-1]:
        mode, kwargs = "area", {}
    else:
        mode, kwargs = "bilinear", {"align_corners": False, "antialias": False}
    return F.interpolate(stack[:, None], size=(size, size), mode=mode, **kwargs)[:, 0]


def _pad_widths(height: int, width: int, pad_to: int) -> tuple[int, int]:
    """Leading zero-padding along H and W for a centred pad to ``pad_to`` (the extra pixel goes at the end)."""
    return (pad_to - height) // 2, (pad_to - width) // 2


def volume_to_slices(volume: np.ndarray, cfg: PreprocessConfig, is_mask: bool = False) -> np.ndarray:
    """(H, W, D) volume -> (S, image_size, image_size) axial slices ``z_min..z_max`` (S = z_max - z_min + 1).

    Images come back float32; masks (``is_mask``, resized with nearest neighbour) keep their dtype.
    """
    cfg.check_volume_shape(volume.shape)
    height, width, _ = volume.shape
    top, left = _pad_widths(height, width, cfg.pad_to)
    dtype = volume.dtype if is_mask else np.float32
    stack = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[:, :, cfg.z_min : cfg.z_max + 1], 2, 0), dtype=np.float32))
    stack = F.pad(stack, (left, cfg.pad_to - width - left, top, cfg.pad_to - height - top))
    return _resize(stack, cfg.image_size, is_mask).numpy().astype(dtype, copy=False)


def slices_to_volume(
    slices: np.ndarray, volume_shape: tuple[int, int, int], cfg: PreprocessConfig, is_mask: bool = False
) -> np.ndarray:
    """Inverse geometry of :func:`volume_to_slices`: (S, s, s) -> (H, W, D), zero outside ``z_min..z_max``.

    Slices are resized back to ``pad_to`` (bilinear, or nearest for masks), the padding is cropped and
    slice i is placed at ``z_min + i``. Images come back float32; masks keep their dtype.
    """
    cfg.check_volume_shape(tuple(volume_shape))
    n_slices = cfg.z_max - cfg.z_min + 1
    if slices.ndim != 3 or slices.shape[0] != n_slices or slices.shape[1] != slices.shape[2]:
        raise ValueError(f"expected slices of shape ({n_slices}, s, s), got {slices.shape}")
    height, width, _ = volume_shape
    top, left = _pad_widths(height, width, cfg.pad_to)
    dtype = slices.dtype if is_mask else np.float32
    stack = _resize(torch.from_numpy(np.asarray(slices, dtype=np.float32)), cfg.pad_to, is_mask)
    stack = stack[:, top : top + height, left : left + width].numpy()
    volume = np.zeros(volume_shape, dtype=dtype)
    volume[:, :, cfg.z_min : cfg.z_max + 1] = np.moveaxis(stack, 0, 2)
    return volume
