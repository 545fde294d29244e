"""A bounded background writer: ``extract()`` hands it each batch's rows and goes on with the next forward while
they are written, so that disk writes and syncs overlap the model.

``extraction.extract._run`` builds one ``Background`` per call (for a store on disk), calls ``submit(fn)`` once per
batch with a function that waits for the batch's host copies and writes them (``extraction.rowstore.RowStore.write``),
and ``close()`` at the end, also on error. At most ``depth`` batches wait, so memory stays bounded and a slow disk slows
the loop instead of filling memory. The writes run in order, in one thread. An error in the writer is raised in the
caller's thread at its next ``submit`` or at ``close``; a batch whose write failed was never recorded as done, and
every batch written before it stays.
"""

from __future__ import annotations

import contextvars
import functools
import queue
import threading
from collections.abc import Callable

__all__ = ["Background"]

_STOP = object()


class Background:
    """Runs the submitted functions in order in one thread, at most ``depth`` waiting."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None  # to raise in the caller's thread (once)
        self._broken = False  # a job failed: the later ones are dropped
        self._thread = threading.Thread(target=self._work, name="hookkit-extract-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if not self._broken:  # after a failure, later batches are dropped: a failure is never written past
                try:
                    job()  # type: ignore[operator]
                except BaseException as exc:  # handed to the caller's thread
                    self._broken = True
                    self._error = exc

    def check(self) -> None:
        """Raise the writer's error, if it had one."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``, to run in a copy of the caller's context (its context variables, e.g. the command line
        that ``extraction.manifest.COMMAND`` records); waits while ``depth`` jobs are queued. Raises the error of an
        earlier job first."""
        self.check()
        job = functools.partial(contextvars.copy_context().run, job)
        while True:
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                self.check()  # the writer failed while we waited: do not wait for a thread that drops its work
                if not self._thread.is_alive():  # pragma: no cover - the thread never dies without an error
                    raise RuntimeError("hookkit's extract writer thread ended unexpectedly (a bug)") from None

    def close(self) -> None:
        """Wait until every queued job ran (those after a failure are dropped), then raise the first failure."""
        self._queue.put(_STOP)
        self._thread.join()
        self.check()
