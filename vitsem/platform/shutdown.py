"""Bounded shutdown: a process told to stop (SIGTERM) has a grace period to record how it
ended, then exits whatever it is still waiting for. Prefect's client retries an unreachable
API for over a minute, and thread-pool workers keep a process alive until their task ends:
without a deadline a terminated worker could hang on, holding its slot and its resources.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger("vitsem.platform.shutdown")

SHUTDOWN_GRACE_SECONDS = 6.0
"""How long a terminated flow process may spend reporting its end (the project's run record
first, which needs only the database, then Prefect's state) before it exits."""

_lock = threading.Lock()
_timer: threading.Timer | None = None


def exit_within(seconds: float = SHUTDOWN_GRACE_SECONDS,
                code: int = 128 + signal.SIGTERM) -> None:
    """End this process with ``code`` ``seconds`` from now unless it has ended by then.
    Armed once per process; later calls keep the first deadline."""
    global _timer
    with _lock:
        if _timer is not None:
            return
        _timer = threading.Timer(seconds, _exit_now, args=(seconds, code))
        _timer.daemon = True
        _timer.start()


def _exit_now(seconds: float, code: int) -> None:
    log.error("still running %.0f s after being told to stop (a service unreachable?): "
              "exiting now", seconds)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing left to flush
            pass
    os._exit(code)


def terminate_children() -> int:
    """Send SIGTERM to this process's direct children (flow runs a runner started); each
    ends within its own grace period. Returns how many were signalled."""
    import psutil

    children = psutil.Process().children(recursive=False)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    return len(children)
