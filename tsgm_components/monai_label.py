"""MONAI Label's dict pipeline for VE-JP (``BundleInferTask``): preprocessing(dict with "image") ->
``inferer(image[None], network)`` -> [0] -> "pred" -> postprocessing(dict). "image" is one multi-channel NIfTI
(channels = ``channel_modalities``, e.g. MSD Task01's FLAIR-first order); from the slices on, the modalities are in
``MODALITIES`` order, the one a four-channel model's channels follow. The steps are the detection step's (:mod:`tsgm_components.detection.detector`):
``preprocess_volume`` per modality, the same slice inferer, :func:`~tsgm_components.detection.anomaly.anomaly_maps` and
:meth:`~tsgm_components.detection.masking.Calibration.mask`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import Tensor

from tsgm_components.detection.anomaly import anomaly_maps
from tsgm_components.data.brats import MODALITIES, grid_geometry
from tsgm_components.data.preprocessing import PreprocessConfig, preprocess_volume
from tsgm_components.errors import TsgmInputError
from tsgm_components.detection.masking import Calibration


class SliceStackInferer(Inferer):
    """Applies a slice inferer ((N, 1, s, s) -> (N, 1, s, s)) to every (s, s) plane of a tensor (..., s, s)."""

    def __init__(self, slice_inferer: Callable[[Tensor, torch.nn.Module], Tensor]):
        self.slice_inferer = slice_inferer

    @property
    def nfe_per_slice(self) -> int | None:
        return getattr(self.slice_inferer, "nfe_per_slice", None)

    def __call__(self, inputs: Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        planes = torch.as_tensor(inputs).reshape(-1, 1, *inputs.shape[-2:])
        return self.slice_inferer(planes, network).reshape(inputs.shape)


class MultiModalSlicesd(MapTransform):
    """(M, H, W, D) multi-modal volume, channels ``channel_modalities`` -> (M, S, s, s) preprocessed slices in [0, 1]
    (same as training), in ``MODALITIES`` order.

    The volume is checked against the model's training grid and reoriented to it, from the MetaTensor's affine
    (:func:`~tsgm_components.data.brats.grid_geometry`; a plain array is taken as already in that orientation). Also
    stores ``<key>_brain`` ((H, W, D) bool, model orientation) and ``<key>_geometry`` for :class:`AnomalyFromHealthyd`;
    the output keeps the input's metadata (affine), so the restored prediction overlays the input.
    """

    def __init__(self, keys: str, preprocess: PreprocessConfig, channel_modalities: Sequence[str] = MODALITIES):
        super().__init__(keys)
        if sorted(channel_modalities) != sorted(MODALITIES):
            raise ValueError(f"channel_modalities must order {list(MODALITIES)}, got {list(channel_modalities)}")
        self.preprocess = preprocess
        self.channel_modalities = tuple(channel_modalities)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for key in self.key_iterator(data):
            image = data[key]
            volume = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)
            meta = getattr(image, "meta", {})
            source = meta.get("filename_or_obj", key)
            if volume.ndim != 4 or volume.shape[0] != len(self.channel_modalities):
                raise TsgmInputError(
                    source,
                    f"expected a ({len(self.channel_modalities)}, H, W, D) volume (channels {self.channel_modalities}), got shape {volume.shape}",
                )
            if not np.isfinite(volume).all():
                raise TsgmInputError(source, "contains non-finite voxels")
            geometry = None
            if meta.get("affine") is not None:
                geometry = grid_geometry(np.asarray(torch.as_tensor(meta["affine"]).cpu()), volume.shape[1:], self.preprocess, source)
                volume = np.stack([geometry.to_training(channel) for channel in volume])
            brain = volume.any(axis=0)
            channels = [volume[self.channel_modalities.index(m)] for m in MODALITIES]
            slices = np.stack([preprocess_volume(channel, brain, self.preprocess)[1] for channel in channels])
            data[key] = MetaTensor(torch.from_numpy(slices), meta=getattr(image, "meta", None))
            data[f"{key}_brain"] = brain
            data[f"{key}_geometry"] = geometry
        return data


class AnomalyFromHealthyd(MapTransform):
    """``pred`` (M, S, s, s) healthy slices (``MODALITIES`` order, as :class:`MultiModalSlicesd` leaves the image) ->
    (1, H, W, D) weighted anomaly map, or the uint8 mask when a mask
    rule is given (``mask_settings`` from :func:`resolve_mask_settings`), in the input geometry (mapped back from the
    model's orientation with the ``<image_key>_geometry`` :class:`MultiModalSlicesd` stored)."""

    def __init__(
        self,
        keys: str,
        image_key: str,
        preprocess: PreprocessConfig,
        mask_settings: Calibration,
    ):
        super().__init__(keys)
        self.image_key = image_key
        self.preprocess = preprocess
        self.mask_settings = mask_settings

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        data = dict(data)
        image = data[self.image_key]
        geometry = data.get(f"{self.image_key}_geometry")
        slices = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=np.float32)
        brain = data[f"{self.image_key}_brain"]
        inputs = dict(zip(MODALITIES, slices))
        for key in self.key_iterator(data):
            healthy = np.asarray(torch.as_tensor(data[key]).detach().cpu(), dtype=np.float32)
            _, weighted = anomaly_maps(inputs, dict(zip(MODALITIES, healthy)), brain, self.preprocess, self.mask_settings.weights)
            spacing = geometry.training_voxel_size if geometry is not None else (1.0, 1.0, 1.0)
            mask = self.mask_settings.mask(weighted, brain, spacing, self.preprocess.z_range)
            out = weighted if mask is None else mask
            out = geometry.to_input(out) if geometry is not None else out
            data[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(out)[None]), meta=getattr(image, "meta", None))
        return data
