"""Files a spec names are read only when they are regular files; layerscope's cache folder.

Opening a FIFO, a socket or a character device blocks or never ends (a FIFO named as
``model.source`` used to hang a run forever), and a folder where a file is expected gives
an unhelpful error from deep inside a library; both are user errors naming the spec key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """layerscope's cache folder (``$LAYERSCOPE_CACHE``, default ``~/.cache/layerscope``)."""
    return Path(os.environ.get("LAYERSCOPE_CACHE", Path.home() / ".cache" / "layerscope"))


def regular_file(path: str | os.PathLike, key: str) -> Path:
    """*path* as a :class:`Path` if it is a regular file (links followed); else a user error naming *key*."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{key}: file not found: {path}") from None
    except OSError as error:
        raise UserError(f"{key}: cannot read {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{key}: {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{key}: {path} is not a regular file (a pipe, socket or device cannot be read as one)")
    return path
