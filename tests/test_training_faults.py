"""Training faults on multi-day runs, for both trainers (CycleGAN bundle, VE-JP bundle):

* SIGKILL mid-epoch, and SIGKILL while a checkpoint is being written, then ``--resume True``: the resumed run ends
  bit-identical to an uninterrupted one (weights, EMA, optimisers, schedulers, image pools, random states, step);
* a NaN loss stops training naming the iteration and the loss, keeps the last good checkpoint, writes no final model;
* checkpoints carry the networks/image size they were made for and refuse others, naming the differing keys;
* the same seed gives identical losses.

Tiny sizes (32² slices, tiny networks), CPU, one torch thread; two subprocesses (the SIGKILLed runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, run
from test_cyclegan import make_prepared  # tests/ is on sys.path (pytest rootdir)

import tsgm_components
from tsgm_components.checkpoints import latest_checkpoint, resume_point
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.engines.cyclegan import CycleGANTrainer
from tsgm_components.engines.fault_tolerance import NonFiniteLossError
from tsgm_components.engines.score import ScoreMatchingTrainer, linear_warmup
from tsgm_components.data.unpaired import UnpairedSliceDataset
from tsgm_components.errors import TsgmInputError
from tsgm_components.losses.gan import ImagePool
from tsgm_components.networks.cyclegan import PatchDiscriminator, ResnetGenerator
from tsgm_components.networks.score import ScoreUNet
from tsgm_components.diffusion.sde import VESDE
from tsgm_components.stage1.translation import load_generator

CYCLEGAN = Path(tsgm_components.bundle_dir("cyclegan_brats")) / "configs"
VEJP = Path(tsgm_components.bundle_dir("vejp_anomaly")) / "configs"
CYCLEGAN_CONFIGS = [str(CYCLEGAN / "train.yaml")]
VEJP_CONFIGS = [str(VEJP / "train.yaml"), str(VEJP / "cpu.yaml")]
#: 16 A / 16 B slices, batch 4: 4 iterations per epoch; epoch 2 is the first decay epoch
CYCLEGAN_TINY = dict(
    image_size=32,
    ngf=4,
    n_blocks=1,
    ndf=4,
    n_layers_d=2,
    batch_size=4,
    num_workers=0,
    cache_rate=1.0,
    n_epochs=1,
    n_epochs_decay=1,
    progress_bar=False,
    log_every=1,
)
#: 8 pairs, batch 4: 2 iterations per epoch, 3 epochs; warm-up over the first 4 iterations
VEJP_TINY = dict(
    image_size=32,
    batch_size=4,
    epoch_length="$None",
    max_epochs=3,
    warmup_steps=4,
    log_interval=1,
    network_args=dict(
        condition_channels=1, channels=[16, 16], attention_levels=[False, True], num_res_blocks=1, num_head_channels=16, norm_num_groups=16
    ),
)

#: Runs the training bundle in a fresh process and SIGKILLs it: mode "iteration" after iteration N completes,
#: mode "save" inside the N-th torch.save, after half of the checkpoint's bytes reached the file.
KILLED_RUN = r"""
import io, json, os, signal, sys
import torch
from ignite.engine import Engine, Events
from monai.bundle import run

