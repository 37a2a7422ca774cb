"""Errors raised on bad user input: one type, so the CLI and bundles can report them cleanly."""

from __future__ import annotations

import os
import sys
from typing import Any


class TsgmInputError(ValueError):
    """Bad user input (file missing, unreadable, wrong shape/geometry, NaN, ...).

    The message always names the offending file (or subject) and the problem.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def user_error(error: BaseException | None) -> BaseException | None:
    """The :class:`TsgmInputError` or ``OSError`` in an exception's cause/context chain (MONAI's bundle runner wraps the
    errors of config expressions in ``RuntimeError``), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (TsgmInputError, OSError)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


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
