"""What layerscope's cache folder holds, and removing it: the entries ``layerscope cache`` lists and prunes.

The cache folder is ``$LAYERSCOPE_CACHE`` (default ``~/.cache/layerscope``, :func:`~layerscope.util.files.cache_dir`).
An entry is one thing layerscope wrote there, directly under its kind's folder:

============================  ==========  =========================================================
path in the cache folder      kind        what
============================  ==========  =========================================================
``exports/<sha256>/``         export      a PyTorch model exported to ONNX (its weights inside)
``demo/<name>-v<N>/``         demo        a demo model's checkpoints, one ONNX file per epoch
``data/digits-sklearn-*.npz`` data        the digits arrays (saves importing scikit-learn)
``tables/<hash>/``            table       a CSV or Parquet table converted to arrays (and its lock)
``hf-datasets/<name>``        hf-dataset  the Hugging Face datasets library's cache
============================  ==========  =========================================================

A name starting with ``.`` in one of these folders is a write in progress (layerscope writes a folder or file
under a hidden name and renames it into place when complete): kind ``unfinished``, removed only once it is
older than :data:`UNFINISHED_AGE`, so that a running export is never cut short. Anything else is not
layerscope's and is never touched: a folder named as the cache by mistake loses nothing layerscope did not
write. Removing never follows a link: a link is removed as a link. The cache folder itself must not be the
file system's root, the home folder or a folder above it.

An entry's last use is the newest modification time of the entry and its files; layerscope marks an export,
a demo model, the digits arrays and a table as used each time a run reads them
(:func:`~layerscope.util.files.mark_used`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

#: A write in progress older than this (seconds) was left by a process that ended before finishing it.
UNFINISHED_AGE = 24 * 3600
#: Each kind: its folder in the cache, and the pattern of its entries' names.
KINDS = {
    "export": ("exports", re.compile(r"[0-9a-f]{64}")),
    "demo": ("demo", re.compile(r"[A-Za-z0-9_-]+-v[0-9]+")),
    "data": ("data", re.compile(r"digits-sklearn-[A-Za-z0-9_.+-]+\.npz")),
    "table": ("tables", re.compile(r"[0-9a-f]{32}")),
    "hf-dataset": ("hf-datasets", re.compile(r"[^.].*")),
}
LOCK_SUFFIX = ".lock"  # a table's lock file, beside its folder
ABOUT_FILE = "about.json"  # in an export's folder: what was exported (layerscope.adapters.export_cache)
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    path: Path
    size: int  # bytes of its regular files (links not followed)
    last_used: float  # POSIX time
    about: str = ""  # what it is, where known (an export's model source)
    companions: tuple[Path, ...] = field(default=())  # removed with it (a table's lock file)

    def to_dict(self, folder: Path) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path.relative_to(folder)),
            "bytes": self.size,
            "last_used": self.last_used,
            "about": self.about,
        }


def parse_duration(text: str) -> float:
    """Seconds in *text*: a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w`` (``30d``, ``12h``, ``2w``)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"'{text}' is not an age; use a number and s, m, h, d or w, e.g. 30d or 12h")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def checked_folder(folder: Path) -> Path:
    """*folder* as an absolute path, if it may be a cache folder: not the root of the file system, the home
    folder or a folder above the home folder (``LAYERSCOPE_CACHE=~`` would otherwise put the home folder's
    contents up for removal)."""
    resolved = folder.expanduser().resolve()
    home = Path.home().resolve()
    if resolved == Path(resolved.anchor):
        refused = "the root of the file system"
    elif resolved == home:
        refused = "the home folder"
    elif home.is_relative_to(resolved):
        refused = "a folder above the home folder"
    else:
        return resolved
    raise UserError(
        f"LAYERSCOPE_CACHE: {folder} is {refused}; layerscope's cache must be a folder of its own, "
        "e.g. ~/.cache/layerscope"
    )


def _measure(path: Path) -> tuple[int, float]:
    """(bytes of the regular files at or under *path*, newest modification time), links not followed."""
    info = path.lstat()
    size, newest = (info.st_size if stat.S_ISREG(info.st_mode) else 0), info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        for root, folders, files in os.walk(path, followlinks=False):
            for name in folders + files:
                try:
                    inner = os.lstat(os.path.join(root, name))
                except OSError:  # removed meanwhile
                    continue
                newest = max(newest, inner.st_mtime)
                size += inner.st_size if stat.S_ISREG(inner.st_mode) else 0
    return size, newest


