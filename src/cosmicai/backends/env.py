"""What every backend sets in its worker processes: thread-pool sizes and the GPU each one uses.

The local, Dask and Lithops backends and the Slurm/PBS job scripts (``runners/batch_jobs.py``) import this module;
the runner registry, which imports the backends, is above them all, so the dependency goes one way.
"""

from __future__ import annotations

#: The thread-pool sizes of the numeric libraries (OpenMP, MKL, OpenBLAS): a backend sets every one of them to
#: the task's thread count in each worker process, before torch/numpy start their pools.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def gpu_ids(visible: str | None, count: int) -> list[str]:
    """The GPU ids a process may hand to its workers: the entries of ``CUDA_VISIBLE_DEVICES`` (``visible``), or
    ``0 .. count-1`` when it is unset or empty."""
    ids = [d.strip() for d in (visible or "").split(",") if d.strip()]
    return ids or [str(i) for i in range(count)]
