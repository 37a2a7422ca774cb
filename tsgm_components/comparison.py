"""``tsgm compare``: TSGM, its controls and baselines, and the peer methods of ``bundles/peer_methods`` in one table.

Each peer is trained on the same prepared training split as TSGM (every run id ``training*`` of its config, resumable),
detects the validation split once per candidate of its one tuned setting (``setting_key`` / ``setting_candidates``
of its config), keeps the candidate with the best validation volume Dice (the evaluation bundle's calibration of each
candidate, validation only), then detects the test split with it. The final evaluation calibrates every row on
validation and scores the test split once, like ``tsgm run``; the table is printed next to the paper's Table II.

Without ``dataset_dir`` the comparison runs on the demo's phantom (``tsgm demo``'s steps: TSGM and its controls with
the shipped phantom weights); with it, on a user's dataset (``tsgm run``'s steps: every model trained).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml

from tsgm_components.durations import training_estimate
from tsgm_components.pipeline import (
    BUNDLES,
    DEMO_SEED,
    SCALES,
    WEIGHT_SETS,
    Step,
    bundle_command,
    dataset_steps,
    demo_steps,
    pseudo_pairs_step,
    run_steps,
)

#: Table II's peers in the paper's order, then the peers users compare with today.
PEERS = ("vae", "fanogan", "dpm_classifier_free", "dpm_classifier", "anoddpm", "pddpm")
#: The paper's Table II, BraTS 2020 rows (per tumour slice, in %: DSC, AUPRC), to read a comparison against.
PAPER_TABLE_II_BRATS = {
    "cyclegan": (84.58, 86.45),
    "vae": (42.79, 57.54),
    "fanogan": (22.06, 44.08),
    "dpm_classifier_free": (60.19, 70.32),
    "dpm_classifier": (78.37, 81.95),
    "tsgm": (85.90, 86.84),
}
#: The paper's Table III, BraTS 2020 (%, per tumour slice, mean; its ± is not a spread over subjects): TSGM and
#: CycleGAN trained on FLAIR only, on T2 only, on the four modalities as separate single-channel samples (ensemble
#: weighted as in its Fig. 6) and as one four-channel sample.
PAPER_TABLE_III_BRATS = {
    "cyclegan": {"flair only": (70.95, 75.66), "t2 only": (55.97, 60.33), "single-channel": (84.58, 86.45), "multi-channel": (56.84, 66.51)},
    "tsgm": {"flair only": (58.58, 64.23), "t2 only": (67.88, 74.37), "single-channel": (85.90, 86.84), "multi-channel": (81.76, 84.22)},
}
COMPARISON_DIR = "comparison"  # in the work dir: the evaluation of every row
TABLE_III_DIR, TABLE_III_DETECTIONS = "table_iii", "tsgm_all_modalities"  # in the work dir (modalities.yaml's defaults)
FOUR_CHANNEL_DIR, FOUR_CHANNEL_DETECTIONS = "vejp_four_channel", "tsgm_four_channel"  # four_channel.yaml's, modalities.yaml's
UNCERTAINTY_DIR, FIGURE_8_SEEDS, FIGURE_8_CPU_LEVELS = "uncertainty", (0, 1, 2), 100  # Fig. 8: uncertainty.yaml's folder
SETTINGS_DIR = "peer_settings"  # in the work dir: each peer's candidate calibrations and the chosen setting
TRAINING_RUN = re.compile(r"training(_[a-z]+)?$")


def peer_configs(peer: str, scale: str) -> list[str]:
    """The peer's config files: ``<peer>.yaml`` (paper scale), with ``<peer>_cpu.yaml`` merged at the CPU scale."""
    return [f"{peer}.yaml", *([f"{peer}_cpu.yaml"] if scale == "cpu" else [])]


def peer_plan(peer: str) -> dict[str, Any]:
    """What the peer's config declares: its training run ids (in config order), the tuned setting and its candidates."""
    config = yaml.safe_load((BUNDLES / "peer_methods" / "configs" / f"{peer}.yaml").read_text())
    runs = [key for key, value in config.items() if TRAINING_RUN.match(key) and isinstance(value, list)]
    if not runs or "detecting" not in config:
        raise ValueError(f"bundles/peer_methods/configs/{peer}.yaml: a peer needs a 'training' and a 'detecting' run id")
    key = config.get("setting_key")
    return {"training_runs": runs, "setting_key": key, "candidates": list(config.get("setting_candidates") or []) if key else []}