mode, n = sys.argv[1], int(sys.argv[2])
configs, overrides = json.loads(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(1)
kill = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if mode == "iteration":
    engine_run = Engine.run
    def run_then_kill(self, *args, **kwargs):
        self.add_event_handler(Events.ITERATION_COMPLETED(once=n), kill)
        return engine_run(self, *args, **kwargs)
    Engine.run = run_then_kill
else:
    save, calls = torch.save, []
    def save_half_then_kill(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < n:
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(half)
        else:
            f.write(half)
            f.flush()
        kill()
    torch.save = save_half_then_kill
run("training", config_file=configs, logging_file=False, **overrides)
"""


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from threads on a shared 2-core machine; the killed runs use one thread too, so
    their arithmetic is the in-process runs' arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_killed(tmp_path: Path, mode: str, n: int, configs: list[str], overrides: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-c", KILLED_RUN, mode, str(n), json.dumps(configs), json.dumps(overrides)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def assert_same_state(actual: Any, expected: Any, where: str = "checkpoint") -> None:
    """Exact equality of two checkpoint trees (tensors bit for bit)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_state(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def cause(error: BaseException, kind: type[BaseException]) -> BaseException:
    """The ``kind`` exception behind ``error`` (MONAI's config evaluation wraps errors in RuntimeError)."""
    found: BaseException | None = error
    while found is not None and not isinstance(found, kind):
        found = found.__cause__ or found.__context__
    assert found is not None, f"no {kind.__name__} behind {error!r}"
    return found


def make_pairs(work: Path, n_pairs: int = 8, size: int = 32) -> Path:
    """prepared/prepare_config.json and pseudo_pairs/ as the earlier pipeline steps leave them."""
    prepared, pairs = work / "prepared", work / "pseudo_pairs"
    (prepared / "slices" / "S0").mkdir(parents=True)
    (pairs / "slices" / "S0").mkdir(parents=True)
    preprocess = dict(z_min=0, z_max=n_pairs - 1, image_size=size, pad_to=size, lower_percentile=1.0, upper_percentile=99.0)
    (prepared / "prepare_config.json").write_text(json.dumps(dict(preprocess, seed=0)))
    rng = np.random.default_rng(0)
    items = []
    for z in range(n_pairs):
        name = f"slices/S0/t1_z{z:03d}.npy"
        healthy = rng.random((size, size)).astype(np.float32)
        np.save(prepared / name, healthy)
        np.save(pairs / name, np.clip(healthy + 0.5 * (rng.random((size, size)) > 0.9), 0, 1).astype(np.float32))
        items.append({"image": str(prepared / name), "condition": name, "subject": "S0", "modality": "t1", "z": z})
    (pairs / "pseudo_pairs.json").write_text(json.dumps({"training": items, "validation": items[:2]}))
    return work


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("faults") / "prepared", size=32, n_subjects=3, n_z=4)


@pytest.fixture(scope="module")
def cyclegan_uninterrupted(prepared, tmp_path_factory) -> Path:
    """cyclegan_dir of an uninterrupted 2-epoch run (the reference for the resumed runs)."""
    work = tmp_path_factory.mktemp("cyclegan_reference")
    run("training", config_file=CYCLEGAN_CONFIGS, logging_file=False, work_dir=str(work), prepared_dir=str(prepared), **CYCLEGAN_TINY)
    return work / "cyclegan"


@pytest.fixture(scope="module")
def vejp_uninterrupted(tmp_path_factory) -> Path:
    """vejp_dir of an uninterrupted 3-epoch run."""
    work = make_pairs(tmp_path_factory.mktemp("vejp_reference"))
    run("training", config_file=VEJP_CONFIGS, logging_file=False, work_dir=str(work), **VEJP_TINY)
    return work / "vejp"


# ---------------------------------------------------------------- SIGKILL, then resume


def test_vejp_sigkill_mid_epoch_then_resume_equals_uninterrupted(vejp_uninterrupted, tmp_path):
    work = make_pairs(tmp_path / "work")
    killed = run_killed(tmp_path, "iteration", 5, VEJP_CONFIGS, dict(VEJP_TINY, work_dir=str(work)))  # epoch 3 of 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    vejp = work / "vejp"
    assert sorted(p.name for p in (vejp / "checkpoints").iterdir()) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    assert not (vejp / "model.pt").exists()
    assert load(vejp / "checkpoints" / "checkpoint_epoch=2.pt")["trainer"]["iteration"] == 4

    run("training", config_file=VEJP_CONFIGS, logging_file=False, work_dir=str(work), resume=True, **VEJP_TINY)
    resumed, reference = load(vejp / "checkpoints" / "checkpoint_final.pt"), load(vejp_uninterrupted / "checkpoints" / "checkpoint_final.pt")
    assert resumed["trainer"]["iteration"] == 6
    assert set(resumed) == {"network", "network_ema", "optimizer", "lr_scheduler", "trainer", "rng", "model_spec"}
    assert_same_state(resumed, reference)  # weights, EMA, Adam moments and step, warm-up schedule, RNGs, spec
    assert_same_state(load(vejp / "model.pt"), load(vejp_uninterrupted / "model.pt"))


def test_cyclegan_sigkill_while_saving_keeps_the_previous_checkpoint_and_resume_equals_uninterrupted(prepared, cyclegan_uninterrupted, tmp_path):
    work = tmp_path / "work"
    overrides = dict(CYCLEGAN_TINY, work_dir=str(work), prepared_dir=str(prepared))
    killed = run_killed(tmp_path, "save", 2, CYCLEGAN_CONFIGS, overrides)  # dies half-way through epoch 2's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = work / "cyclegan"
    # n_saved=1, yet epoch 1's checkpoint survives: the outdated one is removed only after its successor is complete,
    # and the half-written bytes went to a temporary file, not to checkpoint_epoch=2.pt
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint_epoch=1.pt"]
    assert latest_checkpoint(out) == str(out / "checkpoint_epoch=1.pt")
    assert load(out / "checkpoint_epoch=1.pt")["trainer"]["iteration"] == 4

    run("training", config_file=CYCLEGAN_CONFIGS, logging_file=False, resume=True, **overrides)
    resumed, reference = load(out / "checkpoint_epoch=2.pt"), load(cyclegan_uninterrupted / "checkpoint_epoch=2.pt")
    assert resumed["trainer"]["iteration"] == 8 and resumed["g_scheduler"]["last_epoch"] == 2
    assert_same_state(resumed, reference)  # 4 networks, both Adams, both schedules, image pools, RNGs, spec
    assert_same_state(load(out / "model.pt"), load(cyclegan_uninterrupted / "model.pt"))


# ---------------------------------------------------------------- NaN loss


def train_with_data_turning_nan(configs: list[str], overrides: dict, cached: Callable[[ConfigParser], list]) -> NonFiniteLossError:
    """Run a training bundle whose cached training data become NaN after epoch 1; return the error it stops with."""
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("trainer" if "trainer" in parser.config else "train#trainer")

    def poison(_):
        for item in cached(parser):
            for value in item.values():
                if isinstance(value, torch.Tensor):
                    value.fill_(float("nan"))

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), poison)
    with pytest.raises(Exception) as excinfo:
        parser.get_parsed_content("training")
    return cause(excinfo.value, NonFiniteLossError)


