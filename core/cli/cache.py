"""``layerscope cache``: the cache folder's entries with their sizes and last use; pruning by age or total
size; clearing (:mod:`layerscope.util.cache`)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from layerscope.util.cache import CacheEntry, cache_entries, checked_folder, parse_duration, removable, remove, to_prune
from layerscope.util.errors import UserError
from layerscope.util.files import cache_dir
from layerscope.util.units import format_bytes, parse_bytes


def _ago(seconds: float, now: float) -> str:
    """How long ago the POSIX time *seconds* was: ``3 d ago``, ``5 h ago``, ``12 min ago`` or ``now``."""
    age = max(0.0, now - seconds)
    steps = ((86400, "d"), (3600, "h"), (60, "min"))
    return next((f"{age // unit:.0f} {name} ago" for unit, name in steps if age >= unit), "now")


#: A hash in an entry's name (an export's 64 hex digits, a table's 32): the table shows its first 12.
LONG_HASH = re.compile(r"([0-9a-f]{12})[0-9a-f]{8,}")


def _short_name(relative: Path) -> str:
    """*relative* with each hash of 20 or more hex digits cut to its first 12 and ``…``, as ``git`` abbreviates
    commits: ``exports/8438aa4f6a57…`` (the full names are in ``--json`` and the prune and clear lines)."""
    return LONG_HASH.sub(r"\1…", str(relative))


def _total(entries: list[CacheEntry]) -> str:
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {format_bytes(sum(e.size for e in entries))}"


def list_cache(as_json: bool = False) -> None:
    """Print every entry of the cache folder: kind, path, size, last use and what it is."""
    folder = checked_folder(cache_dir())
    entries = cache_entries(folder)
    if as_json:
        listing = {
            "folder": str(folder),
            "bytes": sum(e.size for e in entries),
            "entries": [e.to_dict(folder) for e in entries],
        }
        print(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    table = Table(title=f"layerscope cache · {folder}")
    table.add_column("kind", no_wrap=True)
    table.add_column("entry", no_wrap=True)
    table.add_column("size", justify="right")
    table.add_column("last used", no_wrap=True)
    table.add_column("what")
    for entry in entries:
        table.add_row(
            entry.kind,
            _short_name(entry.path.relative_to(folder)),
            format_bytes(entry.size),
            _ago(entry.last_used, now),
            entry.about,
        )
    console = Console()
    if entries:
        console.print(table)
    console.print(f"{_total(entries)} in {folder}", highlight=False)


def _remove(chosen: list[CacheEntry], entries: list[CacheEntry], folder: Path, dry_run: bool) -> None:
    """Remove the *chosen* entries (or with *dry_run* only say which), each on a line, then what is left."""
    now = time.time()
    verb = "would remove" if dry_run else "removed"
    for entry in chosen:
        if not dry_run:
            remove(entry, folder)
        used = _ago(entry.last_used, now)
        print(f"{verb} {entry.path.relative_to(folder)} ({format_bytes(entry.size)}, last used {used})")
    left = [e for e in entries if e not in chosen]
    print(f"{verb} {_total(chosen)}; {_total(left)} {'would be left' if dry_run else 'left'} in {folder}")


def prune_cache(older_than: str | None, max_size: str | None, dry_run: bool = False) -> None:
    """Remove the entries last used longer ago than *older_than* (``30d``), then the least recently used
    until the cache holds at most *max_size* (``2GB``)."""
    if older_than is None and max_size is None:
        raise UserError("cache prune: give --older-than AGE, --max-size SIZE or both, e.g. --older-than 30d")
    try:
        age = parse_duration(older_than) if older_than is not None else None
    except ValueError as error:
        raise UserError(f"--older-than: {error}") from None
    try:
        size = parse_bytes(max_size) if max_size is not None else None
    except ValueError as error:
        raise UserError(f"--max-size: {error}") from None
    folder = checked_folder(cache_dir())
    entries = cache_entries(folder)
    _remove(to_prune(entries, age, size), entries, folder, dry_run)


def clear_cache(dry_run: bool = False) -> None:
    """Remove every entry of the cache folder (but writes in progress)."""
    folder = checked_folder(cache_dir())
    entries = cache_entries(folder)
    _remove(removable(entries), entries, folder, dry_run)
