"""The bundles' entry point, imported by their configs (``imports:``), never by the package: a
``python -m monai.bundle run ...`` that dies of bad input ends with the project's one-line message and exit code 2.
``import tsgm_components`` itself changes no global state.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tsgm_components.errors import user_error


def install_excepthook() -> None:
    """Make a run that dies of a user error end with the project's one-line message, exit code 2.

    ``python -m monai.bundle run`` prints the traceback and MONAI's dump of the failed config expression, which buries
    the message ~24 lines up. The traceback is still printed (by the previous hook); then ``tsgm: error: <path>:
    <problem>`` is the last line. Other exceptions are left exactly as they were.
    """
    previous = sys.excepthook
    if getattr(previous, "tsgm_hook", False):
        return

    def hook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        previous(kind, value, traceback)
        found = user_error(value)
        if found is not None:
            print(f"tsgm: error: {found}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)

    hook.tsgm_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


install_excepthook()
