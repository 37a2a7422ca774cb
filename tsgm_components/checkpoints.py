"""Checkpoints that know what they were made for, and loading them with clear errors: one contract for both stages.

Every checkpoint carries a ``model_spec`` entry (:class:`CheckpointSpec`): a VE-JP one a :class:`ModelSpec`
(preprocessing incl. image size, network arguments, σ range), a CycleGAN one a :class:`CycleGANSpec` (preprocessing,
generator and discriminator arguments). Loading weights into a network built from a config that disagrees raises
:class:`TsgmInputError` naming the checkpoint and every differing setting, instead of a shape-mismatch traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from tsgm_components.data.preprocessing import PreprocessConfig
from tsgm_components.errors import TsgmInputError

SPEC_KEY = "model_spec"
logger = logging.getLogger(__name__)


#: Weight entries tried in order: the exported EMA model (``model.pt``), a full training checkpoint's EMA, raw weights.
WEIGHT_KEYS = ("model", "network_ema", "network")


def _plain(value: Any) -> Any:
    """JSON-normal form (tuples -> lists, numpy/torch scalars -> Python) so specs compare equal after a round trip."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else list(v)))


class CheckpointSpec:
    """What a checkpoint was made for, stored in it as ``model_spec``: the one checkpoint contract of both stages.

    ``spec``: section -> settings (dicts compared key by key, other values whole), in JSON-normal form; a
    ``preprocess`` section is a ``PreprocessConfig`` dict. ``state_dict``/``load_state_dict`` let MONAI's
    ``CheckpointSaver`` store it next to the weights and ``CheckpointLoader`` refuse a resume into another model;
    :meth:`check` names the checkpoint and every differing setting. Subclasses set the sections and ``bundle``.
    """

    #: the bundle whose checkpoints carry this spec (named in the errors)
    bundle = ""

    def __init__(self, sections: Mapping[str, Any]):
        sections = dict(sections)
        if sections.get("preprocess") is not None:
            preprocess = sections["preprocess"]
            sections["preprocess"] = (preprocess if isinstance(preprocess, PreprocessConfig) else PreprocessConfig.from_dict(preprocess)).to_dict()
        self.spec: dict[str, Any] = _plain({k: v for k, v in sections.items() if v is not None})

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.spec))

    def matches(self, saved: Any) -> bool:
        """Whether ``saved`` is a spec of this kind at all (a stored spec has this spec's required sections)."""
        return isinstance(saved, Mapping)

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """``"section.key: checkpoint X, config Y"`` for every setting of this spec that ``saved`` (a stored spec) differs in."""
        saved = _plain(dict(saved))
        if isinstance(saved.get("preprocess"), Mapping):  # a record of an older version compares by what it means
            saved["preprocess"] = _plain(PreprocessConfig.from_dict(saved["preprocess"]).to_dict())
        found = []
        for section, mine in self.spec.items():
            theirs = saved.get(section)
            if isinstance(mine, dict):
                theirs = theirs if isinstance(theirs, Mapping) else {}
                found += [
                    f"{section}.{key}: checkpoint {theirs.get(key)!r}, config {mine.get(key)!r}"
                    for key in sorted(set(mine) | set(theirs))
                    if mine.get(key) != theirs.get(key)
                ]
            elif mine != theirs:
                found.append(f"{section}: checkpoint {theirs!r}, config {mine!r}")
        return found

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        found = self.differences(state)
        if found:
            raise ValueError("checkpoint was made for another model: " + "; ".join(found))

    def check(self, saved: Mapping[str, Any] | None, checkpoint: str | Path) -> None:
        """Raise TsgmInputError naming ``checkpoint`` if its stored spec is missing, of another kind, or differs."""
        if not self.matches(saved):
            raise TsgmInputError(checkpoint, f"no '{SPEC_KEY}' entry of this kind: not a checkpoint of the {self.bundle} bundle")
        found = self.differences(saved)
        if found:
            raise TsgmInputError(
                checkpoint,
                "made for a different model than this config: "
                + "; ".join(found)
                + " (use the same config overrides, e.g. configs/cpu.yaml, for training and inference)",
            )