def _read_json(file: Path) -> dict:
    """The JSON object in the small regular *file*, or {} (no such file, a link, too large, not an object)."""
    try:
        info = file.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > 65536:
            return {}
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _about(kind: str, entry: Path) -> str:
    """What *entry* holds, where known: an export's model source and class (its ``about.json``), a demo
    model's name, a table's file (its ``meta.json``)."""
    if kind == "export":
        about = _read_json(entry / ABOUT_FILE)
        source, model = str(about.get("source", "")), about.get("class")
        return f"{source} ({model})" if model else source
    if kind == "demo":
        return "demo:" + entry.name.rpartition("-v")[0]
    if kind == "data":
        return "the digits arrays"
    if kind == "table":
        return str(_read_json(entry / "meta.json").get("source", ""))
    return ""


def cache_entries(folder: Path) -> list[CacheEntry]:
    """The entries of the cache *folder* (module docstring), by kind and name."""
    entries = []
    for kind, (subfolder, pattern) in KINDS.items():
        parent = folder / subfolder
        if not parent.is_dir() or parent.is_symlink():
            continue
        names = sorted(p.name for p in parent.iterdir())
        for name in names:
            path = parent / name
            stem = name.removesuffix(LOCK_SUFFIX) if kind == "table" else name
            if kind == "table" and name.endswith(LOCK_SUFFIX) and stem in names:
                continue  # measured with its table
            try:
                if pattern.fullmatch(stem):
                    lock = parent / (name + LOCK_SUFFIX)
                    companions = (lock,) if kind == "table" and lock.exists() else ()
                    size, used = _measure(path)
                    about = _about(kind, path)
                    entries.append(CacheEntry(kind, path, size, used, about, companions))
                elif name.startswith("."):
                    entries.append(CacheEntry("unfinished", path, *_measure(path)))
            except OSError:  # removed meanwhile
                continue
    return entries


def removable(entries: list[CacheEntry], now: float | None = None) -> list[CacheEntry]:
    """The *entries* that may be removed, least recently used first: all but the unfinished writes younger
    than :data:`UNFINISHED_AGE`."""
    now = time.time() if now is None else now
    kept = [e for e in entries if e.kind != "unfinished" or now - e.last_used > UNFINISHED_AGE]
    return sorted(kept, key=lambda e: e.last_used)


def to_prune(
    entries: list[CacheEntry], older_than: float | None, max_size: int | None, now: float | None = None
) -> list[CacheEntry]:
    """The entries to remove, least recently used first: those last used more than *older_than* seconds ago,
    then, while the rest hold more than *max_size* bytes, the least recently used of the rest; only
    :func:`removable` ones."""
    now = time.time() if now is None else now
    ordered = removable(entries, now)
    chosen = [e for e in ordered if older_than is not None and now - e.last_used > older_than]
    if max_size is not None:
        kept = sum(e.size for e in entries if e not in chosen)
        for entry in ordered:
            if kept <= max_size:
                break
            if entry not in chosen:
                chosen.append(entry)
                kept -= entry.size
    return sorted(chosen, key=lambda e: e.last_used)


def remove(entry: CacheEntry, folder: Path) -> None:
    """Remove *entry* of the cache *folder* (an absolute path, :func:`checked_folder`) and its companions: a
    folder with everything in it, a file or a link as itself. Its path must lie directly under a kind's folder
    of *folder*, that folder not a link: nothing outside the cache is ever removed."""
    for path in (entry.path, *entry.companions):
        parent = path.parent
        if parent.parent != folder or parent.is_symlink() or parent.name not in {f for f, _ in KINDS.values()}:
            raise ValueError(f"{path} is not an entry of the cache {folder}")
        try:
            directory = stat.S_ISDIR(path.lstat().st_mode)
        except FileNotFoundError:  # removed meanwhile
            continue
        if directory:
            shutil.rmtree(path)  # removes the links inside it, never what they point to
        else:
            path.unlink(missing_ok=True)
