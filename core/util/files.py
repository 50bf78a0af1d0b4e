"""Files: a spec's files are read only when they are regular files, written atomically; the cache folder.

Opening a FIFO, a socket or a character device blocks or never ends (a FIFO named as
``model.source`` used to hang a run forever), and a folder where a file is expected gives
an unhelpful error from deep inside a library; both are user errors naming the spec key.
"""

from __future__ import annotations

import os
import stat
import tempfile
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


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write *data* to *path* through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as binary:
                binary.write(data)
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as text:
                text.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
