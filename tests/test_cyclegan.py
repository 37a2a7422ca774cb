"""Stage 1 (CycleGAN bundle `cyclegan_brats`): networks, losses, engine, resume, DDP, configs, pseudo-pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.bundle import verify_metadata

from tsgm_components import REPO_ROOT
from tsgm_components.checkpoints import SPEC_KEY, CycleGANSpec
from tsgm_components.data.prepare import read_prepare_config
from tsgm_components.data.pseudo_pairs import blend_lesions, lesion_weights, random_shift
from tsgm_components.data.unpaired import UnpairedSliceDataset, load_slice_items
from tsgm_components.engines.cyclegan import CycleGANTrainer, LinearDecayLR
from tsgm_components.errors import TsgmInputError
from tsgm_components.losses.gan import CycleGANLossWeights, ImagePool
from tsgm_components.networks.cyclegan import PatchDiscriminator, ResnetGenerator
from tsgm_components.stage1.translation import load_generator, translate_slices, translate_subject, translate_volume

MODS = ("t1", "t1ce", "t2", "flair")


def make_prepared(root: str | Path, size: int = 32, n_subjects: int = 3, n_z: int = 4, seed: int = 0) -> Path:
    """A tiny prepared dataset following docs/architecture.md: ellipse 'brains', tumour discs on half the slices.

    Subjects ``sub0..`` (the last one is the validation split); z = 80..80+n_z-1; even z are healthy.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    yy, xx = np.mgrid[:size, :size] / size
    brain = ((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.32) ** 2 < 1
    subjects = [f"sub{i}" for i in range(n_subjects)]
    datalist: dict[str, list] = {"training": [], "validation": [], "test": []}
    for s, subject in enumerate(subjects):
        split = "validation" if s == n_subjects - 1 else "training"
        (root / "slices" / subject).mkdir(parents=True, exist_ok=True)
        for z in range(80, 80 + n_z):
            tumour = z % 2
            cy, cx = rng.uniform(0.35, 0.65, 2)
            lesion = brain & (((yy - cy) ** 2 + (xx - cx) ** 2) < 0.015) if tumour else np.zeros_like(brain)
            np.save(root / "slices" / subject / f"seg_z{z:03d}.npy", lesion.astype(np.uint8))
            for m, mod in enumerate(MODS):
                image = brain * (0.3 + 0.1 * m + 0.05 * np.sin(8 * xx + m + z)) + 0.02 * rng.standard_normal((size, size))
                image = np.where(lesion, 0.95, image) * brain
                np.save(root / "slices" / subject / f"{mod}_z{z:03d}.npy", np.clip(image, 0, 1).astype(np.float32))
                datalist[split].append(
                    {
                        "image": f"slices/{subject}/{mod}_z{z:03d}.npy",
                        "label": f"slices/{subject}/seg_z{z:03d}.npy",
                        "subject": subject,
                        "modality": mod,
                        "z": z,
                        "tumour": tumour,
                    }
                )
    (root / "datalist.json").write_text(json.dumps(datalist))
    (root / "prepare_config.json").write_text(
        json.dumps(
            {"z_min": 80, "z_max": 80 + n_z - 1, "image_size": size, "pad_to": size, "lower_percentile": 1.0, "upper_percentile": 99.0, "seed": seed}
        )
    )
    (root / "split.json").write_text(json.dumps({"training": subjects[:-1], "validation": subjects[-1:], "test": []}))
    return root


BUNDLE = REPO_ROOT / "bundles" / "cyclegan_brats"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO_ROOT / "bundles" / "meta_schema_20240725.json"
#: tiny networks and short runs for the bundle tests (32x32 slices)
TINY = {"image_size": 32, "ngf": 4, "n_blocks": 1, "ndf": 4, "num_workers": 0, "cache_rate": 1.0, "log_every": 1}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from intra-op threads, and on a shared 2-core machine OpenMP oversubscription
    slows them 10-20x; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("cyclegan") / "prepared", size=32, n_subjects=3, n_z=4)


