"""Host batches built ahead of the step, on a thread, so the accelerator never waits on the host.

``Prefetcher(make, depth)`` runs ``make(step)`` for ``step, step+1, ...`` on a background thread,
keeping at most ``depth`` finished batches queued. Batches are pure functions of the step, so a
request for a step other than the next one (a resume, an evaluation's own batches) simply restarts
the thread there. ``make`` is numpy and file reads, which release the GIL: the thread overlaps with
the step's dispatch and with the device. An exception in ``make`` is raised by :meth:`get`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Prefetcher:
    def __init__(self, make: Callable[[int], Any], depth: int = 2, stop: int | None = None):
        """``depth`` 0 builds each batch when asked (no thread); ``stop``: no batch at or past it is built."""
        self.make, self.depth, self.stop = make, depth, stop
        self.wait_s = 0.0  # seconds :meth:`get` spent waiting for a batch: the time the step waited on data
        self._next: int | None = None
        self._queue: queue.Queue | None = None
        self._halt: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def get(self, step: int) -> Any:
        """The batch of ``step``."""
        started = time.perf_counter()
        try:
            if self.depth == 0 or (self.stop is not None and step >= self.stop):
                return self.make(step)
            if step != self._next:
                self._restart(step)
            got_step, batch, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
            assert got_step == step
            self._next = step + 1
            return batch
        finally:
            self.wait_s += time.perf_counter() - started

    def _restart(self, step: int) -> None:
        self.close()
        self._queue, self._halt, self._next = queue.Queue(self.depth), threading.Event(), step
        self._thread = threading.Thread(target=self._fill, args=(step, self._queue, self._halt), daemon=True)
        self._thread.start()

    def _fill(self, step: int, out: queue.Queue, halt: threading.Event) -> None:
        while not halt.is_set() and (self.stop is None or step < self.stop):
            try:
                item = (step, self.make(step), None)
            except Exception as e:  # noqa: BLE001  (handed to the consumer, which raises it)
                item = (step, None, e)
            while not halt.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def close(self) -> None:
        """Stops the thread (it finishes the batch it is building) and drops queued batches."""
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
        self._thread, self._queue, self._next = None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
