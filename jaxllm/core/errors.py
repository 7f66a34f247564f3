"""Errors meant for people, and the one place scripts turn them into exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from jaxllm.core import environment, signals


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""


class ConfigError(UserError):
    """A configuration that cannot work, detected before anything compiles or writes."""


class DataError(UserError):
    """A corpus or data file that cannot be read or is empty."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`UserError` (one ``error: ...`` line, exit 2) instead of
    argparse's usage block and ``SystemExit``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a script's ``main``: a :class:`UserError` prints ``error: ...`` on stderr, exit 2; a
    start-up stopped by a signal (:class:`jaxllm.core.signals.Interrupted`) prints its one line, exit
    128 + the signal's number. The environment JAX will read is checked first
    (:func:`jaxllm.core.environment.problem`), so a bad one is such a line too, not JAX's traceback or hang."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            if problem := environment.problem():
                raise UserError(problem)
            return main(*args, **kwargs) or 0
        except UserError as e:
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except signals.Interrupted as e:
            print(e, file=sys.stderr)
            return 128 + e.signum

    return wrapped
