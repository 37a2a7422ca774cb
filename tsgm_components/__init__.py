"""TSGM components: networks, losses, SDE, samplers, engines, data and metrics for the tsgm MONAI bundles."""

from pathlib import Path

__version__ = "0.1.0"

#: Root of the repository checkout (bundles live in ``REPO_ROOT / "bundles"``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def bundle_dir(name: str) -> str:
    """Absolute path of the bundle folder ``bundles/<name>`` shipped with this package.

    Bundle configs use it as their default ``bundle_root`` so that
    ``python -m monai.bundle run ... --config_file <abs path>`` works from any working directory.
    """
    path = REPO_ROOT / "bundles" / name
    if not path.is_dir():
        raise FileNotFoundError(f"bundle '{name}' not found at {path}")
    return str(path)
