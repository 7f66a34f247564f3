"""Compile ahead: a jitted function lowered and compiled on a background thread for the abstract
arguments it will be called with, while the process does other work.

A run's first step waits for three programs: the initialisation, the train step and, soon after,
the evaluation. Compiled one after the other they dominate a small model's start-up; XLA's compiler
releases the GIL, so the train step and the evaluation compile on a second core while the main
thread restores or initialises the state and builds the first batch. The first call waits only for
what is left. The programs go through the persistent compilation cache like any other, so a rerun
loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

# One worker: the programs compile in the order they are needed, beside the main thread.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-compile")


class Ahead:
    """``fn(*args)`` once compiled: the first call waits for the background compilation, later calls
    run the compiled program directly. Arguments must match the abstract ones (shapes, dtypes,
    shardings): the compiled program refuses any other, as ``jax.jit`` would recompile for them."""

    def __init__(self, future: Future):
        self._future = future
        self._compiled: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            self._compiled = self._future.result()  # a tracing or compilation error surfaces here
        return self._compiled(*args)


def compile_ahead(fn: Any, context: Callable[[], AbstractContextManager], *abstract_args: Any) -> Callable:
    """``fn`` (a ``jax.jit`` function) compiled in the background for ``abstract_args``
    (``jax.ShapeDtypeStruct`` with shardings), traced under ``context()`` (the mesh and the logical-axis
    rules, which are per thread). A plain Python function around a jitted one has no ``lower``: it is
    returned as it is and compiles on its first call."""
    if not hasattr(fn, "lower"):
        return fn

    def compile_():
        with context():
            return fn.lower(*abstract_args).compile()

    return Ahead(_POOL.submit(compile_))
