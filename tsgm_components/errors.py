"""Errors raised on bad user input: one type, so the CLI and bundles can report them cleanly."""

from __future__ import annotations


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
