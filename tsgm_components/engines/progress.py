"""Training progress for a terminal only: a log file gets the StatsHandler lines, not one bar redraw per iteration."""

from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

from ignite.engine import Engine
from ignite.handlers import ProgressBar


class TerminalProgressBar:
    """ignite's ``ProgressBar`` with the current losses, attached only when ``stream`` is a terminal.

    Redirected to a file, a tqdm bar writes one redraw per iteration (≈2 MB of log per demo); the bundles' StatsHandler
    already logs a line every ``log_interval`` iterations, which is what a log file should hold.

    Args:
        output_transform: engine output -> dict of scalars to show (default: the output itself, e.g. CycleGAN's
            loss dict).
        stream: where the bar would be drawn (default ``sys.stderr``, tqdm's stream).
    """

    def __init__(self, output_transform: Callable[[Any], Any] | None = None, stream: TextIO | None = None):
        self.output_transform = output_transform or (lambda output: output)
        self.stream = stream

    def attach(self, engine: Engine) -> bool:
        """Attach the bar to ``engine`` if the stream is a terminal; returns whether it was attached."""
        stream = self.stream or sys.stderr
        if not (hasattr(stream, "isatty") and stream.isatty()):
            return False
        ProgressBar(persist=False, file=stream).attach(engine, output_transform=self.output_transform)
        return True
