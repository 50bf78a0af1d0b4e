"""A run's output folder: one run at a time, and every file of a run or none.

- :func:`output_folder` creates ``outputs.dir`` and holds a lock on it
  (``<outputs.dir>/.layerscope.lock``, an OS file lock through ``filelock``) for the whole
  run, so a second run writing the same folder is refused at once instead of silently
  overwriting the first one's files; the lock goes with the process, so a killed run never
  leaves the folder locked.
- :func:`write_outputs` has every reporter write into a staging folder inside ``outputs.dir``,
  then writes ``results.json`` itself (whatever ``outputs.formats`` lists), and moves the files
  into place only when all of them were written, ``results.json`` last: a full disk or a
  failing reporter leaves the previous run's files as they were.

Failures of the file system (a read-only folder, a full disk, a file where the folder
should be) are user errors naming the folder and the cause.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layerscope.util.errors import UserError
from layerscope.util.files import atomic_write

from .contract import RESULTS_FILE, Results

LOCK_FILE = ".layerscope.lock"
STAGING_PREFIX = ".layerscope-staging-"


def _cannot_write(out_dir: Path, error: OSError) -> UserError:
    cause = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(out_dir) else ""
    return UserError(f"outputs.dir: cannot write to {out_dir}: {cause}{where}")


@contextmanager
def output_folder(out_dir: Path) -> Iterator[Path]:
    """Create *out_dir* and hold its lock while the block runs (a user error if another run holds it).

    When the block fails, the folders this call created are removed again if they hold nothing but
    the lock file: a failed run leaves no empty output folder behind."""
    from filelock import FileLock, Timeout

    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(out_dir / LOCK_FILE, timeout=0)
        lock.acquire()
    except Timeout:
        raise UserError(
            f"outputs.dir: another layerscope run is writing to {out_dir} (it holds "
            f"{out_dir / LOCK_FILE}); wait for it to finish or give this run another --out"
        ) from None
    except OSError as error:
        raise _cannot_write(out_dir, error) from None
    try:
        yield out_dir
    except BaseException:
        lock.release()
        _remove_if_unused(created)
        raise
    lock.release()


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the folders of *created* (innermost first: the output folder, then the parents the run made)
    that hold nothing but the run's lock file."""
    if created and [p.name for p in created[0].iterdir()] == [LOCK_FILE]:
        (created[0] / LOCK_FILE).unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was written there
            return


def write_outputs(results: Results, reporters, out_dir: Path) -> None:
    """Run every reporter into a staging folder, write ``results.json`` there, then move the files
    into *out_dir* (``results.json`` last, so it lists every artifact and appears only with them)."""
    results.artifacts = []
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    except OSError as error:
        raise _cannot_write(out_dir, error) from None
    try:
        results.out_dir = staging
        for reporter in reporters:
            artifacts = reporter.write(results, staging)
            results.artifacts += [a for a in artifacts if a != RESULTS_FILE]
        atomic_write(staging / RESULTS_FILE, results.to_json())
        _move_into_place(staging, out_dir)
    except OSError as error:
        raise _cannot_write(out_dir, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        results.out_dir = out_dir


def _move_into_place(staging: Path, out_dir: Path) -> None:
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == RESULTS_FILE)
    for source in files:
        target = out_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
