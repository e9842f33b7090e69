"""SIGINT and SIGTERM during a run: the first asks the run to save and stop, a second
aborts at once (``KeyboardInterrupt``, nothing saved)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

__all__ = ["StopSignals"]


class StopSignals:
    """Handlers for SIGINT and SIGTERM while :meth:`installed`; ``received`` is the first
    signal's number, or ``None``. ``when`` says in the warning when the run will stop."""

    def __init__(self, log: logging.Logger, when: str):
        self.log, self.when = log, when
        self.received: int | None = None
        self._pid: int | None = None

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a DataLoader worker (forked with the handler): the main process decides
        if self.received is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.received = signum
        self.log.warning("%s received: saving a checkpoint after %s (again to abort)",
                         signal.Signals(signum).name, self.when)

    @contextlib.contextmanager
    def installed(self):
        """The handlers in place, the previous ones restored on exit; nothing outside the
        main thread (only it can install signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pid = os.getpid()
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
