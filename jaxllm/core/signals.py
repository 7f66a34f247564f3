"""SIGINT and SIGTERM, acted on only where stopping is safe.

A Python signal handler that raises runs between any two bytecodes: inside a garbage-collection
callback (where the exception is printed and dropped, so the run goes on), inside a library's
clean-up, half-way through a write. Instead, while :func:`deferred` is active a signal is only
recorded; the code asks at its own safe points: start-up between its stages (:func:`check`, which
raises :class:`Interrupted` before the next stage writes anything), the training loop after each
step (:func:`received`, then it saves a checkpoint and returns). The scripts turn
:class:`Interrupted` into one line and the shell's exit status, 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOPS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the signals recorded since the outermost deferred() began, in order


class Interrupted(Exception):
    """A SIGINT or SIGTERM received during start-up, raised at the next safe point: ``stage`` says
    where; nothing of the stages after it was written."""

    def __init__(self, signum: int, stage: str):
        self.signum, self.stage = signum, stage
        super().__init__(f"stopped by {signal.Signals(signum).name} while {stage}, before the first step")


def _record(signum: int, _frame) -> None:
    _received.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are recorded for :func:`received` and :func:`check`, not acted
    on. Nested uses share the record; the outermost clears it on the way out. Main thread only (the
    only thread Python lets install a handler)."""
    old = {s: signal.signal(s, _record) for s in STOPS}
    outermost = _record not in old.values()
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if outermost:
            _received.clear()


def received() -> int | None:
    """The first signal recorded (None: none yet)."""
    return _received[0] if _received else None


def check(stage: str) -> None:
    """Raises :class:`Interrupted` naming ``stage`` (what the process was doing) if a signal was recorded."""
    if _received:
        raise Interrupted(_received[0], stage)
