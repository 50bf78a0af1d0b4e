"""Silencing exporters: their progress prints, warnings and log lines (errors still raise).

Exporters talk on several channels: Python warnings, loggers that frameworks configure with
their own handlers, ``print``, and C++ code writing to the process's stdout and stderr
directly (torch prints the graphs it failed on). A run shows one line when an export fails,
so all of them are silenced while the exporter runs; the error itself still raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings


@contextlib.contextmanager
def quiet(*logger_names: str):
    """Run the block with the named loggers at ERROR, warnings ignored and the process's stdout and
    stderr (file descriptors 1 and 2) discarded."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _discarded_output():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _discarded_output():
    """File descriptors 1 and 2 pointed at a scratch file (Python's and C++'s writes alike), then restored."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as scratch:
        try:
            os.dup2(scratch.fileno(), 1)
            os.dup2(scratch.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for descriptor, saved_descriptor in zip((1, 2), saved):
                os.dup2(saved_descriptor, descriptor)
                os.close(saved_descriptor)