def tiny_trainer(prepared: Path, max_epochs: int, epoch_length: int, batch_size: int = 4, seed: int = 0) -> CycleGANTrainer:
    torch.manual_seed(seed)
    g_ab, g_ba = ResnetGenerator(ngf=8, n_blocks=2), ResnetGenerator(ngf=8, n_blocks=2)
    d_a, d_b = PatchDiscriminator(ndf=8, n_layers=2), PatchDiscriminator(ndf=8, n_layers=2)
    g_opt = torch.optim.Adam(list(g_ab.parameters()) + list(g_ba.parameters()), lr=2e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), lr=2e-4, betas=(0.5, 0.999))
    loader = torch.utils.data.DataLoader(UnpairedSliceDataset(prepared, image_size=32, seed=seed), batch_size=batch_size, shuffle=True)
    return CycleGANTrainer(
        "cpu", max_epochs, loader, g_ab, g_ba, d_a, d_b, g_opt, d_opt, ImagePool(4, seed), ImagePool(4, seed + 1), epoch_length=epoch_length
    )


def test_paper_scale_parameter_counts_and_shapes():
    # reference resnet_9blocks / 70x70 PatchGAN with input_nc = output_nc = 1
    assert n_params(ResnetGenerator(1, 1, ngf=64, n_blocks=9)) == 11_365_633
    assert n_params(PatchDiscriminator(1, ndf=64, n_layers=3)) == 2_762_689
    generator, discriminator = ResnetGenerator(ngf=8, n_blocks=2), PatchDiscriminator(ndf=8)
    x = torch.rand(2, 1, 64, 64)
    y = generator(x)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert discriminator(x).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (70x70 receptive field)
    # N(0, 0.02) initialisation, zero biases
    conv = generator.model[1]
    assert abs(conv.weight.std().item() - 0.02) < 0.004 and not conv.bias.any()


def test_linear_decay_schedule_and_image_pool():
    factor = LinearDecayLR(n_epochs=2, n_epochs_decay=3)
    assert [factor(e) for e in range(6)] == pytest.approx([1, 1, 0.75, 0.5, 0.25, 0])
    pool = ImagePool(pool_size=3, seed=1)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling up: returned as is
    saved = pool.state_dict()
    later = [pool.query(torch.full((4, 1, 1, 1), 10.0 + i)) for i in range(5)]
    assert any((out < 10).any() for out in later) and any((out >= 10).any() for out in later)  # history mixed in
    restored = ImagePool(pool_size=3, seed=99)
    restored.load_state_dict(saved)
    assert all(torch.equal(restored.query(torch.full((4, 1, 1, 1), 10.0 + i)), later[i]) for i in range(5))


def test_unpaired_dataset_domains(tiny_prepared, tmp_path):
    dataset = UnpairedSliceDataset(tiny_prepared, image_size=32, seed=0)
    items = load_slice_items(tiny_prepared, "training")
    n_a, n_b = sum(i["tumour"] == 0 for i in items), sum(i["tumour"] == 1 for i in items)
    assert len(dataset) == max(n_a, n_b) == 16  # 2 subjects x 4 slices x 4 modalities, half healthy
    assert {i["tumour"] for i in dataset.domain_a.data} == {0} and {i["tumour"] for i in dataset.domain_b.data} == {1}
    assert len(dataset.domain_a.data) == n_a and len(dataset.domain_b.data) == n_b
    sample = dataset[3]
    assert sample["A"].shape == sample["B"].shape == (1, 32, 32) and sample["A"].dtype == torch.float32
    assert type(sample["A"]) is torch.Tensor  # no MetaTensor: checkpoints of the image pools load with weights_only
    torch.testing.assert_close(sample["A"][0], torch.from_numpy(np.load(dataset.domain_a.data[3]["image"])))
    # B is drawn at random, reproducibly for a seed, and differs between seeds
    draws = [torch.stack([UnpairedSliceDataset(tiny_prepared, seed=seed)[i]["B"] for i in range(8)]) for seed in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with pytest.raises(TsgmInputError, match="image_size=32 but the config expects image_size=64"):
        UnpairedSliceDataset(tiny_prepared, image_size=64)
    healthy_only = make_prepared(tmp_path / "healthy", size=32, n_subjects=2, n_z=1)  # z=80 only: healthy
    with pytest.raises(TsgmInputError, match="no tumour"):
        UnpairedSliceDataset(healthy_only)


def test_one_iteration_updates_all_four_networks(tiny_prepared):
    trainer = tiny_trainer(tiny_prepared, max_epochs=1, epoch_length=1)
    networks = {"G_AB": trainer.g_ab, "G_BA": trainer.g_ba, "D_A": trainer.d_a, "D_B": trainer.d_b}
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in networks.items()}
    trainer.run()
    for name, net in networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), f"{name} not updated"
        assert all(p.requires_grad for p in net.parameters())
    expected = {"loss_gan_AB", "loss_gan_BA", "loss_cycle_A", "loss_cycle_B", "loss_idt_AB", "loss_idt_BA", "loss_G", "loss_D_A", "loss_D_B", "lr"}
    output = trainer.state.output
    assert set(output) == expected and all(isinstance(v, float) and np.isfinite(v) for v in output.values())
    assert output["lr"] == 2e-3
    parts = sum(v for k, v in output.items() if k not in ("loss_G", "loss_D_A", "loss_D_B", "lr"))
    assert output["loss_G"] == pytest.approx(parts, rel=1e-5)


