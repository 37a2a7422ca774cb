"""Pseudo-pair datalist (CycleGAN inference -> VE-JP training) and the transforms that load a pair.

``PAIRS/pseudo_pairs.json`` (docs/architecture.md): ``{"training": [...], "validation": [...]}`` with items
``{"image": x_A .npy, "condition": x_B~ .npy, "subject", "modality", "z"}``, paths relative to ``PAIRS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged

from tsgm_components.errors import TsgmInputError

PAIR_KEYS = ("image", "condition")


def load_pseudo_pairs(pairs_dir: str | Path, split: str = "training", image_size: int | None = None) -> list[dict[str, Any]]:
    """Items of ``split`` in ``pairs_dir/pseudo_pairs.json`` with absolute ``image``/``condition`` paths.

    When ``image_size`` is given, the first pair's slices must be (image_size, image_size): a config built
    for another size fails here with the file named, not deep inside the network.
    """
    pairs_dir = Path(pairs_dir).resolve()
    path = pairs_dir / "pseudo_pairs.json"
    if not path.is_file():
        raise TsgmInputError(path, "not found: run the cyclegan_brats bundle's inference (it writes the pseudo-pairs) first")
    try:
        datalist = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"cannot read pseudo-pair JSON ({type(error).__name__}: {error})") from error
    items = []
    for item in datalist.get(split, []):
        missing = [k for k in PAIR_KEYS if k not in item]
        if missing:
            raise TsgmInputError(path, f"{split} item {item} lacks keys {missing}")
        items.append(dict(item, **{k: str(pairs_dir / item[k]) for k in PAIR_KEYS}))
    if not items:
        raise TsgmInputError(path, f"split '{split}' has no pseudo-pairs")
    if image_size is not None:
        for key in PAIR_KEYS:
            try:
                shape = np.load(items[0][key], mmap_mode="r").shape
            except (OSError, ValueError) as error:
                raise TsgmInputError(items[0][key], f"cannot read slice ({type(error).__name__}: {error})") from error
            if shape != (image_size, image_size):
                raise TsgmInputError(
                    items[0][key], f"slice shape {shape} does not match the config's image_size={image_size}"
                )
    return items


def pair_transforms(keys: tuple[str, ...] = PAIR_KEYS) -> Compose:
    """Load ``keys`` (.npy slices) as (1, H, W) float32 tensors in [0, 1]."""
    return Compose(
        [
            LoadImaged(keys=list(keys), reader="NumpyReader", image_only=True),
            EnsureChannelFirstd(keys=list(keys), channel_dim="no_channel"),
            EnsureTyped(keys=list(keys), dtype=torch.float32, track_meta=False),
        ]
    )
