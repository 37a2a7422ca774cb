"""`tsgm compare`: every peer's steps name real configs, settings are chosen on validation only, one test evaluation."""

import ast
import json
from pathlib import Path

import pytest

from tsgm_components.comparison import (
    COMPARISON_DIR,
    FIGURE_8_SEEDS,
    UNCERTAINTY_DIR,
    PEERS,
    SETTINGS_DIR,
    TABLE_III_DETECTIONS,
    FOUR_CHANNEL_DETECTIONS,
    TABLE_III_DIR,
    chosen_setting,
    comparison_steps,
    peer_plan,
    run_comparison,
)


def test_every_peer_declares_training_detection_and_its_tuned_setting():
    for peer in PEERS:
        plan = peer_plan(peer)
        assert plan["training_runs"][0] == "training", peer
        assert (plan["setting_key"] is None) == (plan["candidates"] == []), peer


def test_comparison_steps_name_existing_configs_and_read_test_once(tmp_path):
    steps = comparison_steps(tmp_path)
    names = [s.name for s in steps]
    for step in steps:
        if "monai.bundle" in step.command:
            configs = ast.literal_eval(step.command[step.command.index("--config_file") + 1])
            assert all(Path(c).is_file() for c in configs), step.name
    for peer in PEERS:
        plan = peer_plan(peer)
        validation = [i for i, n in enumerate(names) if n.startswith(f"{peer} detection, validation")]
        test = names.index(f"{peer} detection, test (setting chosen on validation)")
        assert len(validation) == max(1, len(plan["candidates"])) and max(validation) < test
        for run in plan["training_runs"]:
            assert names.index(f"{peer}: {run}") < min(validation)
        # a validation detection never reads test
        for i in validation:
            assert steps[i].command[steps[i].command.index("--splits") + 1] == "['validation']"
    final = steps[-1]
    assert final.command[final.command.index("--evaluation_dir") + 1] == str(tmp_path / COMPARISON_DIR)
    assert sum("evaluating" in s.command for s in steps) == 3  # TSGM's own table, Table III and the comparison's
    # Table III: TSGM's maps of all four modalities on both splits (its own test detection samples only the weighted),
    # and those of the four-channel stage 2, trained on the same pseudo-pairs (written first if the run has none)
    training = names.index("Table III: train the four-channel VE-JP score model")
    assert names.index("pseudo-pairs G_A→B(healthy)") < training
    files = ast.literal_eval(steps[training].command[steps[training].command.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["train.yaml", "cpu.yaml", "four_channel.yaml"]
    for name, method, model in (("TSGM", TABLE_III_DETECTIONS, "phantom.pt"), ("four-channel TSGM", FOUR_CHANNEL_DETECTIONS, steps[training].output)):
        for split in ("validation", "test"):
            index = names.index(f"Table III: {name} detection, {split}, all four modalities")
            detect = steps[index].command
            assert detect[detect.index("--split") + 1] == split and detect[detect.index("--reconstruct_modalities") + 1] == "all"
            assert detect[detect.index("--method") + 1] == method and detect[detect.index("--checkpoint") + 1].endswith(str(model))
            assert index > training
    table_iii = next(s for s in steps if s.name.startswith("Table III: each modality"))
    assert table_iii.command[table_iii.command.index("--config_file") + 1].endswith("modalities.yaml']")
    assert table_iii.output[0] == tmp_path / TABLE_III_DIR / "summary.json"
    assert tmp_path / TABLE_III_DIR / "tsgm_four_channel_validation_weights" / "calibration.json" in table_iii.output
    # an evaluation holding only some of the peers is redone when more are asked for, kept when it holds them all
    for row in ("tsgm", "vae"):  # the evaluation's layout: summary.json and one calibration per row (its detections)
        (tmp_path / COMPARISON_DIR / row).mkdir(parents=True)
        (tmp_path / COMPARISON_DIR / row / "calibration.json").write_text(json.dumps({"detection_dir": str(tmp_path / "detections" / row)}))
    (tmp_path / COMPARISON_DIR / "summary.json").write_text(json.dumps({"tsgm": {}, "vae": {}}))
    assert comparison_steps(tmp_path, peers=("vae",))[-1].done()
    assert not comparison_steps(tmp_path, peers=("vae", "pddpm"))[-1].done()
    # a row evaluated with a setting that validation no longer chooses (a candidate added since) is evaluated again
    candidates = peer_plan("pddpm")["candidates"]
    for value in candidates:
        folder = tmp_path / SETTINGS_DIR / "pddpm" / f"pddpm_{value}"
        folder.mkdir(parents=True)
        (folder / "calibration.json").write_text(json.dumps({"validation_dice": 0.9 if value == candidates[0] else 0.5}))
    (tmp_path / COMPARISON_DIR / "pddpm").mkdir()
    evaluated = tmp_path / COMPARISON_DIR / "pddpm" / "calibration.json"
    evaluated.write_text(json.dumps({"detection_dir": str(tmp_path / "detections" / f"pddpm_{candidates[0]}")}))
    assert comparison_steps(tmp_path, peers=("vae", "pddpm"))[-1].done()
    (tmp_path / SETTINGS_DIR / "pddpm" / f"pddpm_{candidates[-1]}" / "calibration.json").write_text(json.dumps({"validation_dice": 0.95}))
    assert not comparison_steps(tmp_path, peers=("vae", "pddpm"))[-1].done()
    redo = comparison_steps(tmp_path, peers=("vae", "pddpm"))[-1].command
    assert redo[redo.index("--overwrite") + 1] == "True"  # the evaluation of fewer peers is replaced, not refused


def test_the_chosen_setting_is_the_best_validation_dice_and_reaches_test_detection(tmp_path):
    peer = next(p for p in PEERS if peer_plan(p)["candidates"])
    plan = peer_plan(peer)
    best = plan["candidates"][len(plan["candidates"]) // 2]
    dice = {value: 0.8 if value == best else 0.5 for value in plan["candidates"]}
    for value, d in dice.items():
        folder = tmp_path / SETTINGS_DIR / peer / f"{peer}_{value}"
        folder.mkdir(parents=True)
        (folder / "calibration.json").write_text(json.dumps({"validation_dice": d}))
    chosen = chosen_setting(tmp_path, peer)
    assert chosen["value"] == best and chosen["method"] == f"{peer}_{best}"
    assert json.loads((tmp_path / SETTINGS_DIR / peer / "chosen.json").read_text())["value"] == chosen["value"]
    test = next(s for s in comparison_steps(tmp_path, peers=(peer,)) if s.name == f"{peer} detection, test (setting chosen on validation)")
    command = test.resolved_command()
    assert command[command.index("--method") + 1] == chosen["method"]
    assert command[command.index(f"--{plan['setting_key']}") + 1] == str(chosen["value"])


def test_unknown_peer_is_refused_with_the_known_ones(tmp_path):
    for peers in ("vae,vqvae", ("vae", "vqvae")):  # fire passes `--peers vae,vqvae` as a tuple
        with pytest.raises(SystemExit, match="unknown peers \\['vqvae'\\]"):
            run_comparison(str(tmp_path), peers=peers)


def test_figure_8_runs_the_stochastic_sampler_per_seed_on_the_largest_validation_tumour(tmp_path):
    import nibabel as nib
    import numpy as np

    items = []
    for subject, size in (("small", 2), ("large", 5), ("none", 0)):
        seg = np.zeros((8, 8, 4), np.uint8)
        seg[:size, :size, 1] = 2
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / f"{subject}_seg.nii.gz"))
        items.append({"subject": subject, "seg": str(tmp_path / f"{subject}_seg.nii.gz")})
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "volumes.json").write_text(json.dumps({"training": [], "validation": items, "test": []}))
    steps = comparison_steps(tmp_path, peers=("vae",))
    runs = [s for s in steps if s.name.startswith("Fig. 8: TSGM detection")]
    assert len(runs) == len(FIGURE_8_SEEDS) == 3
    for seed, step in zip(FIGURE_8_SEEDS, runs):
        command = step.resolved_command()
        assert command[command.index("--config_file") + 1].endswith("paper_sampler.yaml']")
        assert command[command.index("--sample_seed") + 1] == str(seed) and command[command.index("--method") + 1] == f"tsgm_pc_seed{seed}"
        assert command[command.index("--split") + 1] == "validation" and command[command.index("--subjects") + 1] == "['large']"
        assert command[command.index("--n_steps") + 1] == "100"  # the demo's CPU scale
        assert command[command.index("--calibration_file") + 1] == str(tmp_path / "calibration" / "tsgm" / "calibration.json")
    report = next(s for s in steps if s.name.startswith("Fig. 8: mean and variance"))
    assert report.output == tmp_path / UNCERTAINTY_DIR / "summary.json" and steps.index(report) > steps.index(runs[-1])


def test_compare_on_a_dataset_trains_tsgm_as_tsgm_run_was_told(tmp_path):
    """A fresh `tsgm compare --dataset_dir` work dir trains the TSGM its `tsgm run` options describe (the shipped real
    recipe), not the scale's defaults; on the demo's phantom (shipped weights) those options are refused."""
    init = tmp_path / "phantom.pt"
    training = {"init_checkpoint": init, "lesion_blend_threshold": 0.2, "score_model_epochs": 32}
    steps = comparison_steps(tmp_path, tmp_path / "data", "cpu", peers=("vae",), tsgm_training=training)
    vejp = next(s for s in steps if s.name == "train VE-JP score model (stage 2)").command
    assert vejp[vejp.index("--init_checkpoint") + 1] == str(init) and vejp[vejp.index("--max_epochs") + 1] == "32"
    pairs = [s.command for s in steps if s.name.startswith("pseudo-pairs")]
    assert len(pairs) == 2 and all(c[c.index("--lesion_blend_threshold") + 1] == "0.2" for c in pairs)
    with pytest.raises(SystemExit, match="apply to a dataset"):
        run_comparison(str(tmp_path), peers="vae", tsgm_training={"score_model_epochs": 32})