def test_training_lowers_cycle_loss(tiny_prepared):
    trainer = tiny_trainer(tiny_prepared, max_epochs=1, epoch_length=40)
    cycle = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: cycle.append(e.state.output["loss_cycle_A"] + e.state.output["loss_cycle_B"]))
    trainer.run()
    assert len(cycle) == 40
    assert np.mean(cycle[-8:]) < 0.6 * np.mean(cycle[:8]), cycle


def test_loss_weights_identity_off():
    weights = CycleGANLossWeights(identity=0.0)
    x = torch.rand(1, 1, 8, 8)
    losses = weights.generator_losses(x, x, x, x, None, None, torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    # rec == real: no cycle loss; D says 'real' for fake B (0 loss) and 'fake' for fake A (loss 1)
    assert losses["loss_cycle_A"] == 0 and losses["loss_gan_AB"] == 0 and losses["loss_gan_BA"] == 1
    assert "loss_idt_AB" not in losses and losses["loss_G"] == 1


def test_change_term_penalises_what_g_ab_changes():
    x = torch.rand(1, 1, 8, 8)
    scores = (torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    plain = CycleGANLossWeights(identity=0.0).generator_losses(x, x, x, x, None, None, *scores)
    weights = CycleGANLossWeights(identity=0.0, change_ab=2.0)
    same = weights.generator_losses(x, x, x, x, None, None, *scores, fake_b=x)
    moved = weights.generator_losses(x, x, x, x, None, None, *scores, fake_b=x + 0.25)
    assert "loss_change_AB" not in plain and same["loss_change_AB"] == 0 and same["loss_G"] == plain["loss_G"]
    # 2 · (reference [-1, 1] scale: 2 × 0.25)
    assert torch.isclose(moved["loss_change_AB"], torch.tensor(1.0)) and torch.isclose(moved["loss_G"], plain["loss_G"] + 1)
    with pytest.raises(ValueError, match="fake_b"):
        weights.generator_losses(x, x, x, x, None, None, *scores)


def run_bundle(run_id: str, config: str, **overrides) -> None:
    """Run the bundle in this process (no second `import monai`), leaving the test session's logging alone."""
    files = [str(CONFIGS / config)]
    bundle_run(run_id, config_file=files, logging_file=False, **overrides)


def test_configs_parse_and_build_networks(tmp_path):
    paper = ConfigParser()
    paper.read_config(str(CONFIGS / "train.yaml"))
    assert (paper["image_size"], paper["n_blocks"], paper["batch_size"], paper["n_epochs"], paper["n_epochs_decay"]) == (256, 9, 1, 100, 100)
    assert n_params(paper.get_parsed_content("g_ab_def")) == 11_365_633
    assert n_params(paper.get_parsed_content("d_b_def")) == 2_762_689
    small = ConfigParser()
    small.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "cpu.yaml")])
    generator = small.get_parsed_content("g_ab_def")  # the four modalities of a slice as channels
    assert small["image_size"] == 64 and generator(torch.rand(1, 4, 64, 64)).shape == (1, 4, 64, 64)
    assert n_params(generator) < 1_000_000
    # inference builds the generator its checkpoint records, in the training generator's state-dict layout
    for trained in (paper.get_parsed_content("g_ab_def"), generator):
        checkpoint = tmp_path / "model.pt"
        torch.save({SPEC_KEY: CycleGANSpec(None, trained.config).state_dict()}, checkpoint)
        inference = ConfigParser()
        inference.read_config(str(CONFIGS / "inference.yaml"))
        inference.update({"checkpoint": str(checkpoint)})
        assert inference.get_parsed_content("network_def").state_dict().keys() == trained.state_dict().keys()
    ddp = ConfigParser()
    ddp.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")])
    assert ddp["train#dataloader#shuffle"] is False and ddp["train#sampler#_target_"] == "DistributedSampler"


