"""Reporters turn :class:`Results` into files; each ``outputs.formats`` entry names one."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .results import Results


class Reporter:
    """Base class of reporter plugins."""

    name: ClassVar[str]

    def write(self, results: Results, out_dir: Path) -> list[str]:
        """Write this format's files under *out_dir*; return their paths relative to it."""
        raise NotImplementedError
