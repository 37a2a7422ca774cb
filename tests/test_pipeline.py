"""The demo pipeline: every step names real bundle configs, and an interrupted step resumes."""

import ast
import json
import sys
import subprocess
from pathlib import Path

import pytest

from tsgm_components.pipeline import BUNDLES, DEMO_SEED, WEIGHTS_SEED, dataset_steps, demo_steps, run_demo


@pytest.mark.parametrize("from_scratch", [False, True])
def test_every_bundle_step_names_existing_configs_and_the_work_dir(tmp_path, from_scratch):
    steps = demo_steps(tmp_path, from_scratch=from_scratch)
    assert [s.name for s in steps][-1] == "calibrate on validation, evaluate on test"
    bundle_steps = [s for s in steps if "monai.bundle" in s.command]
    assert len(bundle_steps) == (21 if from_scratch else 14)
    for step in bundle_steps:
        configs = ast.literal_eval(step.command[step.command.index("--config_file") + 1])
        assert all(Path(c).is_file() for c in configs), step.name
        assert step.command[step.command.index("--work_dir") + 1] == str(tmp_path)


def test_shipped_weights_by_default_and_the_trained_ones_from_scratch(tmp_path):
    """Without --from_scratch nothing is trained and every detection names the phantom weights the bundles ship (the
    bundles' defaults are the real-trained ones); from scratch every detection names the model trained in the work dir."""
    shipped = {s.name: s.command for s in demo_steps(tmp_path)}
    assert not any(name.startswith(("train", "REFERENCE train", "pseudo-pairs")) for name in shipped)
    for name, target in (
        ("TSGM detection, test", "vejp_anomaly/models/phantom.pt"),
        ("SDEdit baseline detection, validation", "vejp_anomaly/models/phantom_unconditional.pt"),
        ("REFERENCE VE-JP on true pairs detection, test", "vejp_anomaly/models/phantom_true_pairs.pt"),
        ("CONTROL regression network detection, test", "vejp_anomaly/models/phantom_regression.pt"),
    ):
        assert shipped[name][shipped[name].index("--checkpoint") + 1] == str(BUNDLES / target)
    cyclegan = shipped["CycleGAN-only baseline detection"]
    assert cyclegan[cyclegan.index("--cyclegan_checkpoint") + 1] == str(BUNDLES / "cyclegan_brats/models/phantom.pt")
    trained = {s.name: s.command for s in demo_steps(tmp_path, from_scratch=True)}
    for name, folder in (
        ("TSGM detection, test", "vejp"),
        ("SDEdit baseline detection, test", "vejp_unconditional"),
        ("REFERENCE VE-JP on true pairs detection, test", "vejp_true_pairs"),
        ("pseudo-pairs G_A→B(healthy)", "cyclegan"),
    ):
        assert trained[name][trained[name].index("--checkpoint") + 1] == str(tmp_path / folder / "model.pt")
    cyclegan = trained["CycleGAN-only baseline detection"]
    assert cyclegan[cyclegan.index("--cyclegan_checkpoint") + 1] == str(tmp_path / "cyclegan" / "model.pt")


def test_the_demo_reports_on_a_phantom_no_model_or_setting_has_seen(tmp_path, monkeypatch):
    """The shipped phantom weights come from the phantom of WEIGHTS_SEED (`tsgm build_weights`); the demo generates
    and splits the phantom of DEMO_SEED, a different one; its ladder holds the CONTROL rows."""
    from tsgm_components import cli

    assert DEMO_SEED != WEIGHTS_SEED
    steps = {s.name: s.command for s in demo_steps(tmp_path)}
    for name in ("phantom dataset (+ healthy twins for the ceiling rows)", "prepare slices"):
        assert steps[name][steps[name].index("--seed") + 1] == str(DEMO_SEED)
    evaluating = steps["calibrate on validation, evaluate on test"]
    assert any(c.endswith("controls.yaml") for c in ast.literal_eval(evaluating[evaluating.index("--config_file") + 1]))
    seen = {}
    monkeypatch.setattr(cli, "run_demo", lambda work_dir, seed, from_scratch: seen.update(seed=seed, from_scratch=from_scratch))
    monkeypatch.setattr("tsgm_components.weights.export_weights", lambda *args, **kwargs: [])
    cli.build_weights(str(tmp_path / "weights"))
    assert seen == {"seed": WEIGHTS_SEED, "from_scratch": True}


def test_training_resumes_only_when_an_interrupted_run_left_checkpoints(tmp_path):
    vejp = next(s for s in demo_steps(tmp_path, from_scratch=True) if s.name.startswith("train VE-JP"))
    assert "--resume" not in vejp.resolved_command()
    vejp.checkpoint_dir.mkdir(parents=True)
    (vejp.checkpoint_dir / "checkpoint_epoch=2.pt").write_bytes(b"")
    assert vejp.resolved_command()[-2:] == ["--resume", "True"]