def test_vejp_nan_loss_stops_naming_iteration_keeps_checkpoint_writes_no_model(tmp_path):
    work = make_pairs(tmp_path / "work")
    error = train_with_data_turning_nan(VEJP_CONFIGS, dict(VEJP_TINY, work_dir=str(work)), lambda p: p.get_parsed_content("train_dataset")._cache)
    assert "iteration 3 (epoch 2)" in str(error) and "loss = nan" in str(error)
    vejp = work / "vejp"
    assert [p.name for p in (vejp / "checkpoints").iterdir()] == ["checkpoint_epoch=1.pt"]  # no checkpoint_final.pt
    assert not (vejp / "model.pt").exists()
    good = load(vejp / "checkpoints" / "checkpoint_epoch=1.pt")
    assert good["trainer"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in good["network"].values() if v.is_floating_point())
    assert resume_point(vejp / "checkpoints", resume=True) == str(vejp / "checkpoints" / "checkpoint_epoch=1.pt")


def test_cyclegan_nan_loss_stops_naming_iteration_keeps_checkpoint_writes_no_model(prepared, tmp_path):
    overrides = dict(CYCLEGAN_TINY, work_dir=str(tmp_path), prepared_dir=str(prepared))
    error = train_with_data_turning_nan(CYCLEGAN_CONFIGS, overrides, lambda p: p.get_parsed_content("train#dataset").domain_a._cache)
    assert "iteration 5 (epoch 2)" in str(error) and "loss_G = nan" in str(error) and "loss_cycle_A = nan" in str(error)
    out = tmp_path / "cyclegan"
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint_epoch=1.pt"]  # no model.pt
    good = load(out / "checkpoint_epoch=1.pt")
    assert good["trainer"]["iteration"] == 4
    assert all(torch.isfinite(v).all() for net in ("G_AB", "G_BA", "D_A", "D_B") for v in good[net].values() if v.is_floating_point())


def test_nan_loss_leaves_the_weights_of_the_last_good_step():
    """The check runs before backward/step: a NaN batch never reaches the weights (or the EMA)."""
    torch.manual_seed(0)
    network = ScoreUNet(1, channels=(16, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=16, norm_num_groups=16)
    batches = [{"image": torch.rand(2, 1, 16, 16), "condition": torch.rand(2, 1, 16, 16)} for _ in range(2)]
    batches[1]["image"][0, 0, 3, 3] = float("inf")
    trainer = ScoreMatchingTrainer("cpu", 1, batches, network, torch.optim.Adam(network.parameters()), VESDE())
    snapshot = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: snapshot.update(network=[p.clone() for p in network.parameters()]))
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(epoch 1\).*loss = (nan|inf)"):
        trainer.run()
    assert all(torch.equal(p, q) for p, q in zip(network.parameters(), snapshot["network"]))


# ---------------------------------------------------------------- checkpoints know their networks


