"""MNI152-based phantom dataset in BraTS2020 layout (``tsgm phantom``).

Each subject is the MNI152 2009a brain (grey/white matter probability maps and brain mask shipped with
nilearn; CSF = mask - GM - WM) warped by a small random affine plus a smooth random deformation onto the
BraTS grid (240x240x155, 1 mm, affine diag(-1, -1, 1) like BraTS, axial = last axis). Four contrasts are
mixed from :data:`TISSUE_TABLE`, then a smooth bias field and Rician noise are applied and the result is
stored as int16 (skull-stripped: background exactly 0).

Tumour subjects get one or two irregular lesions (core radius log-uniform, small ones included): a core
(necrosis, label 1, FLAIR-dark; enhancing rim, label 4, absent in some lesions) inside an oedema region (label 2)
that spreads mostly in white matter, with mass effect pushing the surrounding tissue outward. The labelled
oedema is not an iso-contour of FLAIR: its contrast fades over a graded margin and is patchy, so parts of the
labelled extent are barely brighter than white matter. Healthy subjects (``healthy_fraction``) get no lesion.
Confounders make intensity thresholding imperfect, as on real scans: periventricular caps and white matter
hyperintensities as bright on FLAIR as oedema (not tumour), bright partial-volume CSF edges on FLAIR, enhancing
vessels on T1ce, and subject-to-subject contrast, bias and noise variation.

Difficulty is calibrated to one field anchor only: FLAIR thresholding's best-possible volume Dice on BraTS,
0.738 (Meissen et al. 2021); on the default phantom it is printed by ``make demo`` (README).

Healthy twins (``tsgm phantom --twins_out``): the lesions are drawn from their own random stream, so every tumour
subject can be rendered a second time without lesions and without mass effect, with identical anatomy,
deformation, confounders, bias field, gain and noise. Only the ceiling rows of the evaluation read them.

Same ``seed`` -> byte-identical files (subject ``i`` depends only on ``seed`` and ``i``; gzip mtime 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from tsgm_components.data.brats import MODALITIES
from tsgm_components.io import atomic_dir, check_not_over_inputs

#: Output grid and geometry of BraTS2020 (SRI24 space): 240x240x155 at 1 mm, LPS-like voxel axes.
SHAPE = (240, 240, 155)
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 1.0, 0], [0, 0, 0, 1]])

#: Relative intensity of each tissue per contrast (WM on T1 = 0.80). Columns follow TISSUES.
#: T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF suppressed, oedema and white matter hyperintensities
#: bright, necrosis near-iso; T1ce: like T1 with a bright enhancing rim.
TISSUES = ("csf", "gm", "wm", "necrosis", "enhancing", "oedema", "wm_hyperintensity")
TISSUE_TABLE: dict[str, tuple[float, ...]] = {
    "t1": (0.25, 0.55, 0.80, 0.20, 0.55, 0.48, 0.62),
    "t1ce": (0.27, 0.57, 0.80, 0.22, 1.15, 0.50, 0.64),
    "t2": (1.00, 0.62, 0.42, 0.95, 0.70, 0.85, 0.80),
    "flair": (0.15, 0.50, 0.42, 0.40, 0.75, 0.95, 0.92),
}

#: File in a twins folder that says what it holds.
TWINS_RECORD = "twins.json"
#: The generation record next to the subjects of a phantom dataset.
PHANTOM_RECORD = "phantom.json"
#: The NIfTI header description of every phantom volume (real scans never carry it).
PHANTOM_DESCRIPTION = b"tsgm phantom"

# Crop of the output grid that holds the (deformed) brain; everything outside it is background.
_CROP = (slice(30, 210), slice(10, 230), slice(0, 155))
_CROP_SHAPE = tuple(s.stop - s.start for s in _CROP)
# Brain centre in template voxels (MNI152 1 mm, RAS) and in output voxels; output i/j axes are flipped.
_TEMPLATE_CENTRE = np.array([98.0, 117.0, 77.0])
_OUTPUT_CENTRE = np.array([119.5, 119.5, 77.0])
_FLIP = np.diag([-1.0, -1.0, 1.0])
# Overlapping lesions: enhancing > necrosis > oedema > background (indexed by label value).
_LABEL_PRIORITY = np.array([0, 2, 1, 0, 3])


@dataclass(frozen=True)
class PhantomConfig:
    """Generation parameters (recorded in ``phantom.json`` next to the subjects)."""

    n_subjects: int = 40
    seed: int = 0
    healthy_fraction: float = 0.25
    #: Probability that a tumour subject has a second, smaller lesion.
    second_lesion_probability: float = 0.3
    #: Range of the axial index of the main lesion centre (the processed range is 80-128).
    lesion_z_range: tuple[int, int] = (75, 135)
    #: Core radius range in mm, drawn log-uniformly (small lesions included).
    core_radius_mm: tuple[float, float] = (4.0, 20.0)
    #: Labelled oedema radius as a multiple of the core radius.
    oedema_factor: tuple[float, float] = (1.5, 2.8)
    #: How far the oedema's intensity moves towards TISSUE_TABLE's oedema (1: all the way).
    oedema_strength: tuple[float, float] = (0.75, 1.0)
    #: Radius at which the oedema's contrast is half gone, as a share of the labelled oedema radius: the labelled
    #: margin beyond it is infiltrated but nearly invisible on FLAIR/T2.
    visible_oedema_fraction: tuple[float, float] = (1.0, 1.1)
    #: Width of the contrast's fade at that radius (normalised distance units): graded, not a sharp edge.
    oedema_margin_width: float = 0.12
    #: Share of the oedema's contrast that a smooth random field can take away (patchy infiltration).
    oedema_patchiness: float = 0.2
    #: Strength range of the periventricular caps (healthy FLAIR/T2 hyperintensities).
    cap_strength: tuple[float, float] = (0.4, 1.0)
    #: Number range of small white-matter hyperintensities per subject (upper bound exclusive).
    n_hyperintensities: tuple[int, int] = (2, 14)
    #: Rician noise std as a fraction of the mean tissue intensity of each contrast.
    noise_range: tuple[float, float] = (0.02, 0.045)
    deformation_mm: float = 2.5
    rotation_deg: float = 4.0
    scale_range: tuple[float, float] = (0.93, 1.05)

    def __post_init__(self) -> None:
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {self.n_subjects}")
        if not 0.0 <= self.healthy_fraction <= 1.0:
            raise ValueError(f"healthy_fraction must be in [0, 1], got {self.healthy_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def subject_id(index: int) -> str:
    """BraTS2020 training-style id of subject ``index`` (0-based): ``BraTS20_Training_001``, ..."""
    return f"BraTS20_Training_{index + 1:03d}"


def healthy_subjects(cfg: PhantomConfig) -> list[int]:
    """Indices of the healthy subjects: ``round(n * healthy_fraction)`` (at least one if the fraction is > 0)."""
    n_healthy = int(round(cfg.n_subjects * cfg.healthy_fraction))
    if cfg.healthy_fraction > 0:
        n_healthy = max(1, n_healthy)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2**31 - 1]))
    return sorted(rng.choice(cfg.n_subjects, size=min(n_healthy, cfg.n_subjects), replace=False).tolist())


@functools.lru_cache(maxsize=1)
def _template_maps() -> dict[str, np.ndarray]:
    """MNI152 maps (197x233x189, float32): csf, gm, wm, a periventricular-cap propensity map and the brain mask."""
    from nilearn import datasets  # nilearn is slow to import; only the phantom needs it

    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    # Ventricles: CSF deep inside the brain. Caps: white matter next to them, strongest at the horns'
    # tips in real scans; here a smooth shell around the ventricles, modulated per subject.
    depth = ndi.distance_transform_edt(mask > 0.5)
    ventricles = ((csf > 0.5) & (depth > 16)).astype(np.float32)
    shell = ndi.gaussian_filter(ventricles, 3.0)
    periventricular = np.clip(shell / max(shell.max(), 1e-6) * 3.0, 0, 1) * (1 - ventricles) * wm
    return {"csf": csf, "gm": gm, "wm": wm, "periventricular": periventricular.astype(np.float32), "brain": mask}


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: float) -> np.ndarray:
    """Smooth random field of unit std (float32, ``shape``): Gaussian-RBF control grid with ``spacing`` voxels.

    Separable: the 3D field is three small matrix products, far cheaper than filtering a noise volume.
    """
    bases = []
    for length in shape:
        n_ctrl = int(np.ceil(length / spacing)) + 3
        centres = np.linspace(-spacing, length - 1 + spacing, n_ctrl)
        x = np.arange(length)[:, None]
        bases.append(np.exp(-0.5 * ((x - centres[None]) / spacing) ** 2).astype(np.float32))
    coeffs = rng.standard_normal(tuple(b.shape[1] for b in bases)).astype(np.float32)
    field = np.einsum("ip,pqr->iqr", bases[0], coeffs)
    field = np.einsum("jq,iqr->ijr", bases[1], field)
    field = np.einsum("kr,ijr->ijk", bases[2], field)  # not BLAS matmul: its threads stall on a busy machine
    sample = field[::3, ::3, ::3]  # the field is smooth: a subsample gives its moments
    return (field - sample.mean()) / max(float(sample.std()), 1e-6)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sampling_coordinates(rng: np.random.Generator, cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Template voxel coordinates (3, *crop) of each output crop voxel, and the linear map output->template."""
    angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3))
    scales = rng.uniform(*cfg.scale_range, 3)
    shift = rng.uniform(-3.0, 3.0, 3)
    # template = C_t + F (R S^-1 (output - C_o)) + shift + deformation; S > 1 makes the output brain larger.
    linear = _FLIP @ _rotation(angles) @ np.diag(1.0 / scales)
    axes = [np.arange(s.start, s.stop, dtype=np.float64) - c for s, c in zip(_CROP, _OUTPUT_CENTRE)]
    coords = np.empty((3, *_CROP_SHAPE), dtype=np.float32)
    for row in range(3):
        offset = _TEMPLATE_CENTRE[row] + shift[row]
        coords[row] = (
            (linear[row, 0] * axes[0] + offset)[:, None, None] + (linear[row, 1] * axes[1])[None, :, None] + (linear[row, 2] * axes[2])[None, None, :]
        )
        coords[row] += cfg.deformation_mm * smooth_field(rng, _CROP_SHAPE, spacing=24.0)
    return coords, linear


