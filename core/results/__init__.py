"""Results: the ``results.json`` contract (``contract``), the output folder written all or
nothing (``outputs``), the :class:`~layerscope.results.reporter.Reporter` base class of reporter
plugins (``reporter``) and several runs combined (``compare``). May import :mod:`layerscope.util` and
(for types) :mod:`layerscope.host`.
"""

from layerscope.results.contract import Results
from layerscope.util.files import atomic_write  # its import path in layerscope 0.1, kept for plugins

__all__ = ["Results", "atomic_write"]