def test_detection_steps_always_run_and_skip_finished_subjects(tmp_path):
    detections = [s for s in demo_steps(tmp_path) if "detection" in s.name and not s.name.startswith("calibrate")]
    assert len(detections) == 11
    for step in detections:
        assert step.output is None
        assert step.command[step.command.index("--skip_existing") + 1] == "True"


def test_test_detection_samples_only_what_the_validation_calibration_weighs(tmp_path):
    """Validation detection reconstructs all four modalities (the weight search needs them); then the calibrating step
    writes W/calibration/<method>/calibration.json from validation alone; test detection reads it and samples only
    the weighted modalities."""
    steps = demo_steps(tmp_path)
    names = [s.name for s in steps]
    calibrating = names.index("calibrate on validation (before test detection)")
    assert "run" in steps[calibrating].command and steps[calibrating].command[steps[calibrating].command.index("run") + 1] == "calibrating"
    for name, method in (("TSGM", "tsgm"), ("SDEdit baseline", "sdedit"), ("REFERENCE VE-JP on true pairs", "vejp_true_pairs")):
        validation, test = steps[names.index(f"{name} detection, validation")], steps[names.index(f"{name} detection, test")]
        assert names.index(validation.name) < calibrating < names.index(test.name)
        assert validation.command[validation.command.index("--reconstruct_modalities") + 1] == "all"
        assert "--calibration_file" not in validation.command
        assert test.command[test.command.index("--reconstruct_modalities") + 1] == "weighted"
        assert test.command[test.command.index("--calibration_file") + 1] == str(tmp_path / "calibration" / method / "calibration.json")
    # the calibration is done once every row the test detection reads has its file; a row added since calibrates again
    methods = [
        "tsgm",
        "sdedit",
        "vejp_true_pairs",
        "regression",
        "flair_threshold",
        "cyclegan",
        "flair_threshold_model_size",
        "oracle_reconstruction",
    ]
    for method in methods:
        (tmp_path / "calibration" / method).mkdir(parents=True)
        (tmp_path / "calibration" / method / "calibration.json").write_text("{}")
    assert demo_steps(tmp_path)[calibrating].done()
    (tmp_path / "calibration" / "regression" / "calibration.json").unlink()
    assert not demo_steps(tmp_path)[calibrating].done()


def test_a_failing_step_stops_the_demo_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3))
    with pytest.raises(SystemExit, match=r"step 'phantom dataset \(\+ healthy twins for the ceiling rows\)' failed \(exit 3\)"):
        run_demo(str(tmp_path / "w"))


def test_demo_split_holds_healthy_subjects_and_ceilings_read_twins(tmp_path):
    steps = {s.name: s for s in demo_steps(tmp_path, from_scratch=True)}
    phantom = steps["phantom dataset (+ healthy twins for the ceiling rows)"].command
    assert phantom[phantom.index("--twins_out") + 1] == str(tmp_path / "twins")
    prepare = steps["prepare slices"].command
    assert prepare[prepare.index("--val_fraction") + 1] == prepare[prepare.index("--test_fraction") + 1] == "0.2"
    evaluate = steps["calibrate on validation, evaluate on test"].command
    assert ast.literal_eval(evaluate[evaluate.index("--config_file") + 1])[-2].endswith("ceilings.yaml")
    pairs = steps["pseudo-pairs G_A→B(healthy)"].command
    assert pairs[pairs.index("--lesion_blend_threshold") + 1] == "0.1"  # how the shipped TSGM weights were made
    assert pairs[pairs.index("--lesion_placement") + 1] == "random"
    true_pairs = steps["REFERENCE true pairs (twin slice, real slice)"].command  # the same treatment: TSGM with a perfect stage 1
    assert true_pairs[true_pairs.index("--lesion_blend_threshold") + 1] == "0.1"
    assert true_pairs[true_pairs.index("--lesion_placement") + 1] == "random"
    twin_steps = [name for name in steps if name.startswith(("CEILING", "REFERENCE"))]
    assert len(twin_steps) == 5


