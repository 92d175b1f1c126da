"""No process outlives its run: worker processes die with their parent, and SIGTERM takes the Ctrl-C path.

Worker side (:func:`die_with_parent`, called first thing in a worker process):

* on Linux, the parent-death signal: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill the worker the
  moment its parent dies, whatever the worker is doing (even inside a long C call holding the GIL). The kernel
  sends it when the *thread* that started the worker exits, not the process, so it is set only when the worker
  was started by the parent's main thread (read from ``/proc/PPID/task/PPID/children``), which lives as long
  as the process;
* everywhere, a watchdog thread that checks every ``interval`` seconds that the parent is still the parent (a
  dead parent's children are re-parented, so ``os.getppid()`` changes) and ends the worker with ``os._exit``.
  It writes nothing on the way out: the pipes a dead parent leaves may be full, and a write would block.

Right after setting the signal, the worker checks its parent once: a parent that died before the ``prctl``
(while the worker was still starting its interpreter) sends no signal.

Parent side (:func:`sigterm_as_interrupt`): SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so a
``kill PID`` or a driver's ``Popen.terminate()`` runs the same clean path as Ctrl-C: the backend stops its
workers, completed ranks are kept, a rerun resumes them. The handler is one-shot: a second SIGTERM during the
clean-up ends the process at once (and its workers follow it through the guards above).

Starting workers without running the user's script again is :mod:`cosmicai.processes`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: How often the watchdog checks the parent, in seconds.
WATCHDOG_INTERVAL_S = 0.5
#: Exit status of a worker that found its parent gone.
ORPHAN_EXIT_CODE = 70

_watched: set[int] = set()
_lock = threading.Lock()


def set_parent_death_signal(sig: int = int(signal.SIGKILL) if hasattr(signal, "SIGKILL") else 9) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError, TypeError):
        return False


def parent_gone(parent_pid: int) -> bool:
    """True when this process's parent is no longer ``parent_pid`` (it died and this process was re-parented)."""
    return os.getppid() != parent_pid


def start_parent_watchdog(parent_pid: int, interval: float = WATCHDOG_INTERVAL_S) -> threading.Thread | None:
    """A daemon thread that ends this process (``os._exit``) once ``parent_pid`` is no longer its parent.

    One watchdog per parent pid and process; returns None when one is already running.
    """
    with _lock:
        if parent_pid in _watched:
            return None
        _watched.add(parent_pid)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if parent_gone(parent_pid):
                os._exit(ORPHAN_EXIT_CODE)

    thread = threading.Thread(target=watch, name=f"cai-parent-watchdog-{parent_pid}", daemon=True)
    thread.start()
    return thread


def spawned_by_main_thread(parent_pid: int) -> bool | None:
    """Whether the thread that started this process is ``parent_pid``'s main thread (Linux ``/proc``); None if unknown.

    The parent-death signal fires when the parent *thread* exits; a main thread lives as long as its process.
    """
    try:
        with open(f"/proc/{int(parent_pid)}/task/{int(parent_pid)}/children") as fh:  # main thread tid == pid
            return str(os.getpid()) in fh.read().split()
    except (OSError, ValueError):
        return None


def die_with_parent(parent_pid: int | None = None, pdeathsig: bool | None = None,
                    interval: float = WATCHDOG_INTERVAL_S) -> bool:
    """Make this (worker) process exit when ``parent_pid`` (default: the current parent) dies.

    Sets the parent-death signal (Linux) when ``pdeathsig`` is True, or, when None, when this process was
    started by the parent's main thread (a worker started by a short-lived thread would be killed with that
    thread). Then exits at once if the parent is already gone, and starts the watchdog thread. Returns whether
    the parent-death signal is set.
    """
    parent_pid = os.getppid() if parent_pid is None else int(parent_pid)
    if pdeathsig is None:
        pdeathsig = bool(spawned_by_main_thread(parent_pid))
    armed = set_parent_death_signal() if pdeathsig else False
    if parent_gone(parent_pid):  # died before the prctl: no signal will come
        os._exit(ORPHAN_EXIT_CODE)
    start_parent_watchdog(parent_pid, interval)
    return armed


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another terminating signal), raised like Ctrl-C so the same clean path runs."""

    def __init__(self, signum: int = int(getattr(signal, "SIGTERM", 15))):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The conventional exit status, 128 + the signal number (143 for SIGTERM)."""
        return 128 + self.signum


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # one-shot: a second SIGTERM during the clean-up ends the process
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once; a second one kills at once).

    Does nothing outside the main thread or where there is no SIGTERM; the previous handler is put back.
    """
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