def test_cyclegan_checkpoint_refuses_other_networks_naming_the_keys(cyclegan_uninterrupted, prepared, tmp_path):
    model = cyclegan_uninterrupted / "model.pt"
    preprocess = read_prepare_config(prepared, 32)
    assert load(model)["model_spec"] == {
        "preprocess": json.loads(json.dumps(preprocess.to_dict())),
        "generator": {"in_channels": 1, "out_channels": 1, "ngf": 4, "n_blocks": 1},
        "discriminator": {"in_channels": 1, "ndf": 4, "n_layers": 2},
    }
    load_generator(ResnetGenerator(ngf=4, n_blocks=1), model, "BA", preprocess)  # the same networks load
    with pytest.raises(TsgmInputError) as excinfo:
        load_generator(ResnetGenerator(ngf=8, n_blocks=2), model, "AB", replace(preprocess, image_size=64))
    assert excinfo.value.path == str(model)
    assert (
        "generator.n_blocks: checkpoint 1, config 2; generator.ngf: checkpoint 4, config 8; preprocess.image_size: checkpoint 32, config 64"
    ) in excinfo.value.problem

    # the inference bundle (pseudo-pairs) refuses data prepared otherwise than the generator's, before writing anything
    percentile = tmp_path / "percentile"
    shutil.copytree(prepared, percentile)
    config = json.loads((percentile / "prepare_config.json").read_text())
    (percentile / "prepare_config.json").write_text(json.dumps({**config, "normalization": "brain_median"}))
    with pytest.raises(Exception) as excinfo:
        run(
            "inference",
            config_file=[str(CYCLEGAN / "inference.yaml")],
            logging_file=False,
            work_dir=str(tmp_path),
            prepared_dir=str(percentile),
            checkpoint=str(model),
            image_size=32,
            ngf=4,
            n_blocks=1,
        )
    assert "preprocess.normalization: checkpoint 'percentile', config 'brain_median'" in str(cause(excinfo.value, TsgmInputError))
    assert not (tmp_path / "pseudo_pairs").exists()

    # resuming training with other networks is refused, naming the checkpoint and the keys
    work = tmp_path / "resume"
    (work / "cyclegan").mkdir(parents=True)
    (work / "cyclegan" / "checkpoint_epoch=2.pt").write_bytes((cyclegan_uninterrupted / "checkpoint_epoch=2.pt").read_bytes())
    with pytest.raises(Exception) as excinfo:
        run(
            "training",
            config_file=CYCLEGAN_CONFIGS,
            logging_file=False,
            resume=True,
            **dict(CYCLEGAN_TINY, work_dir=str(work), prepared_dir=str(prepared), ndf=8, n_epochs=3),
        )
    error = cause(excinfo.value, TsgmInputError)
    assert error.path.endswith("checkpoint_epoch=2.pt") and "discriminator.ndf: checkpoint 4, config 8" in error.problem


# ---------------------------------------------------------------- same seed, same losses


def test_same_seed_same_losses_score_trainer():
    def losses(seed: int) -> list[float]:
        torch.manual_seed(seed)
        network = ScoreUNet(1, channels=(16, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=16, norm_num_groups=16)
        data = torch.utils.data.DataLoader(
            [{"image": torch.rand(1, 16, 16), "condition": torch.rand(1, 16, 16)} for _ in range(6)], batch_size=2, shuffle=True
        )
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        trainer = ScoreMatchingTrainer(
            "cpu", 2, data, network, optimizer, VESDE(), linear_warmup(optimizer, 2), seed=seed, loss_weight=network.loss_weight
        )
        recorded: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: recorded.append(float(e.state.output["loss"])))
        trainer.run()
        return recorded

    first = losses(0)
    assert len(first) == 6 and first == losses(0)
    assert first != losses(1)


def test_same_seed_same_losses_cyclegan_trainer(prepared):
    def losses(seed: int) -> list[dict[str, float]]:
        torch.manual_seed(seed)
        g_ab, g_ba = ResnetGenerator(ngf=4, n_blocks=1), ResnetGenerator(ngf=4, n_blocks=1)
        d_a, d_b = PatchDiscriminator(ndf=4, n_layers=2), PatchDiscriminator(ndf=4, n_layers=2)
        g_opt = torch.optim.Adam(list(g_ab.parameters()) + list(g_ba.parameters()), lr=2e-4, betas=(0.5, 0.999))
        d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=2e-4, betas=(0.5, 0.999))
        data = torch.utils.data.DataLoader(UnpairedSliceDataset(prepared, image_size=32, flip=True, seed=seed), batch_size=2, shuffle=True)
        trainer = CycleGANTrainer("cpu", 1, data, g_ab, g_ba, d_a, d_b, g_opt, d_opt, ImagePool(4, seed), ImagePool(4, seed + 1), epoch_length=4)
        recorded: list[dict[str, float]] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: recorded.append(dict(e.state.output)))
        trainer.run()
        return recorded

    first = losses(0)
    assert len(first) == 4 and first == losses(0)
    assert first != losses(1)


def test_progress_bar_only_on_a_terminal(tmp_path):
    """A log file gets no per-iteration bar redraws; a terminal gets the bar (and its output transform)."""
    import io

    from ignite.engine import Engine

    from tsgm_components.engines.progress import TerminalProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, attached in ((io.StringIO(), False), (Terminal(), True), (open(tmp_path / "log.txt", "w"), False)):
        engine = Engine(lambda engine, batch: {"loss": torch.tensor(0.5)})
        bar = TerminalProgressBar(lambda output: {"loss": float(output["loss"])}, stream=stream)
        assert bar.attach(engine) is attached
        engine.run(range(3), max_epochs=1)
        drawn = stream.getvalue() if isinstance(stream, io.StringIO) else (tmp_path / "log.txt").read_text()
        assert ("loss=0.5" in drawn) is attached