def test_own_dataset_pipeline_trains_everything_with_the_scale_configs_and_torchrun_on_several_gpus(tmp_path):
    from tsgm_components.pipeline import dataset_steps

    data = tmp_path / "MICCAI_BraTS2020_TrainingData"
    paper = dataset_steps(tmp_path, data, "paper", processes=4)
    names = [s.name for s in paper]
    assert names[0] == "prepare slices" and names[-1] == "calibrate on validation, evaluate on test"
    assert not any("CEILING" in name or "phantom" in name for name in names)  # no twins on real data
    prepare = paper[0].command
    assert prepare[prepare.index("--dataset_dir") + 1] == str(data) and prepare[prepare.index("--image_size") + 1] == "256"
    for step in paper:
        if "monai.bundle" not in step.command:
            continue
        configs = ast.literal_eval(step.command[step.command.index("--config_file") + 1])
        assert all(Path(c).is_file() for c in configs) and not any(c.endswith("cpu.yaml") for c in configs), step.name
        distributed = "torch.distributed.run" in step.command
        if step.name.startswith(("train", "CONTROL train")):
            assert distributed and "--nproc_per_node=4" in step.command and configs[-1].endswith("multi_gpu_train.yaml")
        elif step.name.startswith(("TSGM detection", "SDEdit baseline detection", "CONTROL regression network detection")):
            assert distributed and step.command[step.command.index("--checkpoint") + 1].startswith(str(tmp_path))
        else:
            assert not distributed, step.name
    pairs = next(s for s in paper if s.name.startswith("pseudo-pairs")).command
    assert "--lesion_blend_threshold" not in pairs  # the paper's recipe at paper scale
    cpu = dataset_steps(tmp_path, data, "cpu")
    pairs = next(s for s in cpu if s.name.startswith("pseudo-pairs")).command
    assert pairs[pairs.index("--lesion_blend_threshold") + 1] == "0.1"  # the documented deviation at 64²
    chosen = dataset_steps(tmp_path, data, "cpu", lesion_blend_threshold=0.2, score_model_epochs=32)
    pairs = next(s for s in chosen if s.name.startswith("pseudo-pairs")).command
    assert pairs[pairs.index("--lesion_blend_threshold") + 1] == "0.2" and pairs[pairs.index("--lesion_placement") + 1] == "random"
    budgets = {s.name: s.command[s.command.index("--max_epochs") + 1] for s in chosen if "--max_epochs" in s.command}
    assert budgets == {"train VE-JP score model (stage 2)": "32", "CONTROL train the regression network (VE-JP's, plain L2)": "32"}
    assert [s.name for s in cpu] == names
    assert not any("torch.distributed.run" in s.command for s in cpu)
    train = next(s for s in cpu if s.name.startswith("train VE-JP"))
    assert [Path(c).name for c in ast.literal_eval(train.command[train.command.index("--config_file") + 1])] == ["train.yaml", "cpu.yaml"]
    assert cpu[0].command[cpu[0].command.index("--image_size") + 1] == "64"
    with pytest.raises(ValueError, match="scale must be one of"):
        dataset_steps(tmp_path, data, "huge")


def test_own_dataset_run_stops_at_a_failing_step_and_ends_with_the_published_figures(tmp_path, monkeypatch, capsys):
    from tsgm_components.pipeline import published_comparison, run_dataset

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2))
    with pytest.raises(SystemExit, match=r"tsgm run: step 'prepare slices' failed \(exit 2\)"):
        run_dataset(str(tmp_path / "data"), str(tmp_path / "w"), "cpu", gpus=0)
    text = published_comparison()
    assert "DSC 0.859" in text and "validation split" in text and "not directly comparable" in text


def test_runs_that_train_add_the_controls_and_development_runs_never_read_test(tmp_path):
    """tsgm run trains the regression control and scores it with FLAIR thresholding at the model size (controls.yaml);
    --read_test False detects no test subject and scores validation in-sample into W/evaluation_validation."""
    steps = {s.name: s for s in dataset_steps(tmp_path, tmp_path / "data", "cpu")}
    regression = steps["CONTROL regression network detection, test"].command
    assert regression[regression.index("--checkpoint") + 1] == str(tmp_path / "vejp_regression" / "model.pt")
    assert "CONTROL FLAIR thresholding at the models' slice size" in steps
    evaluating = steps["calibrate on validation, evaluate on test"].command
    assert any(c.endswith("controls.yaml") for c in ast.literal_eval(evaluating[evaluating.index("--config_file") + 1]))
    development = dataset_steps(tmp_path, tmp_path / "data", "cpu", read_test=False)
    assert not any(s.name.endswith(", test") or "evaluate on test" in s.name for s in development)
    last = development[-1].command
    assert last[last.index("--evaluated_split") + 1] == "validation"
    assert development[-1].output == tmp_path / "evaluation_validation" / "summary.json"