class ModelSpec(CheckpointSpec):
    """A score model's spec: ``preprocess`` (PreprocessConfig dict), ``network`` (ScoreUNet kwargs), ``sde``
    (``sigma_min``, ``sigma_max``)."""

    bundle = "vejp_anomaly"

    def __init__(self, preprocess: PreprocessConfig | Mapping[str, Any], network: Mapping[str, Any], sde: Mapping[str, Any]):
        super().__init__({"preprocess": preprocess, "network": dict(network), "sde": dict(sde)})

    def matches(self, saved: Any) -> bool:
        return is_score_spec(saved)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.spec["preprocess"])

    @property
    def network(self) -> dict[str, Any]:
        """``ScoreUNet`` keyword arguments."""
        return dict(self.spec["network"])

    @property
    def sde(self) -> dict[str, Any]:
        """``sigma_min``, ``sigma_max`` of the VE SDE the model was trained for."""
        return dict(self.spec["sde"])


class CycleGANSpec(CheckpointSpec):
    """A CycleGAN's spec: the ``preprocess`` of its training slices, the ``generator`` config (``ResnetGenerator``
    arguments) and, for training checkpoints, the ``discriminator`` config. ``preprocess`` or ``discriminator`` None:
    not checked (inference has no discriminators). A generator is never applied to data prepared otherwise than its
    training data (``translation.load_generator``)."""

    bundle = "cyclegan_brats"

    def __init__(
        self,
        preprocess: PreprocessConfig | Mapping[str, Any] | None,
        generator: Mapping[str, int],
        discriminator: Mapping[str, int] | None = None,
    ):
        super().__init__({"generator": dict(generator), "preprocess": preprocess, "discriminator": discriminator})

    def matches(self, saved: Any) -> bool:
        return isinstance(saved, Mapping) and "generator" in saved


def is_score_spec(spec: Any) -> bool:
    """Whether a stored ``model_spec`` is a score model's (a CycleGAN's also records preprocessing, not an SDE)."""
    return isinstance(spec, Mapping) and "network" in spec and "sde" in spec