def candidate_method(peer: str, value: Any) -> str:
    """Detection folder name of one candidate setting (``vae`` when the peer tunes nothing)."""
    return f"{peer}_{value}" if value is not None else peer


def candidate_calibration(work_dir: Path, peer: str, value: Any) -> Path:
    """The validation calibration of one candidate setting: ``W/peer_settings/<peer>/<method>/calibration.json``."""
    return work_dir / SETTINGS_DIR / peer / candidate_method(peer, value) / "calibration.json"


def chosen_setting(work_dir: Path, peer: str) -> dict[str, Any]:
    """The candidate with the best validation volume Dice (first on ties), from each candidate's validation calibration;
    recorded in ``W/peer_settings/<peer>/chosen.json``."""
    plan = peer_plan(peer)
    if not plan["candidates"]:
        return {"peer": peer, "setting_key": None, "value": None, "method": peer}
    calibrations = work_dir / SETTINGS_DIR / peer
    dice = {}
    for value in plan["candidates"]:
        record = json.loads(candidate_calibration(work_dir, peer, value).read_text())
        dice[str(value)] = float(record["validation_dice"])
    best = max(plan["candidates"], key=lambda value: dice[str(value)])
    chosen = {
        "peer": peer,
        "setting_key": plan["setting_key"],
        "value": best,
        "method": candidate_method(peer, best),
        "validation_dice": dice,
        "chosen_on": "validation",
    }
    (calibrations / "chosen.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


def peer_steps(work_dir: Path, peer: str, scale: str) -> list[Step]:
    """Training, validation detection per candidate, the candidates' calibration and the chosen setting's test detection."""
    plan, configs = peer_plan(peer), peer_configs(peer, scale)
    steps = []
    for run in plan["training_runs"]:
        stem = "model" if run == "training" else run.removeprefix("training_")
        folder = work_dir / peer
        steps.append(
            Step(
                f"{peer}: {run}",
                bundle_command(run, "peer_methods", configs, work_dir),
                folder / f"{stem}.pt",
                folder / ("checkpoints" if run == "training" else f"{stem}_checkpoints"),
            )
        )
    candidates = plan["candidates"] or [None]
    for value in candidates:
        setting = {} if value is None else {plan["setting_key"]: value}
        steps.append(
            Step(
                f"{peer} detection, validation" + ("" if value is None else f", {plan['setting_key']} = {value}"),
                bundle_command(
                    "detecting",
                    "peer_methods",
                    configs,
                    work_dir,
                    method=candidate_method(peer, value),
                    splits="['validation']",
                    skip_existing=True,
                    **setting,
                ),
                None,
            )
        )
    if plan["candidates"]:
        methods = [{"name": candidate_method(peer, v), "detection_dir": str(work_dir / "detections" / candidate_method(peer, v))} for v in candidates]
        steps.append(
            Step(
                f"{peer}: calibrate each {plan['setting_key']} on validation",
                bundle_command(
                    "calibrating",
                    "tsgm_evaluation",
                    ["evaluate.yaml", *SCALES[scale]["overlay"]],
                    work_dir,  # type: ignore[misc]
                    methods=methods,
                    calibration_dir=work_dir / SETTINGS_DIR / peer,
                    overwrite=True,
                ),
                # every candidate's calibration: a candidate added to the config calibrates again
                tuple(candidate_calibration(work_dir, peer, value) for value in candidates),
            )
        )

    def chosen_overrides() -> dict[str, object]:
        chosen = chosen_setting(work_dir, peer)
        return {"method": chosen["method"], **({} if chosen["value"] is None else {plan["setting_key"]: chosen["value"]})}

    steps.append(
        Step(
            f"{peer} detection, test (setting chosen on validation)",
            bundle_command("detecting", "peer_methods", configs, work_dir, splits="['test']", skip_existing=True),
            None,
            late_overrides=chosen_overrides,
        )
    )
    return steps


def table_iii_steps(
    work_dir: Path, checkpoint: Path, cyclegan_checkpoint: Path, scale: str, lesion_blend_threshold: float | None = None
) -> list[Step]:
    """The paper's Table III: TSGM detection of both splits with all four modalities reconstructed
    (``detections/tsgm_all_modalities``; TSGM's own test detection samples only the modalities its calibration
    weighs); the four-channel stage 2 (``four_channel.yaml``: the same pseudo-pairs, written here with
    ``cyclegan_checkpoint`` if the run has none, network layout and budget) trained and detected
    (``detections/tsgm_four_channel``); then the evaluation bundle's ``modalities.yaml`` report in ``W/table_iii``
    (each modality alone, equal and validation weights, for TSGM, its four-channel model and CycleGAN-only)."""
    overlay = list(SCALES[scale]["overlay"])  # type: ignore[arg-type]
    four_channel = work_dir / FOUR_CHANNEL_DIR / "model.pt"
    training_files = ["train.yaml", *overlay, "four_channel.yaml"]
    steps = [
        pseudo_pairs_step(work_dir, cyclegan_checkpoint, scale, lesion_blend_threshold),
        Step(
            "Table III: train the four-channel VE-JP score model",
            bundle_command("training", "vejp_anomaly", training_files, work_dir),
            four_channel,
            work_dir / FOUR_CHANNEL_DIR / "checkpoints",
            lambda: training_estimate(
                "score", [BUNDLES / "vejp_anomaly" / "configs" / name for name in training_files], work_dir / "prepared", scale
            ),
        ),
    ]
    for name, method, model in (("TSGM", TABLE_III_DETECTIONS, checkpoint), ("four-channel TSGM", FOUR_CHANNEL_DETECTIONS, four_channel)):
        steps += [
            Step(
                f"Table III: {name} detection, {split}, all four modalities",
                bundle_command(
                    "inference",
                    "vejp_anomaly",
                    ["inference.yaml"],
                    work_dir,
                    checkpoint=model,
                    datalist=work_dir / "prepared" / "volumes.json",
                    split=split,
                    method=method,
                    reconstruct_modalities="all",
                    skip_existing=True,
                ),
                None,
            )
            for split in ("validation", "test")
        ]
    rows = ("tsgm", FOUR_CHANNEL_DETECTIONS, "cyclegan")
    steps.append(
        Step(
            "Table III: each modality, equal and validation weights (TSGM single- and four-channel, CycleGAN-only)",
            bundle_command("evaluating", "tsgm_evaluation", ["evaluate.yaml", *overlay, "modalities.yaml"], work_dir, overwrite=True),
            # the report and each method's validation-weighted row: a method added since evaluates again
            (
                work_dir / TABLE_III_DIR / "summary.json",
                *(work_dir / TABLE_III_DIR / f"{row}_validation_weights" / "calibration.json" for row in rows),
            ),
        )
    )
    return steps


def largest_tumour_subject(volumes_json: Path, split: str = "validation") -> str:
    """The ``split`` subject of ``volumes.json`` with the most tumour voxels (``seg > 0``): Fig. 8's example."""
    items = json.loads(volumes_json.read_text())[split]
    return max(items, key=lambda item: int(np.count_nonzero(np.asarray(nib.load(item["seg"]).dataobj))))["subject"]


def figure_8_steps(work_dir: Path, checkpoint: Path, scale: str) -> list[Step]:
    """The paper's Fig. 8 on one validation subject (the largest tumour): TSGM detection with the paper's stochastic
    sampler (``paper_sampler.yaml``; N = 100 levels at the CPU scale instead of 1,000) and TSGM's validation
    calibration, once per seed in ``FIGURE_8_SEEDS``, then the evaluation bundle's ``uncertainty`` report in
    ``W/uncertainty`` (mean and variance maps as NIfTI, figure, table; the deterministic default beside them)."""
    levels = {"n_steps": FIGURE_8_CPU_LEVELS} if scale == "cpu" else {}
    subject = functools.cache(lambda: largest_tumour_subject(work_dir / "prepared" / "volumes.json"))  # read the labels once
    steps = [
        Step(
            f"Fig. 8: TSGM detection, PC sampler, seed {seed}",
            bundle_command(
                "inference",
                "vejp_anomaly",
                ["inference.yaml", "paper_sampler.yaml"],
                work_dir,
                checkpoint=checkpoint,
                datalist=work_dir / "prepared" / "volumes.json",
                split="validation",
                calibration_file=work_dir / "calibration" / "tsgm" / "calibration.json",
                sample_seed=seed,
                method=f"tsgm_pc_seed{seed}",
                skip_existing=True,
                **levels,
            ),
            None,
            late_overrides=lambda: {"subjects": [subject()]},
        )
        for seed in FIGURE_8_SEEDS
    ]
    runs = [f"tsgm_pc_seed{seed}" for seed in FIGURE_8_SEEDS]
    steps.append(
        Step(
            "Fig. 8: mean and variance maps over the runs",
            bundle_command("uncertainty", "tsgm_evaluation", ["uncertainty.yaml"], work_dir, runs=runs),
            work_dir / UNCERTAINTY_DIR / "summary.json",
        )
    )
    return steps


def comparison_steps(
    work_dir: Path,
    dataset_dir: Path | None = None,
    scale: str = "cpu",
    peers: tuple[str, ...] = PEERS,
    split_file: Path | None = None,
    tsgm_training: dict[str, Any] | None = None,
) -> list[Step]:
    """Every step of a comparison: TSGM's (the demo's on the phantom, ``tsgm run``'s on a dataset) up to its own test
    evaluation, each peer's, then one evaluation of all rows in ``W/comparison``. tsgm_training: ``tsgm run``'s
    training options on a dataset (``init_checkpoint``, ``lesion_blend_threshold``, ``score_model_epochs``)."""
    if dataset_dir is None:
        if tsgm_training:
            raise ValueError(f"TSGM's training options {sorted(tsgm_training)} apply to a dataset; the demo's phantom uses the shipped weights")
        tsgm = demo_steps(work_dir, seed=DEMO_SEED)
        evaluation_configs = ["evaluate.yaml", "cpu.yaml", "ceilings.yaml", "controls.yaml"]
    else:
        tsgm = dataset_steps(work_dir, dataset_dir, scale, split_file=split_file, **(tsgm_training or {}))
        evaluation_configs = ["evaluate.yaml", *SCALES[scale]["overlay"], "controls.yaml"]  # type: ignore[misc]
    trained = {"vejp": work_dir / "vejp" / "model.pt", "cyclegan": work_dir / "cyclegan" / "model.pt"}
    models = {key: BUNDLES / WEIGHT_SETS["phantom"][key] for key in trained} if dataset_dir is None else trained
    # the demo is the CPU scale
    blend = (tsgm_training or {}).get("lesion_blend_threshold")
    steps = tsgm + table_iii_steps(work_dir, models["vejp"], models["cyclegan"], "cpu" if dataset_dir is None else scale, blend)
    steps += figure_8_steps(work_dir, models["vejp"], scale)
    steps += [step for peer in peers for step in peer_steps(work_dir, peer, scale)]

    def peer_methods() -> dict[str, object]:
        rows = []
        for peer in peers:
            chosen = chosen_setting(work_dir, peer)
            rows.append({"name": peer, "detection_dir": str(work_dir / "detections" / chosen["method"])})
        return {"peer_methods": rows}

    comparison = work_dir / COMPARISON_DIR

    def rows_have_chosen_settings() -> bool:
        """Whether every peer's row was evaluated from the detections of its setting chosen now (its calibration
        records them): a candidate added to a grid may change the choice."""
        return all(
            json.loads((comparison / peer / "calibration.json").read_text()).get("detection_dir") == row["detection_dir"]
            for peer, row in zip(peers, peer_methods()["peer_methods"])  # type: ignore[call-overload]
        )

    steps.append(
        Step(
            "calibrate on validation, evaluate on test: every row",
            bundle_command("evaluating", "tsgm_evaluation", evaluation_configs, work_dir, evaluation_dir=comparison, overwrite=True),
            # the report and every peer's row (its calibration): a peer added since evaluates again
            (comparison / "summary.json", *(comparison / peer / "calibration.json" for peer in peers)),
            late_overrides=peer_methods,
            current=rows_have_chosen_settings,
        )
    )
    return steps


def paper_table() -> str:
    """Markdown: the paper's Table II BraTS rows (per tumour slice), with its protocol caveat."""
    rows = "\n".join(f"| {name} | {dsc:.2f} | {auprc:.2f} |" for name, (dsc, auprc) in PAPER_TABLE_II_BRATS.items())
    return (
        "The paper's Table II, BraTS 2020 (%, per tumour slice, each peer 'tuned to the best', four-channel peers):\n\n"
        f"| method | DSC | AUPRC |\n|---|---|---|\n{rows}\n\n"
        "Not comparable number for number: the table above chooses every setting and threshold on the validation "
        "split, scores per 3D volume and per slice on the test split, and trains each peer on single-channel slices "
        "of the four modalities (the paper's Table III finds single-channel training better for its models).\n"
    )


def paper_table_iii() -> str:
    """Markdown: the paper's Table III figures (DSC, AUPRC per tumour slice, %), to read the rows against."""
    lines = [
        f"| {method} | {setting} | {dsc:.2f} | {auprc:.2f} |"
        for method, rows in PAPER_TABLE_III_BRATS.items()
        for setting, (dsc, auprc) in rows.items()
    ]
    return (
        "The paper's Table III, BraTS 2020 (%, per tumour slice): separately trained models, not ensembles of one model's maps\n\n"
        "| method | training input | DSC | AUPRC |\n|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def run_comparison(
    work_dir: str,
    dataset_dir: str | None = None,
    scale: str = "cpu",
    peers: str | tuple[str, ...] | None = None,
    split_file: str | None = None,
    tsgm_training: dict[str, Any] | None = None,
) -> None:
    """``tsgm compare``: train and evaluate every peer next to TSGM on one dataset, print the table and the paper's.

    WORK_DIR: the work dir (a finished ``tsgm demo`` or ``tsgm run`` work dir is reused: finished steps are skipped).
    DATASET_DIR: a dataset ``tsgm prepare`` reads (default: the demo's phantom). SCALE: cpu (64², 2 cores) or paper
    (256², a GPU). PEERS: comma-separated subset of :data:`PEERS`. TSGM_TRAINING: ``tsgm run``'s training options
    for TSGM on the dataset (give the run's own, so that a fresh work dir trains the same TSGM). Resumable: rerun
    the same command.
    """
    # fire hands `--peers vae,pddpm` over as a tuple, `--peers vae` as a string
    names = peers if isinstance(peers, (list, tuple)) else [] if peers is None else str(peers).split(",")
    chosen = tuple(p.strip() for p in names if p.strip()) or PEERS
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise SystemExit(f"tsgm compare: unknown peers {unknown}; choose from {list(PEERS)}")
    if scale not in SCALES:
        raise SystemExit(f"tsgm compare: scale must be one of {sorted(SCALES)}, got {scale!r}")
    work = Path(str(work_dir)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset = None if dataset_dir is None else Path(str(dataset_dir)).resolve()
    try:
        steps = comparison_steps(work, dataset, scale, chosen, None if split_file is None else Path(str(split_file)).resolve(), tsgm_training)
    except ValueError as error:
        raise SystemExit(f"tsgm compare: {error}") from error
    seconds = run_steps(work, steps, "tsgm compare")
    print(f"\nComparison finished in {seconds:.0f} s. Report: {work / COMPARISON_DIR}\n")
    print((work / COMPARISON_DIR / "results.md").read_text())
    print(paper_table())
    print(f"Table III (modalities and ensembles of one model's maps): {work / TABLE_III_DIR / 'results.md'}\n")
    print(paper_table_iii())
    print(f"\nFig. 8 (mean and variance over {len(FIGURE_8_SEEDS)} PC sampler runs): {work / UNCERTAINTY_DIR / 'figures' / 'uncertainty.png'}")
    print((work / UNCERTAINTY_DIR / "results.md").read_text())