def test_training_steps_print_their_expected_duration_from_configs_and_counts(tmp_path):
    """Iterations come from each step's configs, its command-line overrides and the prepared training counts: the CPU
    configs' fixed lengths (8 CycleGAN epochs of 300, 80 score epochs of 50), the paper's passes over the data
    (1-channel: 4 samples per slice), times the scale's reference seconds per iteration."""
    from tsgm_components.durations import REFERENCE_RATES, training_iterations

    (tmp_path / "prepared").mkdir()
    counts = {"healthy_slices": 208, "tumour_slices": 380}
    (tmp_path / "prepared" / "prepare_config.json").write_text(json.dumps({"counts": {"train": counts}}))
    estimates = {s.name: s.estimate() for s in dataset_steps(tmp_path, tmp_path / "data", "cpu") if s.estimate}
    rate = REFERENCE_RATES["cpu"][1]["score"]
    assert estimates["train CycleGAN (stage 1)"].startswith(f"expected ≈ {2400 * REFERENCE_RATES['cpu'][1]['cyclegan'] / 60:.0f} min")
    assert (
        estimates["train VE-JP score model (stage 2)"]
        == f"expected ≈ {4000 * rate / 60:.0f} min on a 2-core x86-64 CPU (4,000 iterations × {rate:.3f} s)"
    )
    assert len(estimates) == 4
    # --score_model_epochs overrides the config's max_epochs for TSGM's score model and its regression CONTROL
    budgeted = {s.name: s.estimate() for s in dataset_steps(tmp_path, tmp_path / "data", "cpu", score_model_epochs=32) if s.estimate}
    assert "(1,600 iterations" in budgeted["train VE-JP score model (stage 2)"]
    assert "(1,600 iterations" in budgeted["CONTROL train the regression network (VE-JP's, plain L2)"]
    assert "(4,000 iterations" in budgeted["train unconditional score model (SDEdit baseline)"]
    assert training_iterations("score", {"max_epochs": 100, "batch_size": 8}, counts) == 100 * 104
    assert training_iterations("cyclegan", {"n_epochs": 100, "n_epochs_decay": 100, "batch_size": 1}, counts) == 200 * 4 * 380


def test_run_picks_the_scale_from_the_hardware_unless_given(tmp_path, monkeypatch, capsys):
    """--scale auto: the paper's configs with a GPU, the CPU configs without; the choice is printed before any step."""
    import tsgm_components.pipeline as pipeline

    seen = {}

    def fake_steps(work, dataset, scale, processes, seed, split_file, read_test, init_checkpoint, lesion_blend_threshold, score_model_epochs):
        seen["scale"] = scale
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "dataset_steps", fake_steps)
    for gpus, expected in ((0, "cpu"), (2, "paper")):
        monkeypatch.setattr(pipeline, "gpu_count", lambda gpus=gpus: gpus)
        with pytest.raises(SystemExit):
            pipeline.run_dataset(str(tmp_path / "data"), str(tmp_path / "w"), "auto")
        assert seen["scale"] == expected and f"--scale {expected} ({gpus} GPU(s) visible" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pipeline.run_dataset(str(tmp_path / "data"), str(tmp_path / "w"), "cpu")
    assert seen["scale"] == "cpu"


def test_run_can_fine_tune_the_tsgm_model_from_given_weights(tmp_path):
    """--init_checkpoint reaches the TSGM training step only (the controls and the SDEdit model start from scratch)."""
    steps = {s.name: s.command for s in dataset_steps(tmp_path, tmp_path / "data", "cpu", init_checkpoint=tmp_path / "phantom.pt")}
    tsgm = steps["train VE-JP score model (stage 2)"]
    assert tsgm[tsgm.index("--init_checkpoint") + 1] == str(tmp_path / "phantom.pt")
    assert not any("--init_checkpoint" in command for name, command in steps.items() if name != "train VE-JP score model (stage 2)")


def test_the_steps_record_keeps_the_run_that_did_the_work(tmp_path):
    """A step that always runs (output None, skipping finished subjects itself) rerun in a second does not replace the
    recorded time of the run that did the work; a step with an output records each run, with the code's commit."""
    from tsgm_components.pipeline import STEPS_RECORD, Step, run_steps

    (tmp_path / STEPS_RECORD).write_text(
        json.dumps({"detect": {"command": "earlier", "seconds": 100.0}, "train": {"command": "earlier", "seconds": 100.0}})
    )
    quick = [sys.executable, "-c", "pass"]
    run_steps(tmp_path, [Step("detect", quick, None), Step("train", quick, tmp_path / "model.pt")], "test")
    record = json.loads((tmp_path / STEPS_RECORD).read_text())
    assert record["detect"] == {"command": "earlier", "seconds": 100.0}
    assert record["train"]["seconds"] < 100 and record["train"]["command"] != "earlier"
    from tsgm_components import git_commit

    assert record["train"]["commit"] == git_commit()  # what shipped weights' provenance names as their code
