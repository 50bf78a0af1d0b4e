"""The thread policy of a run: onnxruntime gets the cores, estimator maths one thread (torch and BLAS).

onnxruntime runs the model with the cores the run has: all of them in a run in one process,
an equal share in each worker process of a parallel run. Estimator maths is a stream of
small torch operations per batch (N×N Gram matrices, per-class counts, eigenvalues of
100×100 matrices); torch's intra-op pool gains little on them, and on a machine whose cores
are busy its threads wait for one another. Measured on ``specs/information-plane.yaml`` on a
2-core machine with two competing CPU-bound processes: 240.8 s with torch's default pool,
20.8 s on one thread (idle: 14.9 s and 11.0 s). So torch runs on one thread during a run,
and the estimators vectorise their work instead of relying on the pool.

numpy's BLAS (OpenBLAS) runs on one thread during a run too. Its threads spin while they wait for a
core: the non-linearity signature's dense maths (three ``eigh`` and four products of d × d matrices
per score, ``tests/benchmarks/bench_blas_threads.py``) on a 2-core machine busy with other work took
36.5x (d = 256), 14.9x (512) and 12.7x (1024) as long with BLAS's two threads as with one, with two
competing processes 4.0-7.3x, and with none 1.1-2.1x: one thread never lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache


def set_threads(onnxruntime_threads: int | None, torch_threads: int = 1) -> tuple[int | None, int]:
    """Set the threads of onnxruntime sessions created from now on (None: its default, the cores)
    and of torch; return the previous settings, in the same order."""
    import torch

    from layerscope.graph import session

    previous = session.THREADS, torch.get_num_threads()
    session.THREADS = onnxruntime_threads
    torch.set_num_threads(torch_threads)
    return previous


@contextmanager
def run_threads(onnxruntime_threads: int | None = None) -> Iterator[None]:
    """The policy for the block: onnxruntime with *onnxruntime_threads*, torch and numpy's BLAS with one
    thread; the caller's settings are restored afterwards."""
    previous = set_threads(onnxruntime_threads, 1)
    try:
        with one_blas_thread():
            yield
    finally:
        set_threads(*previous)


@cache
def _blas_libraries():
    """The BLAS libraries loaded in this process (threadpoolctl), found once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (every BLAS library loaded when this is first called; numpy loads its own on
    import) on one thread for the block. On two cores with onnxruntime's threads beside them, BLAS's
    own threads made MobileNetV3-small's information plane 1.4x slower than one thread did, and the
    signature's eigendecompositions 13-37x slower on a busy machine (module docstring)."""
    with _blas_libraries().limit(limits=1):
        yield
