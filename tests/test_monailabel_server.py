"""A real MONAI Label server serving the vejp_anomaly bundle (shipped weights) through its infer endpoint.

Needs the optional MONAI Label install (`make install-monailabel`, bundles/vejp_anomaly/docs/README.md); skipped
where `monailabel` is not installed. The server runs as `monailabel start_server` in a subprocess on a free
localhost port with the app in bundles/vejp_anomaly/monailabel_app (copied to tmp_path: start_server writes
model/, logs/, lib/ and bin/ into the app folder). Only the sampler is made cheaper (one draw of 2 Heun levels,
`--conf bundle_overrides`); the network, its weights, the calibration and the transforms are the bundle's.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")
from requests_toolbelt.multipart import decoder  # noqa: E402  (a monailabel dependency)

nib = pytest.importorskip("nibabel")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "bundles" / "vejp_anomaly" / "monailabel_app"
MODALITIES = ("t1", "t1ce", "t2", "flair")  # the bundle's channel_modalities
#: the phantom's BraTS affine diag(-1, -1, 1) moved by an offset: the label must come back in this geometry
AFFINE = np.array([[-1.0, 0, 0, 12.5], [0, -1.0, 0, 230.0], [0, 0, 1.0, -40.0], [0, 0, 0, 1]])
#: the image is a phantom subject: the phantom-trained weights (and their calibration, read beside them) serve it
OVERRIDES = {
    "sample_batch_size": 64,
    "slice_inferer#progress": False,
    "checkpoint": str(Path(__file__).resolve().parents[1] / "bundles" / "vejp_anomaly" / "models" / "phantom.pt"),
}
START_TIMEOUT_S = 120
INFER_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image_4ch(tmp_path_factory) -> Path:
    """One phantom subject with a tumour, as ONE 4-channel NIfTI (channels t1, t1ce, t2, flair); its tumour
    segmentation beside it (S001_seg.nii.gz)."""
    from tsgm_components.data.phantom import PhantomConfig, generate_subject

    subject = generate_subject(1, PhantomConfig(n_subjects=2, seed=0), with_lesions=True)
    assert subject.seg[:, :, 80:129].any(), "the phantom subject has no lesion in the processed slices"
    stacked = np.stack([subject.volumes[m].astype(np.float32) for m in MODALITIES], -1)
    path = tmp_path_factory.mktemp("monailabel_input") / "S001_4ch.nii.gz"
    nib.save(nib.Nifti1Image(stacked, AFFINE), str(path))
    nib.save(nib.Nifti1Image(subject.seg, AFFINE), str(path.parent / "S001_seg.nii.gz"))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`monailabel start_server` with the app and the vejp_anomaly bundle of this repository; always terminated."""
    work = tmp_path_factory.mktemp("monailabel_server")
    app = work / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "lib", "bin", "__pycache__"))
    studies = work / "studies"
    studies.mkdir()
    port = free_port()
    monailabel = Path(sys.executable).parent / "monailabel"
    command = [
        str(monailabel), "start_server", "--app", str(app), "--studies", str(studies),
        "--conf", "models", "vejp_anomaly",
        "--conf", "bundles_dir", str(REPO / "bundles"),
        "--conf", "bundle_overrides", json.dumps(OVERRIDES, separators=(",", ":")),  # no spaces: the monailabel script splits on them
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = dict(os.environ, MONAILABEL_PYEXE=sys.executable, BUNDLE_DOWNLOAD_SRC="local")
    log = open(work / "server.log", "wb")
    process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"monailabel start_server exited ({process.returncode}):\n{tail(work / 'server.log')}")
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /info/ from MONAI Label within {START_TIMEOUT_S} s:\n{tail(work / 'server.log')}")
            time.sleep(1)
        yield url, work / "server.log"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def test_info_lists_the_bundle(server):
    url, _ = server
    info = requests.get(f"{url}/info/", timeout=30).json()
    assert "vejp_anomaly" in info["models"], info["models"].keys()


def test_infer_returns_label_in_input_geometry(server, image_4ch, tmp_path):
    url, log = server
    with open(image_4ch, "rb") as f:
        response = requests.post(
            f"{url}/infer/vejp_anomaly",
            params={"output": "all"},
            files={"file": (image_4ch.name, f, "application/gzip")},
            data={"params": json.dumps({})},
            timeout=INFER_TIMEOUT_S,
        )
    assert response.ok, f"{response.status_code} {response.text[:2000]}\n{tail(log)}"
    parts = decoder.MultipartDecoder(response.content, response.headers["content-type"]).parts
    by_name = {}
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        name = disposition.split('name="')[1].split('"')[0]
        by_name[name] = part
    assert "image" in by_name, f"no label image in the response: {list(by_name)}; {by_name.get('params')}"
    label_path = tmp_path / "label.nii.gz"
    label_path.write_bytes(by_name["image"].content)
    label = nib.load(str(label_path))
    source = nib.load(str(image_4ch))
    assert label.shape[:3] == source.shape[:3] and all(s == 1 for s in label.shape[3:]), (label.shape, source.shape)
    assert np.allclose(label.affine, source.affine), (label.affine, source.affine)
    values = np.asarray(label.dataobj)
    assert np.isfinite(values).all() and values.max() > 0
    # the anomaly label lies inside the processed slices (80-128) and the brain
    assert not values[:, :, :80].any() and not values[:, :, 129:].any()
    brain = source.get_fdata(dtype=np.float32)[..., 0] != 0
    assert not values[~brain.reshape(values.shape[:3])].any()
    # and it covers most of the phantom's tumour (a plumbing check with the bundle's default sampler and the shipped
    # calibration, not a quality check)
    tumour = np.asarray(nib.load(str(image_4ch.parent / "S001_seg.nii.gz")).dataobj) > 0
    hits = (values.reshape(tumour.shape) > 0) & tumour
    assert hits.sum() > 0.5 * tumour.sum(), (hits.sum(), tumour.sum(), (values > 0).sum())