def test_metadata_is_valid():
    assert SCHEMA.is_file()
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    # the shipped generators' format (4-channel slices at 64², the CPU scale); the paper scale trains 1 channel at 256²
    assert image["num_channels"] == pred["num_channels"] == 4 and image["spatial_shape"] == [64, 64]
    assert image["value_range"] == pred["value_range"] == [0, 1]
    for path in ("LICENSE", "docs/README.md", "configs/logging.conf"):
        assert (BUNDLE / path).is_file()


def test_bundle_training_checkpoint_and_resume(tiny_prepared, tmp_path):
    common = dict(TINY, work_dir=str(tmp_path), prepared_dir=str(tiny_prepared), epoch_length=3, n_epochs_decay=0)
    run_bundle("training", "train.yaml", n_epochs=1, **common)
    out = tmp_path / "cyclegan"
    first = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    assert set(first) == {
        "G_AB",
        "G_BA",
        "D_A",
        "D_B",
        "g_optimizer",
        "d_optimizer",
        "g_scheduler",
        "d_scheduler",
        "pool_a",
        "pool_b",
        "trainer",
        "rng",
        "model_spec",
    }
    assert (first["trainer"]["iteration"], first["trainer"]["epoch_length"]) == (3, 3)  # epoch = iteration // epoch_length
    assert (out / "model.pt").is_file() and (out / "snapshots" / "epoch_0001.png").is_file() and list((out / "logs").glob("events.*"))

    run_bundle("training", "train.yaml", n_epochs=2, resume=True, **common)
    second = torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)
    assert (second["trainer"]["iteration"], second["trainer"]["max_epochs"]) == (6, 2)
    # Adam kept counting from the restored state (a fresh optimiser would be at 3 steps)
    assert all(s["step"] == 6 for s in second["g_optimizer"]["state"].values())
    assert second["g_scheduler"]["last_epoch"] == 2
    assert len(second["pool_a"]["images"]) == 6  # the image pool carried on filling (batch 1, pool size 50)
    with pytest.raises(RuntimeError) as error:  # MONAI wraps errors raised inside config expressions
        run_bundle("training", "train.yaml", n_epochs=1, resume=True, **dict(common, work_dir=str(tmp_path / "empty")))
    assert isinstance(error.value.__cause__, TsgmInputError) and "resume requested but there is no checkpoint" in str(error.value.__cause__)


