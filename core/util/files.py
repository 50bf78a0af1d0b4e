"""Files: a spec's files are read only when they are regular files, written atomically; the cache folder.

Opening a FIFO, a socket or a character device blocks or never ends (a FIFO named as
``model.source`` used to hang a run forever), and a folder where a file is expected gives
an unhelpful error from deep inside a library; both are user errors naming the spec key.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


def cache_dir() -> Path:
    """layerscope's cache folder (``$LAYERSCOPE_CACHE``, default ``~/.cache/layerscope``)."""
    return Path(os.environ.get("LAYERSCOPE_CACHE", Path.home() / ".cache" / "layerscope"))


def mark_used(path: Path) -> None:
    """Set the modification time of *path*, an entry of the cache folder that a run reads, to now: the last use
    ``layerscope cache prune --older-than`` goes by. A cache on a read-only file system stays as it is."""
    try:
        os.utime(path)
    except OSError:
        pass


def scratch_folder(purpose: str) -> Path:
    """A new folder for files this process needs only while it runs (a model written out to be read
    back), removed when the process ends."""
    folder = Path(tempfile.mkdtemp(prefix=f"layerscope-{purpose}-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


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


def fingerprint_paths(values: Iterable[Any], base_dir: Path) -> str:
    """A digest of the files that *values* name (strings and paths, relative to *base_dir*, also inside
    lists, tuples and dicts): each existing file's size, modification and status-change times and inode,
    every file under an existing folder the same way; values that name nothing are part of the digest as
    they are. Replacing or editing a named file changes the digest, even when its size is kept and its
    modification time set back (the status-change time cannot be set); reading the files is never needed."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(f"{key}=".encode())
                add(value[key])
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)
        elif isinstance(value, str | os.PathLike) and str(value):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base_dir / path
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                try:
                    info = file.stat()
                except OSError:
                    digest.update(f"{value}|".encode())
                    continue
                digest.update(f"{file}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}|{info.st_ino}|".encode())
        else:
            digest.update(f"{value!r}|".encode())

    for value in values:
        add(value)
    return digest.hexdigest()


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, which must stay inside *folder* (no ``..``, absolute part or link leading out):
    a file a reporter names after something it read is never written elsewhere."""
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"{relative}: not a path inside {folder}; nothing is written outside the output folder")
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside *path* to write to; renamed to *path* when the block ends without an error
    (an ordinary file's permissions), removed when it raises: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write *data* to *path* through a temporary file and a rename: never a half-written file."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