def _warp(maps: dict[str, np.ndarray], coords: np.ndarray, where: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Trilinear samples of each template map at ``coords`` (3, *shape); only at ``where`` (bool) if given."""
    if where is None:
        return {k: ndi.map_coordinates(v, coords, order=1, prefilter=False, cval=0.0) for k, v in maps.items()}
    points = coords[:, where]
    warped = {}
    for key, value in maps.items():
        warped[key] = np.zeros(where.shape, np.float32)
        warped[key][where] = ndi.map_coordinates(value, points, order=1, prefilter=False, cval=0.0)
    return warped


def _brain_region(brain: np.ndarray, coords: np.ndarray, step: int = 4) -> np.ndarray:
    """Bool mask of output voxels that may be brain: the template brain sampled every ``step`` voxels, dilated.

    Sampling the maps only there skips the ~60 % of the crop that is certainly background.
    """
    coarse = ndi.map_coordinates(brain, coords[:, ::step, ::step, ::step], order=1, prefilter=False) > 0
    coarse = ndi.binary_dilation(coarse, iterations=1)
    full = coarse.repeat(step, 0).repeat(step, 1).repeat(step, 2)
    return full[tuple(slice(0, n) for n in coords.shape[1:])]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@dataclass
class _Lesion:
    centre: np.ndarray  # output crop voxel coordinates
    core_radius: float
    oedema_factor: float
    rim_fraction: float  # share of the core radius that enhances (0: non-enhancing lesion)
    oedema_strength: float  # how far oedema intensity moves from normal tissue towards TISSUE_TABLE oedema
    visible_fraction: float  # radius of the FLAIR/T2-visible oedema as a share of the labelled oedema radius
    mass_effect: float

    def box(self) -> tuple[slice, ...]:
        half = self.core_radius * self.oedema_factor * 1.5 + 4
        return tuple(slice(max(0, int(c - half)), min(n, int(np.ceil(c + half)) + 1)) for c, n in zip(self.centre, _CROP_SHAPE))


def _draw_lesions(rng: np.random.Generator, cfg: PhantomConfig, wm: np.ndarray) -> list[_Lesion]:
    n_lesions = 1 + int(rng.random() < cfg.second_lesion_probability)
    lesions = []
    for number in range(n_lesions):
        # The main lesion is centred near the processed slices; a second one may lie anywhere.
        z_low, z_high = cfg.lesion_z_range if number == 0 else (40, 140)
        candidates = np.argwhere(wm[:, :, z_low:z_high] > 0.7)
        centre = candidates[rng.integers(len(candidates))].astype(np.float64) + [0, 0, z_low]
        # log-uniform: small lesions are as common per octave of size as large ones (BraTS has both)
        low, high = np.log(cfg.core_radius_mm)
        radius = float(np.exp(rng.uniform(low, high))) * (0.6 if number else 1.0)
        rim = 0.0 if rng.random() < 0.2 else (1.0 if radius < 7 else rng.uniform(0.3, 0.6))
        lesions.append(
            _Lesion(
                centre=centre,
                core_radius=radius,
                oedema_factor=rng.uniform(*cfg.oedema_factor),
                rim_fraction=rim,
                oedema_strength=rng.uniform(*cfg.oedema_strength),
                visible_fraction=rng.uniform(*cfg.visible_oedema_fraction),
                mass_effect=rng.uniform(0.2, 0.45),
            )
        )
    return lesions


def _lesion_fields(rng: np.random.Generator, lesion: _Lesion, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised distances to the centre (core, oedema) on ``box``: < 1 inside, irregular borders; and a smooth
    field in [0, 1] that modulates how much of the oedema's contrast shows (patchy infiltration)."""
    grid = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij")
    offsets = [g - c for g, c in zip(grid, lesion.centre)]
    distance = np.sqrt(sum(o * o for o in offsets))
    shape = distance.shape
    core = distance / lesion.core_radius + 0.22 * smooth_field(rng, shape, max(2.0, lesion.core_radius / 2))
    oedema_radius = lesion.core_radius * lesion.oedema_factor
    oedema = distance / oedema_radius + 0.3 * smooth_field(rng, shape, max(3.0, oedema_radius / 2.5))
    patches = _sigmoid(1.5 * smooth_field(rng, shape, max(3.0, oedema_radius / 3)))
    return core, oedema, patches


def _apply_mass_effect(coords: np.ndarray, linear: np.ndarray, lesion: _Lesion, box: tuple[slice, ...]) -> None:
    """Tissue at output x comes from x - g(|x - c|)(x - c) (closer to the centre): tissue is pushed outward."""
    grid = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij")
    offsets = np.stack([g - c for g, c in zip(grid, lesion.centre)])
    distance2 = (offsets**2).sum(0)
    pull = lesion.mass_effect * np.exp(-0.5 * distance2 / (1.3 * lesion.core_radius) ** 2)
    displacement = np.einsum("ab,b...->a...", linear.astype(np.float32), offsets * pull)
    coords[(slice(None), *box)] -= displacement


def _blobs(rng: np.random.Generator, wm: np.ndarray, count: int) -> np.ndarray:
    """Soft white-matter hyperintensities (radius 1.5-6 mm), fraction map on the crop."""
    out = np.zeros(wm.shape, np.float32)
    candidates = np.argwhere(wm[:, :, 60:140] > 0.8) + [0, 0, 60]
    for centre in candidates[rng.integers(len(candidates), size=count)]:
        radius = rng.uniform(1.5, 6.0)
        box = tuple(slice(max(0, int(c - radius - 3)), min(n, int(c + radius + 4))) for c, n in zip(centre, wm.shape))
        grid = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        out[box] = np.maximum(out[box], rng.uniform(0.7, 1.0) * _sigmoid((radius - distance) / 0.7))
    return out


@dataclass
class PhantomSubject:
    """One generated subject on the BraTS grid (240, 240, 155).

    volumes: modality -> int16 intensities (0 outside the brain); seg: uint8 labels {0, 1, 2, 4};
    tissue: uint8 dominant normal tissue (0 background, 1 CSF, 2 GM, 3 WM), for checks only (not written);
    lesion_region: bool, the boxes around the lesions where lesions and their mass effect may change voxels
    (all False without lesions); outside it a subject and its healthy twin are identical.
    """

    volumes: dict[str, np.ndarray]
    seg: np.ndarray
    tissue: np.ndarray
    lesion_region: np.ndarray


@dataclass
class _Appearance:
    """Everything random about a subject's images except its lesions, drawn before them (one draw serves the
    subject and its healthy twin). Per-modality entries are keyed by modality; fields are on the crop."""

    hyper: np.ndarray  # healthy FLAIR/T2 hyperintensity fraction (caps and blobs), before white-matter weighting
    patchy: np.ndarray
    means: dict[str, np.ndarray]
    extra: dict[str, np.float32]  # FLAIR CSF-edge brightness, T1ce vessel brightness
    bias: dict[str, np.ndarray]
    sigma: dict[str, np.float32]
    noise: dict[str, tuple[np.ndarray, np.ndarray]]  # real and imaginary noise on the sampling region
    gain: dict[str, np.float32]


def _draw_appearance(rng: np.random.Generator, maps: dict[str, np.ndarray], region: np.ndarray, cfg: PhantomConfig) -> _Appearance:
    patchy = smooth_field(rng, _CROP_SHAPE, 12.0)
    caps = np.clip(rng.uniform(*cfg.cap_strength) * maps["periventricular"] * (1 + 0.6 * patchy), 0, 1)
    hyper = np.maximum(caps, _blobs(rng, maps["wm"], int(rng.integers(*cfg.n_hyperintensities))))
    means, extra, bias, sigma, noise, gain = {}, {}, {}, {}, {}, {}
    n_region = int(region.sum())
    for modality in MODALITIES:
        means[modality] = np.asarray(TISSUE_TABLE[modality]) * rng.normal(1.0, 0.04, len(TISSUES))  # subject contrast
        if modality == "flair":  # incomplete CSF suppression at tissue edges
            extra[modality] = np.float32(rng.uniform(0.05, 0.2))
        if modality == "t1ce":  # enhancing vessels / choroid plexus along CSF spaces
            extra[modality] = np.float32(rng.uniform(0.1, 0.3))
        bias[modality] = np.exp(np.float32(0.12) * smooth_field(rng, _CROP_SHAPE, 50.0))
        sigma[modality] = np.float32(rng.uniform(*cfg.noise_range) * np.mean(TISSUE_TABLE[modality]))
        noise[modality] = (
            rng.standard_normal(n_region, dtype=np.float32),
            rng.standard_normal(n_region, dtype=np.float32),
        )
        gain[modality] = np.float32(rng.uniform(400.0, 1200.0))  # scanner scale: arbitrary units differ between subjects
    return _Appearance(hyper, patchy, means, extra, bias, sigma, noise, gain)


@dataclass
class _LesionMaps:
    """Tissue fractions (on the crop) the lesions add, their labels, and the region they may change."""

    necrosis: np.ndarray
    enhancing: np.ndarray
    oedema: np.ndarray
    labels: np.ndarray
    region: np.ndarray

    @classmethod
    def none(cls) -> "_LesionMaps":
        zeros = np.zeros(_CROP_SHAPE, np.float32)
        return cls(zeros, zeros, zeros, np.zeros(_CROP_SHAPE, np.uint8), np.zeros(_CROP_SHAPE, bool))


def _add_lesions(
    rng: np.random.Generator,
    cfg: PhantomConfig,
    template: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    coords: np.ndarray,
    linear: np.ndarray,
) -> tuple[dict[str, np.ndarray], _LesionMaps]:
    """Draw the lesions from ``rng`` (their own stream) and return (tissue maps with mass effect, lesion maps).

    The labelled oedema is the region where infiltration reaches half strength; its FLAIR/T2 contrast fades
    towards the margin (``visible_fraction``) and is patchy, so part of the labelled extent is nearly invisible,
    as at the infiltrative margin of a glioma, and the label is no iso-contour of the FLAIR intensity.
    """
    maps = {k: v.copy() for k, v in maps.items()}
    coords = coords.copy()
    out = _LesionMaps(*(np.zeros(_CROP_SHAPE, np.float32) for _ in range(3)), np.zeros(_CROP_SHAPE, np.uint8), np.zeros(_CROP_SHAPE, bool))
    for lesion in _draw_lesions(rng, cfg, maps["wm"]):
        box = lesion.box()
        out.region[box] = True
        _apply_mass_effect(coords, linear, lesion, box)
        for key, value in _warp(template, coords[(slice(None), *box)]).items():
            maps[key][box] = value
        core_d, oedema_d, patches = _lesion_fields(rng, lesion, box)
        core = _sigmoid((1.0 - core_d) / 0.06)  # soft border: partial volume
        enhancing_part = np.zeros_like(core)
        if lesion.rim_fraction > 0:
            enhancing_part = core * _sigmoid((core_d - (1.0 - lesion.rim_fraction)) / 0.05)
        # Oedema spreads along white matter and spares CSF.
        tissue = np.clip(maps["wm"][box] + 0.4 * maps["gm"][box], 0, 1)
        in_tissue = np.clip(1.6 * tissue - 0.3, 0, 1) * (1 - core)
        spread = _sigmoid((1.0 - oedema_d) / 0.07) * in_tissue
        visible = _sigmoid((lesion.visible_fraction - oedema_d) / cfg.oedema_margin_width) * in_tissue
        contrast = lesion.oedema_strength * visible * (1.0 - cfg.oedema_patchiness * (1.0 - patches))
        out.necrosis[box] = np.maximum(out.necrosis[box], core - enhancing_part)
        out.enhancing[box] = np.maximum(out.enhancing[box], enhancing_part)
        out.oedema[box] = np.maximum(out.oedema[box], contrast)
        labels = np.where(spread > 0.5, 2, 0)
        labels = np.where(core > 0.5, np.where(enhancing_part > 0.5 * core, 4, 1), labels)
        old = out.labels[box]  # where lesions overlap, the core of one beats the oedema of the other
        out.labels[box] = np.where(_LABEL_PRIORITY[labels] > _LABEL_PRIORITY[old], labels, old)
    return maps, out


def _render(maps: dict[str, np.ndarray], lesions: _LesionMaps, look: _Appearance, region: np.ndarray) -> PhantomSubject:
    """Mix the contrasts of one subject from its tissue maps, lesions and appearance."""
    brain = ((maps["csf"] + maps["gm"] + maps["wm"]) > 0.5) & region
    crop_labels = np.where(brain, lesions.labels, 0).astype(np.uint8)
    # From here on only brain voxels (1-D vectors): the rest of the crop stays background.
    at = {k: v[brain] for k, v in maps.items()}
    necrosis, enhancing, oedema = lesions.necrosis[brain], lesions.enhancing[brain], lesions.oedema[brain]
    hyper = look.hyper[brain] * at["wm"]
    normal = 1.0 - np.clip(necrosis + enhancing + oedema, 0, 1)
    fractions = {
        "csf": at["csf"] * normal,
        "gm": at["gm"] * normal,
        "wm": (at["wm"] - hyper) * normal,
        "necrosis": necrosis,
        "enhancing": enhancing,
        "oedema": oedema,
        "wm_hyperintensity": hyper * normal,
    }
    csf_edge = 4 * at["csf"] * (1 - at["csf"])  # partial-volume CSF boundary (sulci, ventricle walls)
    vessels = csf_edge * (look.patchy[brain] > 1.0)
    in_region = brain[region]  # the noise vectors cover the sampling region; take the brain's entries
    volumes = {}
    for modality in MODALITIES:
        intensity = sum(np.float32(m) * fractions[t] for m, t in zip(look.means[modality], TISSUES))
        if modality == "flair":
            intensity += look.extra[modality] * csf_edge
        if modality == "t1ce":
            intensity += look.extra[modality] * vessels
        intensity *= look.bias[modality][brain]
        noise_real, noise_imaginary = (n[in_region] for n in look.noise[modality])
        real = intensity + look.sigma[modality] * noise_real
        imaginary = look.sigma[modality] * noise_imaginary
        crop = np.zeros(_CROP_SHAPE, np.int16)
        crop[brain] = np.clip(np.rint(look.gain[modality] * np.sqrt(real * real + imaginary * imaginary)), 1, 32767)
        volumes[modality] = np.zeros(SHAPE, np.int16)
        volumes[modality][_CROP] = crop
    seg = np.zeros(SHAPE, np.uint8)
    seg[_CROP] = crop_labels
    dominant = np.where(at["wm"] >= np.maximum(at["gm"], at["csf"]), 3, np.where(at["gm"] >= at["csf"], 2, 1))
    crop = np.zeros(_CROP_SHAPE, np.uint8)
    crop[brain] = dominant
    tissue = np.zeros(SHAPE, np.uint8)
    tissue[_CROP] = crop
    lesion_region = np.zeros(SHAPE, bool)
    lesion_region[_CROP] = lesions.region
    return PhantomSubject(volumes=volumes, seg=seg, tissue=tissue, lesion_region=lesion_region)


def generate_subject_and_twin(index: int, cfg: PhantomConfig) -> tuple[PhantomSubject, PhantomSubject]:
    """Subject ``index`` with lesions, and its healthy twin: the same anatomy, deformation, confounders, bias
    field, gain and noise, without lesions and without mass effect. The lesions come from their own random
    stream, so outside ``subject.lesion_region`` the two are identical voxel for voxel."""
    subject, twin = _generate(index, cfg, with_lesions=True, with_twin=True)
    assert twin is not None
    return subject, twin


def generate_subject(index: int, cfg: PhantomConfig, with_lesions: bool) -> PhantomSubject:
    """Generate subject ``index`` (with or without lesions); depends only on ``cfg``, ``index`` and ``with_lesions``."""
    return _generate(index, cfg, with_lesions=with_lesions, with_twin=False)[0]


def _generate(index: int, cfg: PhantomConfig, with_lesions: bool, with_twin: bool) -> tuple[PhantomSubject, PhantomSubject | None]:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    lesion_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 1]))
    template = dict(_template_maps())
    brain_template = template.pop("brain")
    coords, linear = _sampling_coordinates(rng, cfg)
    region = _brain_region(brain_template, coords)
    maps = _warp(template, coords, where=region)
    look = _draw_appearance(rng, maps, region, cfg)
    twin = _render(maps, _LesionMaps.none(), look, region) if with_twin or not with_lesions else None
    if not with_lesions:
        return twin, None
    lesioned, lesions = _add_lesions(lesion_rng, cfg, template, maps, coords, linear)
    return _render(lesioned, lesions, look, region), (twin if with_twin else None)


