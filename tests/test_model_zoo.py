"""MONAI Model Zoo checks of the bundles: metadata against the vendored schema (offline), the shipped networks against
their metadata's network_data_format, and the TorchScript export of the CycleGAN generators (``ckpt_export``).

The score network of vejp_anomaly does not export to TorchScript (its docs say why); verify_net_in_out covers it with
its extra inputs (σ, condition) through ``extra_forward_args``."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from tsgm_components import REPO_ROOT

BUNDLES = REPO_ROOT / "bundles"
#: the schema every metadata.json names, vendored so the check runs offline (verify_metadata reads a local file first)
SCHEMA = BUNDLES / "meta_schema_20240725.json"
METADATA = sorted(BUNDLES.glob("*/configs/metadata.json"))


@pytest.mark.parametrize("meta_file", METADATA, ids=lambda p: p.parts[-3])
def test_metadata_matches_the_vendored_schema(meta_file):
    assert json.loads(meta_file.read_text())["schema"].endswith(SCHEMA.name)
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))


@pytest.mark.parametrize("checkpoint", ["model.pt", "phantom.pt"])
def test_the_shipped_score_networks_match_their_metadata(checkpoint):
    configs = BUNDLES / "vejp_anomaly" / "configs"
    meta = json.loads((configs / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    size = meta["spatial_shape"]
    verify_net_in_out(
        "network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.yaml"),
        device="cpu",
        checkpoint=str(BUNDLES / "vejp_anomaly" / "models" / checkpoint),
        extra_forward_args={"sigma": torch.tensor([1.0]), "condition": torch.rand(1, 1, *size)},
    )


@pytest.mark.parametrize("generator", ["G_AB", "G_BA"])
def test_the_shipped_generators_export_to_torchscript(tmp_path, generator):
    """``python -m monai.bundle ckpt_export network_def --key_in_ckpt G_AB ...`` (bundles/cyclegan_brats/docs/README.md):
    the TorchScript file loads without the package and computes what the generator computes."""
    configs, checkpoint = BUNDLES / "cyclegan_brats" / "configs", BUNDLES / "cyclegan_brats" / "models" / "model.pt"
    exported = tmp_path / f"{generator}.ts"
    ckpt_export(
        "network_def",
        filepath=str(exported),
        ckpt_file=str(checkpoint),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.yaml"),
        key_in_ckpt=generator,
    )
    scripted = torch.jit.load(str(exported), map_location="cpu").eval()
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.yaml"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)[generator])
    image = json.loads((configs / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    x = torch.rand(2, image["num_channels"], *image["spatial_shape"])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network.eval()(x), rtol=1e-5, atol=1e-6)
