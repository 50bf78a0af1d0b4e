"""The memory a run can still take, and a clear error where a model cannot fit in it.

A model whose weights do not fit in memory is killed by the kernel's out-of-memory killer part-way
through the run, with no message. onnxruntime holds a model's weights in memory to run it (its own copy,
or the pages of the file they are mapped from), so a run needs at least the weights' bytes free when the
model is loaded; the check is made then, before the weights are hashed or a session is made.
"""

from __future__ import annotations

from pathlib import Path

from layerscope.util.errors import UserError
from layerscope.util.units import format_bytes

_MEMINFO = Path("/proc/meminfo")
_CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's estimate ``MemAvailable`` (free memory
    plus the page cache it can reclaim), lowered to what the process's cgroup v2 limit leaves
    (``memory.max`` − ``memory.current``); None where the system tells neither (not Linux)."""
    limits = []
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        maximum = (_CGROUP / "memory.max").read_text().strip()
        if maximum != "max":
            limits.append(int(maximum) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def ensure_room_for_weights(weight_bytes: int, model: str) -> None:
    """Raise a :class:`UserError` naming the memory needed when *weight_bytes* (the weights onnxruntime
    will hold for *model*) exceed :func:`available_memory`."""
    available = available_memory()
    if available is None or weight_bytes <= available:
        return
    raise UserError(
        f"model {model}: its weights take {format_bytes(weight_bytes)} and onnxruntime holds them in memory "
        f"to run it, but this machine has {format_bytes(available)} of memory available; run it on a machine "
        "with more memory, or free some"
    )