def save_nifti_deterministic(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as ``.nii.gz`` with the BraTS affine; gzip header without time or name (reproducible)."""
    image = nib.Nifti1Image(array, AFFINE)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = PHANTOM_DESCRIPTION  # how inference tells the phantom from real scans
    image.header.set_qform(AFFINE, code=1)
    image.header.set_sform(AFFINE, code=1)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
        gz.write(image.to_bytes())


def _write_subject(job: tuple[int, PhantomConfig, bool, Path, Path | None]) -> str:
    """Generate subject ``index`` into ``folder/<id>/`` (and its healthy twin into ``twins/<id>/``); one-line summary."""
    index, cfg, healthy, folder, twins = job
    name = subject_id(index)
    if healthy:
        subject, twin = generate_subject(index, cfg, with_lesions=False), None
    elif twins is not None:
        subject, twin = generate_subject_and_twin(index, cfg)
    else:
        subject, twin = generate_subject(index, cfg, with_lesions=True), None
    (folder / name).mkdir()
    for modality, volume in subject.volumes.items():
        save_nifti_deterministic(volume, folder / name / f"{name}_{modality}.nii.gz")
    save_nifti_deterministic(subject.seg, folder / name / f"{name}_seg.nii.gz")
    if twin is not None:
        (twins / name).mkdir()
        for modality, volume in twin.volumes.items():
            save_nifti_deterministic(volume, twins / name / f"{name}_{modality}.nii.gz")
    return f"{name}: " + ("healthy" if healthy else f"tumour, {int((subject.seg > 0).sum())} voxels")


def make_phantom(
    out: str | Path,
    cfg: PhantomConfig,
    overwrite: bool = False,
    workers: int = 1,
    verbose: bool = True,
    twins_out: str | Path | None = None,
) -> Path:
    """Write the phantom dataset to ``out`` (BraTS layout + ``phantom.json`` with the parameters), atomically.

    ``twins_out``: also write the healthy twin of every tumour subject there (``<id>/<id>_<mod>.nii.gz``, no
    segmentation; healthy subjects are their own twins and are not copied), outside the dataset folder so that no
    method finds them. ``workers`` > 1 generates subjects in parallel processes; the files do not depend on it.
    """
    healthy = set(healthy_subjects(cfg))
    start = time.perf_counter()
    if twins_out is not None:
        check_not_over_inputs(twins_out, [out])
        check_not_over_inputs(out, [twins_out])
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out, overwrite=overwrite))
        twins_tmp = None if twins_out is None else stack.enter_context(atomic_dir(twins_out, overwrite=overwrite))
        jobs = [(index, cfg, index in healthy, tmp, twins_tmp) for index in range(cfg.n_subjects)]
        _template_maps()  # loaded once; forked workers share it
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                summaries = pool.imap(_write_subject, jobs)
                for summary in summaries:
                    if verbose:
                        print(f"  {summary}  [{time.perf_counter() - start:.1f} s]", flush=True)
        else:
            for job in jobs:
                summary = _write_subject(job)
                if verbose:
                    print(f"  {summary}  [{time.perf_counter() - start:.1f} s]", flush=True)
        (tmp / PHANTOM_RECORD).write_text(json.dumps(phantom_record(cfg), indent=2) + "\n")
        if twins_tmp is not None:
            record = {
                "what": "healthy twins of the tumour subjects of the phantom dataset: same anatomy, deformation, "
                "confounders, bias field, gain and noise, no lesions and no mass effect. For the evaluation's "
                "ceiling rows only; healthy subjects are their own twins.",
                "dataset": str(Path(out).resolve()),
                "subjects": [subject_id(i) for i in range(cfg.n_subjects) if i not in healthy],
                "phantom": phantom_record(cfg),
            }
            (twins_tmp / TWINS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


def phantom_record(cfg: PhantomConfig) -> dict[str, Any]:
    """What defines a phantom dataset: generator, parameters, healthy subjects and the tissue table."""
    return {
        "generator": "tsgm_components.data.phantom",
        "parameters": cfg.to_dict(),
        "subjects": [subject_id(i) for i in range(cfg.n_subjects)],
        "healthy_subjects": [subject_id(i) for i in healthy_subjects(cfg)],
        "tissue_table": {"tissues": list(TISSUES), **{m: list(v) for m, v in TISSUE_TABLE.items()}},
    }
