"""Errors raised on bad user input: one type, so the CLI and bundles can report them cleanly."""


class TsgmInputError(ValueError):
    """Bad user input (file missing, unreadable, wrong shape/geometry, NaN, ...).

    The message always names the offending file (or subject) and the problem.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
