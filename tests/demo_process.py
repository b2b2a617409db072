"""Watching ``python -m routheon.demo`` as a process: what it prints, which children it has."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def children(pid: int) -> set[int]:
    """Direct children of ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


class Output:
    """The demo's stdout, read by a thread so that waiting for a line can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: the output has closed
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _lines(self, timeout: float) -> Iterator[str]:
        """Lines as they come, until the output closes or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return
            if line is None:
                self.lines.put(None)  # closed for every later call too
                return
            self.seen.append(line)
            yield line

    def until(self, marker: str, timeout: float = 240.0) -> str:
        """Lines up to the one holding ``marker`` (bounded so that a broken demo fails)."""
        start = len(self.seen)
        if any(marker in line for line in self._lines(timeout)):
            return "".join(self.seen[start:])
        raise AssertionError(f"no {marker!r} from the demo; it printed:\n{''.join(self.seen)}")

    def rest(self, timeout: float = 10.0) -> str:
        """Everything printed, once the output has closed (or ``timeout`` has passed)."""
        for _ in self._lines(timeout):
            pass
        return "".join(self.seen)
