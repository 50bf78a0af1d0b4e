"""Reporters turn :class:`Results` into files; each ``outputs.formats`` entry names one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .contract import Results

if TYPE_CHECKING:
    from layerscope.host.loader import PluginHost


class Reporter:
    """Base class of reporter plugins; *host* gives access to the other plugins (e.g. estimators' plots)."""

    name: ClassVar[str]

    def __init__(self, host: PluginHost | None = None):
        self.host = host

    def write(self, results: Results, out_dir: Path) -> list[str]:
        """Write this format's files under *out_dir*; return their paths relative to it."""
        raise NotImplementedError
