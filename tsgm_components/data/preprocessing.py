"""Preprocessing shared by training and inference: intensity normalisation and volume <-> axial slices.

Intensity normalisation (:func:`normalize_volume`, chosen by ``PreprocessConfig.normalization``):

- ``"brain_median"`` (default): divide by the median of the brain voxels and map that median to
  ``median_target`` (0.4), clip to [0, 1]. The median of the brain is a statistic of normal tissue as long as
  lesions cover less than half of it, so normal tissue keeps its intensity whatever the lesion burden (a tumour
  of 5 % of the brain moves it by < 0.02, ``tests/test_data.py``); intensities up to 2.5x the brain median stay
  unclipped (oedema and enhancing tumour are 1.5-2.3x on FLAIR/T1ce). The same idea as the z-score of
  foreground voxels of nnU-Net (Isensee et al., Nat. Methods 2021) and WhiteStripe (Shinohara et al.,
  NeuroImage Clin. 2014), with the median instead of mean/std because both of those move with a bright lesion.
- ``"percentile"``: the paper's choice (Wang et al.): clip to the ``lower``/``upper`` percentiles of the brain,
  min-max to [0, 1]. Once a bright lesion covers more than ~1 % of the brain the upper clip lies inside the
  lesion and all normal tissue of that volume gets darker (0.62 -> 0.30 on phantom FLAIR at 2 % lesion), a
  domain shift between healthy and tumour volumes that is not the lesion. Kept for the paper-scale recipe.

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


#: The grid of every BraTS release and of the phantom: how records written before the grid was recorded read.
BRATS_GRID: dict[str, Any] = {"orientation": "LPS", "voxel_size": (1.0, 1.0, 1.0), "volume_shape": (240, 240, 155)}
#: Intensity normalisations of :func:`normalize_volume` (module doc).
NORMALIZATIONS = ("brain_median", "percentile")


@dataclass(frozen=True)
class PreprocessConfig:
    """Slice range (``z_max`` inclusive), padding/resizing (paper: 80-128, 256) and intensity normalisation.

    ``normalization``: ``"brain_median"`` (default, lesion-robust: brain median -> ``median_target``) or
    ``"percentile"`` (the paper's: ``lower_percentile``/``upper_percentile`` clip + min-max); see the module doc.

    The training grid (``tsgm prepare`` records it from the data; None: not checked, volumes used as stored):
    ``orientation`` axis codes the volumes are processed in (e.g. ``"LPS"`` for BraTS; others are reoriented to it),
    ``voxel_size`` (mm, in that orientation) and ``volume_shape`` that inputs must have (see ``data/brats.py``).
    """

    z_min: int = 80
    z_max: int = 128
    image_size: int = 256
    pad_to: int = 256
    normalization: str = "brain_median"
    median_target: float = 0.4
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    orientation: str | None = None
    voxel_size: tuple[float, float, float] | None = None
    volume_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.voxel_size is not None:
            object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        if self.volume_shape is not None:
            object.__setattr__(self, "volume_shape", tuple(int(v) for v in self.volume_shape))
        if self.orientation is not None and (len(self.orientation) != 3 or set(self.orientation.upper()) - set("LRAPSI")):
            raise ValueError(f"orientation must be three axis codes such as 'LPS' or 'RAS', got {self.orientation!r}")
        if not 0 <= self.z_min <= self.z_max:
            raise ValueError(f"need 0 <= z_min <= z_max, got z_min={self.z_min}, z_max={self.z_max}")
        if self.image_size < 1 or self.pad_to < 1:
            raise ValueError(f"image_size and pad_to must be positive, got {self.image_size}, {self.pad_to}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not 0.0 < self.median_target < 1.0:
            raise ValueError(f"median_target must be in (0, 1), got {self.median_target}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(f"need 0 <= lower_percentile < upper_percentile <= 100, got {self.lower_percentile}, {self.upper_percentile}")

    @property
    def z_range(self) -> range:
        """The processed axial indices ``z_min..z_max``."""
        return range(self.z_min, self.z_max + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PreprocessConfig":
        """Build from a dict; keys that are not fields (e.g. the seed in ``prepare_config.json``) are ignored.

        A dict without ``normalization`` was written before the option existed, when the percentile scheme was
        the only one: it reads as ``"percentile"``, so old prepared data and checkpoints keep their meaning. A dict
        without ``orientation`` was written before the training grid was recorded, when every dataset was on the
        BraTS grid (BraTS and the phantom: LPS, 1 mm, 240×240×155): it reads as that grid.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {"normalization": "percentile", **values}
        if "orientation" not in values:
            values = {**values, **BRATS_GRID}
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


def normalize_volume(volume: np.ndarray, brain_mask: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Normalise one modality to [0, 1] inside the brain with ``cfg.normalization`` (module doc).

    volume: (H, W, D) any real dtype; brain_mask: (H, W, D) bool. Returns float32 (H, W, D) in [0, 1],
    0 outside the brain. "brain_median": ``clip(median_target * volume / median(brain), 0, 1)``;
    "percentile": clip to the ``lower``/``upper`` percentiles of the brain, min-max (a constant brain maps to 0).
    """
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if brain_mask.shape != volume.shape:
        raise ValueError(f"brain mask shape {brain_mask.shape} differs from volume shape {volume.shape}")
    brain = volume[brain_mask].astype(np.float64)
    if brain.size == 0:
        raise ValueError("brain mask is empty")
    out = np.zeros(volume.shape, dtype=np.float32)
    if cfg.normalization == "brain_median":
        median = float(np.median(brain))
        if median <= 0:
            raise ValueError(f"median brain intensity is {median:g}: brain_median normalisation needs positive intensities")
        out[brain_mask] = np.clip(brain * (cfg.median_target / median), 0.0, 1.0).astype(np.float32)
        return out
    low, high = np.percentile(brain, [cfg.lower_percentile, cfg.upper_percentile])
    clipped = np.clip(brain, low, high)
    low, high = clipped.min(), clipped.max()
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


def slices_to_volume(slices: np.ndarray, volume_shape: tuple[int, int, int], cfg: PreprocessConfig, is_mask: bool = False) -> np.ndarray:
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


def preprocess_volume(volume: np.ndarray, brain_mask: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training preprocessing of one modality: (normalised (H, W, D) in [0, 1], slices (S, s, s) float32)."""
    normalised = normalize_volume(volume, brain_mask, cfg)
    return normalised, volume_to_slices(normalised, cfg)
