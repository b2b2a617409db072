"""One line of progress for the demo's slow first run: downloads and the llama-server build.

On a terminal the line rewrites itself; in a log (make's output piped to a file, CI) it is a
plain line at each quarter, so the log stays readable.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO


class ProgressLine:
    """``label: NN% detail``, shown again only when something visible changed.

    In a log, only the quarter counts as a change; the detail of that moment is shown with it.
    """

    LOG_STEP = 25

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown: tuple[int, str] | None = None
        self.open = False

    def show(self, percent: int, detail: str = "") -> None:
        percent = max(0, min(100, percent))
        if not self.tty:
            percent = percent // self.LOG_STEP * self.LOG_STEP
        key = (percent, detail if self.tty else "")
        if self.shown == key:
            return
        self.shown = key
        line = f"  {self.label}: {percent:3d}%{' ' + detail if detail else ''}"
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write(f"\r{line[:width]}\x1b[K")
            self.open = True
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the self-updating line, so that what follows starts on a line of its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
