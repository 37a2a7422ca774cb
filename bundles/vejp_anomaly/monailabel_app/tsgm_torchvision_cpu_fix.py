"""Let the PyPI torchvision import next to the CPU build of torch (installed by `make install-monailabel`).

torchvision 0.28.0, the release for torch 2.13, is on PyPI only as a CUDA build: its C++ ops (_C.so) need
libc10_cuda.so / libtorch_cuda.so, which the CPU torch does not have. torchvision then imports without its ops,
except that `torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms` and
`torchvision::qnms` without checking that the ops exist, so `import torchvision` fails with
"RuntimeError: operator torchvision::nms does not exist". MONAI Label imports torchvision when its server starts
(only for torchvision.utils.make_grid / save_image, pure Python).

Installed as a .pth hook: when torchvision is first imported and its _C.so cannot be loaded, this declares the two
operator schemas (no kernels) before torchvision registers them, so the import succeeds; torchvision.ops.nms then
fails with "Could not run 'torchvision::nms' with arguments from the 'CPU' backend" instead of breaking every import.
Nothing happens when _C.so loads (a torchvision that matches the installed torch). torch is imported only when
torchvision is.
"""

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the schema definitions alive


def _declare_missing_ops(extension_path):
    global _library
    import ctypes

    import torch

    try:
        ctypes.CDLL(extension_path)
        return  # the C++ ops load: nothing to do
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        import os

        spec = importlib.util.find_spec("torchvision")
        if spec is not None and spec.submodule_search_locations:
            import glob

            found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
            if found:
                _declare_missing_ops(found[0])
        return spec


def install():
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install_hook():
    """Copy this module into the running environment's site-packages with a .pth file that imports it."""
    import os
    import shutil
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    shutil.copyfile(os.path.abspath(__file__), os.path.join(site, "tsgm_torchvision_cpu_fix.py"))
    with open(os.path.join(site, "tsgm_torchvision_cpu_fix.pth"), "w") as f:
        f.write("import tsgm_torchvision_cpu_fix\n")
    print(f"installed the torchvision import hook in {site}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit(f"usage: {sys.executable} {sys.argv[0]} --install")
    install_hook()
else:
    install()
