"""A run's output folder: one run at a time, and one run's complete set of files at every moment.

- :func:`output_folder` creates ``outputs.dir`` and holds a lock on it (``<outputs.dir>/.layerscope.lock``,
  an OS file lock, :class:`FolderLock`) for the whole run, so a second run writing the same folder is
  refused at once instead of silently overwriting the first one's files; the lock goes with the process,
  so a killed run never leaves the folder locked, and the lock file is removed when the run ends (only a
  killed run leaves it, unlocked). Holding it, the run removes the staging folders that a killed run
  left behind.
- :meth:`OutputFolder.write` has every reporter write into a staging folder beside ``outputs.dir``, writes
  ``results.json`` there itself, copies over (as hard links) every file of the folder that is not an
  output of the previous run (the lock, a resume folder, the user's own files), and then exchanges the
  two folders in one ``renameat2(RENAME_EXCHANGE)`` call: whoever reads ``outputs.dir`` sees the previous
  run's files or this run's, never a mix, even when the run is killed at any point; a full disk or a
  failing reporter leaves the previous files as they were. Where the folder cannot be exchanged (no
  ``renameat2`` on this system or file system, the folder is a mount point or holds the current
  directory, or its parent cannot be written) the files are moved in one by one, ``results.json`` last.

Tracking reporters (:class:`~layerscope.results.reporter.TrackingReporter`) log the run once its files are in
place; their stores are not the run's files, so the exchange keeps them as it keeps the user's own. A tracker
that fails then is a user error saying that the files are complete (what can be found wrong with a tracker
before the run, :func:`~layerscope.results.reporter.check_reporters` finds before the model runs).

Failures of the file system (a read-only folder, a full disk, a file where the folder should be) are user
errors naming the folder and the cause.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from layerscope.util.errors import UserError
from layerscope.util.files import atomic_write

from .contract import RESULTS_FILE, Results
from .reporter import TrackingReporter

if TYPE_CHECKING:
    from filelock import BaseFileLock

LOCK_FILE = ".layerscope.lock"
STAGING = ".layerscope-staging-"  # the staging folder: beside the output folder, or inside it as a fallback


def _cannot_write(out_dir: Path, error: OSError) -> UserError:
    cause = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(out_dir) else ""
    return UserError(f"outputs.dir: cannot write to {out_dir}: {cause}{where}")


class FolderLock:
    """An exclusive ``flock`` on the file *path*, which :meth:`release` removes.

    Removing a lock file is safe only if every acquirer checks, once it holds the lock, that the file it
    locked is still the one at *path*: another run may have opened it just before the holder removed it
    and locked the removed file after. :meth:`acquire` does, and starts again on the new file when not.
    Where ``flock`` is missing (Windows), ``filelock``'s lock stands in (it removes its file itself)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._fallback: BaseFileLock | None = None

    def acquire(self) -> bool:
        """Lock *path* (creating it); False when another process holds the lock."""
        try:
            import fcntl
        except ImportError:
            return self._acquire_fallback()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException as error:
                os.close(fd)
                # held by another process (some file systems say EACCES rather than EAGAIN)
                if isinstance(error, OSError) and error.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            if self._is_at_path(fd):
                self._fd = fd
                return True
            os.close(fd)  # the holder removed the file we opened: lock the one now at the path

    def _acquire_fallback(self) -> bool:
        from filelock import FileLock, Timeout

        self._fallback = FileLock(self.path, timeout=0)
        try:
            self._fallback.acquire()
        except Timeout:
            return False
        return True

    def _is_at_path(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except OSError:  # removed, or its folder with it
            return False

    def release(self) -> None:
        """Remove the lock file (when it is still the one locked), then unlock it."""
        if self._fallback is not None:
            self._fallback.release()
        if self._fd is None:
            return
        if self._is_at_path(self._fd):
            self.path.unlink()
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


def _lock(path: Path) -> FolderLock:
    """An acquired lock on *path* (a user error naming the folder when another run holds it)."""
    lock = FolderLock(path)
    if not lock.acquire():
        raise UserError(
            f"outputs.dir: another layerscope run is writing to {path.parent} (it holds {path}); wait for it to "
            "finish or give this run another --out"
        )
    return lock


class OutputFolder:
    """The locked output folder of a run (:func:`output_folder`) and the writing of its files."""

    def __init__(self, path: Path, lock):
        self.path = path
        self.locks = [lock]

    def write(self, results: Results, reporters, *, add: bool = False) -> list[str]:
        """Run every file reporter into a staging folder, write ``results.json`` there, and put the set in
        place as the module docstring describes (``results.json`` lists every artifact); then log the run
        to each tracking reporter's tracker, whose store is not one of the run's files (its default
        location inside the folder is kept as the user's own files are). Returns the files the reporters
        wrote.

        With *add* (``layerscope report``), the files the folder's ``results.json`` lists (*results*' own
        ``artifacts``, those still there) stay in the set and in ``artifacts``, beside the ones written now;
        without it the set is what the reporters write."""
        kept = [a for a in results.artifacts if (self.path / a).is_file()] if add else []
        staging, beside = self._staging()
        trackers = [reporter for reporter in reporters if isinstance(reporter, TrackingReporter)]
        written: list[str] = []
        try:
            results.out_dir = staging
            for reporter in reporters:
                if reporter not in trackers:
                    written += [a for a in reporter.write(results, staging) if a != RESULTS_FILE]
            results.artifacts = kept + [a for a in written if a not in kept]
            atomic_write(staging / RESULTS_FILE, results.to_json())
            if not (beside and self._exchange(staging, results.artifacts)):
                _move_into_place(staging, self.path)
        except OSError as error:
            raise _cannot_write(self.path, error) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            results.out_dir = self.path
        for tracker in trackers:
            self._log(results, tracker)
        return written

    def _log(self, results: Results, tracker: TrackingReporter) -> None:
        """Log the run, whose files are in place, to *tracker*; a failure is a user error that says so."""
        try:
            tracker.write(results, self.path)
        except (UserError, OSError) as error:
            cause = str(error) if isinstance(error, UserError) else str(_cannot_write(self.path, error))
            logged = "".join(f"; it was logged to {done}" for done in results.logged_to)
            raise UserError(
                f"{cause.rstrip('.')}. The run's files are complete in {self.path} ({RESULTS_FILE} and its "
                f"artifacts){logged}; log them with: layerscope report {self.path} --formats {tracker.name}"
            ) from None
        results.logged_to.append(f"{tracker.name}: {tracker.destination}")

    def _staging(self) -> tuple[Path, bool]:
        """A new staging folder, and whether it lies beside the output folder (so that the two can be
        exchanged) rather than inside it."""
        real = self.path.resolve()
        if not Path.cwd().resolve().is_relative_to(real) and not os.path.ismount(real):
            try:
                return Path(tempfile.mkdtemp(prefix=f".{real.name}{STAGING}", dir=real.parent)), True
            except OSError:  # the parent folder cannot be written: stage inside
                pass
        try:
            return Path(tempfile.mkdtemp(prefix=STAGING, dir=self.path)), False
        except OSError as error:
            raise _cannot_write(self.path, error) from None

    def _exchange(self, staging: Path, artifacts: list[str]) -> bool:
        """Give *staging* everything of the output folder that is not the previous run's output (but for
        the new *artifacts* it lacks, which stay), then exchange the two folders atomically; False
        (nothing changed) where the system cannot."""
        previous = _previous_outputs(self.path) - set(artifacts)
        for source in sorted(self.path.rglob("*")):
            relative = source.relative_to(self.path)
            target = staging / relative
            if str(relative.as_posix()) in previous or relative.parts[0].startswith(STAGING) or target.exists():
                continue
            if not (source.is_dir() and not source.is_symlink()) and relative.name != LOCK_FILE:
                target.parent.mkdir(parents=True, exist_ok=True)  # a folder only when a file goes in it
                _link_or_copy(source, target)
        os.chmod(staging, stat.S_IMODE(self.path.stat().st_mode))  # mkdtemp makes 0700: keep the folder's mode
        self.locks.append(_lock(staging / LOCK_FILE))  # held through the exchange: the folder stays locked
        if not _rename_exchange(staging, self.path.resolve()):
            self.locks.pop().release()
            return False
        self.locks[-1].path = self.path / LOCK_FILE  # where the exchange put it
        return True

    def release(self) -> None:
        """Unlock the folder and remove its lock file."""
        for lock in reversed(self.locks):
            lock.release()


def _previous_outputs(folder: Path) -> set[str]:
    """The files the previous run wrote in *folder*: its ``results.json`` and the artifacts it lists."""
    try:
        listed = json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8")).get("artifacts", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    return {RESULTS_FILE, *(a for a in listed if isinstance(a, str))}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the folders *a* and *b* in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    when this system or file system offers no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux, or a C library without renameat2
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == RESULTS_FILE)
    for source in files:
        target = out_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove the staging folders a killed run left, beside *out_dir* and inside it (the caller holds its lock)."""
    real = out_dir.resolve()
    for stale in [*real.parent.glob(f".{real.name}{STAGING}*"), *real.glob(f"{STAGING}*")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def output_folder(out_dir: Path) -> Iterator[OutputFolder]:
    """Create *out_dir* and hold its lock while the block runs (a user error if another run holds it).

    The lock file is removed when the block ends. When the block fails, the folders this call created
    are removed again if they are then empty: a failed run leaves no empty output folder behind."""
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        folder = OutputFolder(out_dir, _lock(out_dir / LOCK_FILE))
        _remove_stale_staging(out_dir)
    except OSError as error:
        raise _cannot_write(out_dir, error) from None
    try:
        yield folder
    except BaseException:
        folder.release()
        _remove_if_unused(created)
        raise
    folder.release()


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the folders of *created* (innermost first: the output folder, then the parents the run made)
    that are empty (the run's lock file is gone once the folder is released)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was written there
            return
