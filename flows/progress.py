"""Step progress for people and logs: a rich progress display on a terminal, and one plain
line per step otherwise (CI, service logs). Never prints patient identifiers."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

STEPS = ("load", "detect", "measure", "report")


class Progress:
    """Announces each step of one analysis."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._rich = None
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            try:
                from rich.console import Console

                self._rich = Console(file=self.stream)
            except ImportError:  # pragma: no cover - rich is a dependency
                self._rich = None

    @contextmanager
    def step(self, name: str, detail: str = ""):
        """Time one step; on a terminal show a spinner, elsewhere one line when it ends."""
        t0 = time.perf_counter()
        if not self.enabled:
            yield
            return
        if self._rich is not None:
            with self._rich.status(f"[bold]{name}[/] {detail}"):
                yield
            self._rich.print(f"[green]\u2713[/] {name:<8} {detail} ({time.perf_counter() - t0:.1f} s)")
        else:
            yield
            print(f"fusionct: {name:<8} done in {time.perf_counter() - t0:.1f} s {detail}".rstrip(),
                  file=self.stream, flush=True)


_current = Progress(enabled=False)


def set_progress(progress: Progress) -> None:
    global _current
    _current = progress


def current() -> Progress:
    return _current