def read_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict (``weights_only``: data, never code); TsgmInputError if missing or unreadable."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise TsgmInputError(checkpoint, "checkpoint not found (train the bundle first or pass --checkpoint <file>)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors of truncated or foreign files
        raise TsgmInputError(checkpoint, f"cannot read checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise TsgmInputError(checkpoint, "not a checkpoint dictionary")
    return state


#: ``<stem>_provenance.json`` beside a shipped ``<stem>.pt``: how it was made, its SHA-256, the data it was trained on.
PROVENANCE_SUFFIX = "_provenance.json"
#: provenance ``data_kind`` values: what the weights were trained on
DATA_KINDS = ("phantom", "real")


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per (path, size, modification time): one detection checks its weights at several places."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_provenance(checkpoint: str | Path) -> dict[str, Any] | None:
    """The provenance record beside ``checkpoint`` (None for a file without one, e.g. your own training run), after
    checking that the file is the one it describes: TsgmInputError naming the file on a SHA-256 mismatch."""
    checkpoint = Path(checkpoint)
    path = checkpoint.with_name(checkpoint.stem + PROVENANCE_SUFFIX)
    if not path.is_file():
        return None
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TsgmInputError(path, f"unreadable provenance record ({type(error).__name__}: {error})") from error
    expected = provenance.get("sha256")
    stat = checkpoint.stat()
    if expected and _sha256(checkpoint.resolve(), stat.st_size, stat.st_mtime_ns) != expected:
        raise TsgmInputError(
            checkpoint,
            f"the file differs from the one {path.name} records (SHA-256 mismatch: damaged or "
            "replaced); restore it from the repository (git checkout -- <file>)",
        )
    return provenance


def weights_data_kind(checkpoint: str | Path) -> str | None:
    """What the weights at ``checkpoint`` were trained on ("phantom" or "real", from their provenance), logged once;
    None without a provenance record."""
    provenance = checked_provenance(checkpoint)
    if provenance is None:
        logger.info("weights %s: no provenance record (trained data unknown)", checkpoint)
        return None
    logger.info("weights %s: trained on %s", checkpoint, provenance.get("trained_on", "unknown data"))
    kind = provenance.get("data_kind")
    return kind if kind in DATA_KINDS else None


def check_checkpoint(checkpoint: str | Path | None, spec: CheckpointSpec) -> str | None:
    """Check a checkpoint's spec against ``spec`` before a resume; returns the path (None passes through)."""
    if checkpoint is None:
        return None
    spec.check(read_checkpoint(checkpoint).get(SPEC_KEY), checkpoint)
    return str(checkpoint)


def load_score_weights(network: nn.Module, checkpoint: str | Path, spec: ModelSpec) -> nn.Module:
    """Load a checkpoint's EMA weights (``model`` or ``network_ema``; else ``network``) into ``network``.

    The checkpoint's ``model_spec`` must equal ``spec`` (the config's); otherwise TsgmInputError names the file
    and the differing settings; a shipped file must match the SHA-256 of its provenance (:func:`checked_provenance`).
    Returns ``network`` in eval mode.
    """
    state = read_checkpoint(checkpoint)
    checked_provenance(checkpoint)
    spec.check(state.get(SPEC_KEY), checkpoint)
    key = next((k for k in WEIGHT_KEYS if k in state), None)
    if key is None:
        raise TsgmInputError(checkpoint, f"no network weights (expected one of {WEIGHT_KEYS}, found {sorted(state)})")
    weights = dict(state[key])
    consume_prefix_in_state_dict_if_present(weights, "module.")  # saved from a DistributedDataParallel wrapper
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise TsgmInputError(checkpoint, f"weights '{key}' do not fit the network: {error}") from error
    return network.eval()


def initial_score_weights(network: nn.Module, checkpoint: str | Path | None, spec: "ModelSpec") -> nn.Module:
    """``network`` as training starts: as built (``checkpoint`` None), or with the weights of a finished model whose
    spec equals ``spec`` (fine-tuning, e.g. from the phantom-trained ``models/phantom.pt``), in train mode."""
    if checkpoint is None:
        return network
    return load_score_weights(network, checkpoint, spec).train()


def latest_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """Most recently written training checkpoint (``checkpoint_*.pt``: ``checkpoint_epoch=N.pt`` after an epoch,
    ``checkpoint_final.pt`` after a VE-JP run) in ``checkpoint_dir``, None if there is none: the resume point of
    both training bundles (and what ``tsgm demo`` looks for to resume an interrupted step)."""
    files = sorted(Path(checkpoint_dir).glob("checkpoint_*.pt"), key=lambda p: p.stat().st_mtime_ns)
    return str(files[-1]) if files else None


def resume_point(checkpoint_dir: str | Path, resume: bool) -> str | None:
    """The checkpoint to resume from; refuses to start afresh over existing checkpoints (they would be mixed)."""
    latest = latest_checkpoint(checkpoint_dir)
    if resume and latest is None:
        raise TsgmInputError(checkpoint_dir, "resume requested but there is no checkpoint (checkpoint_*.pt) here")
    if not resume and latest is not None:
        raise TsgmInputError(
            checkpoint_dir,
            "holds checkpoints of an earlier run: pass --resume True to continue it, or use another --work_dir",
        )
    return latest if resume else None


def read_model_spec(checkpoint: str | Path) -> ModelSpec:
    """The ``ModelSpec`` stored in a score-model checkpoint: what an inference config builds its network, σ range and
    preprocessing from, so one config serves checkpoints of every scale. TsgmInputError if there is none."""
    spec = read_checkpoint(checkpoint).get(SPEC_KEY)
    if not is_score_spec(spec) or "preprocess" not in spec:
        raise TsgmInputError(checkpoint, f"no score-model '{SPEC_KEY}' entry: not a checkpoint of the vejp_anomaly bundle")
    return ModelSpec(spec["preprocess"], spec["network"], spec["sde"])


def checkpoint_preprocess(checkpoint: str | Path, image_size: int) -> PreprocessConfig:
    """The preprocessing a checkpoint was trained with (inference applies exactly it); checks ``image_size``."""
    spec = read_checkpoint(checkpoint).get(SPEC_KEY)
    if not is_score_spec(spec) or "preprocess" not in spec:
        raise TsgmInputError(checkpoint, f"no score-model '{SPEC_KEY}' entry: not a checkpoint of the vejp_anomaly bundle")
    preprocess = PreprocessConfig.from_dict(spec["preprocess"])
    if preprocess.image_size != int(image_size):
        raise TsgmInputError(
            checkpoint,
            f"made for image_size={preprocess.image_size} but the config has image_size={image_size} "
            "(use the same config overrides, e.g. configs/cpu.yaml, for training and inference)",
        )
    return preprocess
