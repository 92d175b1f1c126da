"""Worker processes that do not run the user's script again.

``multiprocessing``'s spawn start method makes every child re-import the parent's ``__main__`` (the script), so a
plain script without an ``if __name__ == "__main__":`` guard that starts a pool would run again in each worker.
cosmicai's worker functions live in importable modules, so its pools (the local backend, a Dask LocalCluster,
galaxy synthesis) start their processes with ``__main__`` hidden from that step: ``sys.path`` and the working
directory still travel, so plug-ins (``module:factory``) import as before.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, Iterator

_main_lock = threading.RLock()


@contextmanager
def main_hidden() -> Iterator[None]:
    """While inside, processes started with the ``spawn`` method do not re-import this program's ``__main__``.

    ``multiprocessing`` tells a spawned child to re-run the main script (``__main__.__file__``) or module
    (``__main__.__spec__``); both are hidden while inside and put back on exit. Use it around code that starts
    processes whose work lives in importable modules (a Dask ``LocalCluster``); :func:`spawn_context` does it for
    every process a pool starts, later replacements included. Nothing changes for an interactive session or a
    notebook, whose ``__main__`` has neither.
    """
    main = sys.modules.get("__main__")
    with _main_lock:  # one thread at a time, so a nested or concurrent use never restores a hidden value
        if main is None:
            yield
            return
        had_file, file = hasattr(main, "__file__"), getattr(main, "__file__", None)
        had_spec, spec = hasattr(main, "__spec__"), getattr(main, "__spec__", None)
        try:
            if had_file:
                del main.__file__
            main.__spec__ = None
            yield
        finally:
            if had_file:
                main.__file__ = file
            if had_spec:
                main.__spec__ = spec
            else:
                del main.__spec__


class _NoMainProcess(SpawnProcess):
    """A spawned process that does not re-import the parent's ``__main__`` (see :func:`main_hidden`)."""

    def start(self) -> None:
        with main_hidden():
            super().start()


class _NoMainSpawnContext(SpawnContext):
    Process = _NoMainProcess


def spawn_context(hide_main: bool = True) -> Any:
    """The ``spawn`` multiprocessing context for worker pools; with ``hide_main`` (the default) its processes do
    not re-import ``__main__``, so a plain script (no ``if __name__ == "__main__":`` guard) that starts a pool
    runs once. Pass ``hide_main=False`` when the workers run functions defined in ``__main__``."""
    import multiprocessing

    return _NoMainSpawnContext() if hide_main else multiprocessing.get_context("spawn")
