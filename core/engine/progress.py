"""A progress bar on stderr, when it is a terminal, that appears only once a run has taken more than a moment."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class Progress:
    """Counts processed samples; shows a rich progress bar after ``delay`` seconds."""

    def __init__(self, total: int, description: str = "analysing", delay: float = 1.5, enabled: bool = True):
        self.total, self.description, self.delay, self.enabled = total, description, delay, enabled
        self.completed = 0
        self._started = time.monotonic()
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    def advance(self, samples: int, description: str | None = None) -> None:
        self.completed += samples
        if description:
            self.description = description
        if self._bar is None and self.enabled and time.monotonic() - self._started > self.delay:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            console = Console(stderr=True)
            if not console.is_terminal:  # a file or a pipe: a bar would leave only a blank line there
                self.enabled = False
                return
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        if self._bar is not None and self._task is not None:  # set together
            self._bar.update(self._task, completed=self.completed, description=self.description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