def test_two_process_gloo_training(tiny_prepared, tmp_path):
    configs = f"['{CONFIGS / 'train.yaml'}','{CONFIGS / 'multi_gpu_train.yaml'}']"
    overrides = [
        f"--{k}={v}" for k, v in dict(TINY, prepared_dir=tiny_prepared, work_dir=tmp_path, epoch_length=2, n_epochs=1, n_epochs_decay=0).items()
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "cyclegan" / "model.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2
    assert len(list((tmp_path / "cyclegan" / "logs").glob("events.*"))) == 1  # rank 0 only
    assert "module." not in next(iter(checkpoint["G_AB"]))  # saved without the DDP wrapper


@pytest.fixture(scope="module")
def tiny_checkpoint(prepared_dir, tmp_path_factory) -> Path:
    """A checkpoint in the training layout holding randomly initialised TINY generators trained on ``prepared_dir``."""
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.manual_seed(0)
    generators = {key: ResnetGenerator(ngf=TINY["ngf"], n_blocks=TINY["n_blocks"]) for key in ("G_AB", "G_BA")}
    spec = CycleGANSpec(read_prepare_config(prepared_dir, 32), generators["G_AB"].config)  # configs build from it
    torch.save({**{key: g.state_dict() for key, g in generators.items()}, SPEC_KEY: spec.state_dict()}, path)
    return path


def test_pseudo_pairs_from_bundle(prepared_dir, tiny_checkpoint, tmp_path):
    run_bundle(
        "inference",
        "inference.yaml",
        work_dir=str(tmp_path),
        prepared_dir=str(prepared_dir),
        checkpoint=str(tiny_checkpoint),
        image_size=32,
        ngf=TINY["ngf"],
        n_blocks=TINY["n_blocks"],
    )
    pairs_dir = tmp_path / "pseudo_pairs"
    pairs = json.loads((pairs_dir / "pseudo_pairs.json").read_text())
    assert set(pairs) == {"training", "validation"}
    generator = load_generator(ResnetGenerator(ngf=TINY["ngf"], n_blocks=TINY["n_blocks"]), tiny_checkpoint)
    for split in ("training", "validation"):
        healthy = [i for i in load_slice_items(prepared_dir, split) if i["tumour"] == 0]
        assert len(pairs[split]) == len(healthy) > 0  # every healthy slice of every modality, nothing more
        assert sorted(p["image"] for p in pairs[split]) == sorted(i["image"] for i in healthy)
    item = pairs["training"][0]
    condition = np.load(pairs_dir / item["condition"])
    assert condition.shape == (32, 32) and condition.dtype == np.float32 and 0 <= condition.min() and condition.max() <= 1
    expected = translate_slices(generator, torch.from_numpy(np.load(item["image"]))[None, None])[0, 0].numpy()
    np.testing.assert_allclose(condition, expected, atol=1e-6)
    conditions = np.stack([np.load(pairs_dir / p["condition"]) for p in pairs["validation"]])
    assert 0 <= conditions.min() and conditions.max() <= 1
    assert not list(tmp_path.glob(".pseudo_pairs*"))  # atomic: no temporary folder left
    with pytest.raises(RuntimeError) as error:  # never overwritten silently (MONAI wraps the FileExistsError)
        run_bundle(
            "inference",
            "inference.yaml",
            work_dir=str(tmp_path),
            prepared_dir=str(prepared_dir),
            checkpoint=str(tiny_checkpoint),
            image_size=32,
            ngf=TINY["ngf"],
            n_blocks=TINY["n_blocks"],
        )
    assert isinstance(error.value.__cause__, FileExistsError)
    # lesion blending: per axial slice, x_A where G_AB's smoothed FLAIR/T2 change stays below the threshold (here the
    # median FLAIR change of the first slices, so that both cases occur with this untrained generator)
    by_slice: dict = {}
    for p in pairs["training"]:
        by_slice.setdefault((p["subject"], p["z"]), {})[p["modality"]] = p
    groups = list(by_slice.values())[:6]
    threshold = float(np.median([np.load(pairs_dir / g["flair"]["condition"]) - np.load(g["flair"]["image"]) for g in groups]))
    run_bundle(
        "inference",
        "inference.yaml",
        work_dir=str(tmp_path),
        prepared_dir=str(prepared_dir),
        checkpoint=str(tiny_checkpoint),
        image_size=32,
        ngf=TINY["ngf"],
        n_blocks=TINY["n_blocks"],
        pseudo_pairs_dir=str(tmp_path / "blended"),
        lesion_blend_threshold=threshold,
    )
    blended = json.loads((tmp_path / "blended" / "pseudo_pairs.json").read_text())
    assert blended == pairs
    untouched = blended_pixels = 0
    for group in groups:
        healthy = {m: np.load(p["image"]) for m, p in group.items()}
        raw = {m: np.load(pairs_dir / p["condition"]) for m, p in group.items()}
        weights = lesion_weights({m: raw[m] - healthy[m] for m in raw}, threshold)
        blended_pixels += int((weights > 0).sum())
        for m, p in group.items():
            mine = np.load(tmp_path / "blended" / p["condition"])
            np.testing.assert_allclose(mine, np.clip(healthy[m] + weights * (raw[m] - healthy[m]), 0, 1), atol=1e-6)
            np.testing.assert_array_equal(mine[weights == 0], healthy[m][weights == 0])
            untouched += int((weights == 0).sum())
    assert untouched > 0 and blended_pixels > 0
    # random placement: the same pairs on every run (seeded by subject and z), the lesion elsewhere than G_AB put it
    for name in ("placed", "placed_again"):
        run_bundle(
            "inference",
            "inference.yaml",
            work_dir=str(tmp_path),
            prepared_dir=str(prepared_dir),
            checkpoint=str(tiny_checkpoint),
            image_size=32,
            ngf=TINY["ngf"],
            n_blocks=TINY["n_blocks"],
            pseudo_pairs_dir=str(tmp_path / name),
            lesion_blend_threshold=threshold,
            lesion_placement="random",
        )
    conditions = {name: [np.load(tmp_path / name / p["condition"]) for p in pairs["training"]] for name in ("blended", "placed", "placed_again")}
    assert all(np.array_equal(a, b) for a, b in zip(conditions["placed"], conditions["placed_again"]))
    assert any(not np.array_equal(a, b) for a, b in zip(conditions["placed"], conditions["blended"]))
    with pytest.raises(RuntimeError) as error:
        run_bundle(
            "inference",
            "inference.yaml",
            work_dir=str(tmp_path),
            prepared_dir=str(prepared_dir),
            checkpoint=str(tiny_checkpoint),
            image_size=32,
            ngf=TINY["ngf"],
            n_blocks=TINY["n_blocks"],
            pseudo_pairs_dir=str(tmp_path / "nothing"),
            lesion_placement="random",
        )
    assert "needs a lesion_blend_threshold" in str(error.value.__cause__)


def test_lesion_weights_find_a_compact_added_lesion_and_ignore_texture():
    rng = np.random.default_rng(0)
    texture = {m: 0.05 * rng.standard_normal((64, 64)).astype(np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    lesion = np.zeros((64, 64), np.float32)
    lesion[20:28, 30:40] = 0.4  # a bright blob on FLAIR only
    changes = dict(texture, flair=texture["flair"] + lesion)
    weights = lesion_weights(changes, threshold=0.1)
    assert weights.dtype == np.float32 and 0 <= weights.min() and weights.max() <= 1
    assert (weights[22:26, 32:38] > 0.99).all()  # the lesion core is taken whole
    assert not weights[:10].any() and not weights[45:].any()  # texture alone is never a lesion
    assert weights[12:37, 22:48].sum() == weights.sum()  # only around the blob (smoothing, 2-px margin, 4-px feather)
    healthy = {m: np.full((64, 64), 0.4, np.float32) for m in changes}
    out = blend_lesions(healthy, {m: healthy[m] + changes[m] for m in changes}, 0.1)
    np.testing.assert_array_equal(out["t1"][:10], healthy["t1"][:10])
    np.testing.assert_allclose(out["flair"][24, 35], 0.4 + changes["flair"][24, 35], atol=1e-6)


def test_random_lesion_placement_moves_the_lesion_whole_inside_the_brain():
    healthy = {m: np.zeros((64, 64), np.float32) for m in ("t1", "t1ce", "t2", "flair")}
    for m in healthy:
        healthy[m][8:56, 8:56] = 0.4  # the brain: a 48×48 square
    lesion = np.zeros((64, 64), np.float32)
    lesion[12:18, 12:18] = 0.5  # a bright FLAIR/T2 blob in a corner of the brain
    translated = {m: healthy[m] + (lesion if m in ("t2", "flair") else 0.5 * lesion) for m in healthy}
    in_place = blend_lesions(healthy, translated, 0.1)
    weights = lesion_weights({m: translated[m] - healthy[m] for m in healthy}, 0.1)
    moved = [blend_lesions(healthy, translated, 0.1, np.random.default_rng(seed)) for seed in range(5)]
    assert all(
        np.array_equal(a[m], b[m])
        for a, b in zip(moved, [blend_lesions(healthy, translated, 0.1, np.random.default_rng(s)) for s in range(5)])
        for m in a
    )
    brain = healthy["flair"] > 0
    centres = set()
    for out in moved:
        change = out["flair"] - healthy["flair"]
        assert np.isclose(change.sum(), (in_place["flair"] - healthy["flair"]).sum(), rtol=0.1)  # the whole lesion, moved
        assert not change[~brain].any()  # never outside the brain
        assert np.allclose(out["t1"] - healthy["t1"], 0.5 * change)  # the same shift in every modality
        centres.add(tuple(np.round(np.argwhere(change > 0.25).mean(axis=0)).astype(int)))
    assert len(centres) == 5  # five seeds, five places
    shift = random_shift(weights, brain, np.random.default_rng(0))
    assert shift != (0, 0) and random_shift(np.zeros_like(weights), brain, np.random.default_rng(0)) == (0, 0)
    assert random_shift(weights, np.zeros_like(brain), np.random.default_rng(0)) == (0, 0)


def test_translate_slices_batching_and_errors(tiny_checkpoint, tmp_path):
    generator = load_generator(ResnetGenerator(ngf=TINY["ngf"], n_blocks=TINY["n_blocks"]), tiny_checkpoint, "BA")
    slices = torch.rand(5, 1, 32, 32)
    out = translate_slices(generator, slices, batch_size=2)
    assert out.shape == slices.shape and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, translate_slices(generator, slices, batch_size=5))
    with pytest.raises(ValueError, match="multiple of 4"):
        translate_slices(generator, torch.rand(1, 1, 30, 30))
    with pytest.raises(TsgmInputError, match="checkpoint not found"):
        load_generator(generator, tmp_path / "missing.pt")
    with pytest.raises(TsgmInputError, match="generator.ngf: checkpoint 4, config 8"):  # the spec names the keys
        load_generator(ResnetGenerator(ngf=8, n_blocks=1), tiny_checkpoint)


def test_translate_volume_keeps_geometry(phantom_dir, prepared_dir, tiny_checkpoint, tmp_path):
    generator = load_generator(ResnetGenerator(ngf=TINY["ngf"], n_blocks=TINY["n_blocks"]), tiny_checkpoint)
    source = sorted(phantom_dir.glob("*/*_flair.nii*"))[0]
    output = tmp_path / "flair_AB.nii.gz"
    translate_volume(generator, source, output, prepared_dir / "prepare_config.json")
    image, reference = nib.load(str(output)), nib.load(str(source))
    data = image.get_fdata()
    assert image.shape == reference.shape and np.allclose(image.affine, reference.affine)
    assert 0 <= data.min() and data.max() <= 1 and data[:, :, 80:129].max() > 0
    assert not data[:, :, :80].any() and not data[:, :, 129:].any()  # outside z_min..z_max
    with pytest.raises(FileExistsError):
        translate_volume(generator, source, output, prepared_dir / "prepare_config.json")
    with pytest.raises(TsgmInputError, match="input volume not found"):
        translate_volume(generator, tmp_path / "missing.nii.gz", tmp_path / "x.nii.gz", prepared_dir / "prepare_config.json")
    # a whole subject: the four modalities, each in the input geometry
    written = translate_subject(generator, source.parent, tmp_path / "subject", prepared_dir / "prepare_config.json", "AB")
    assert sorted(Path(p).name for p in written) == sorted(f"{source.parent.name}_{m}_AB.nii.gz" for m in MODS)
    assert all(nib.load(p).shape == reference.shape for p in written)


@pytest.mark.parametrize("checkpoint", ["model.pt", "phantom.pt"])
def test_model_zoo_net_check_passes_for_the_shipped_generators(checkpoint):
    """MONAI's verify_net_in_out: the metadata describes what the shipped generators take and return (4 channels at
    64²), for the real-trained default and the phantom set."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        "network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.yaml"),
        device="cpu",
        checkpoint=str(CONFIGS.parent / "models" / checkpoint),
    )
