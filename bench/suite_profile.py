"""Where the test suite's time goes: a pytest plugin that writes one JSON line per test.

    PYTHONPATH=bench SUITE_PROFILE=/tmp/suite.jsonl python -m pytest -p suite_profile
    python bench/suite_profile.py /tmp/suite.jsonl      # the summary

Each line holds the test's id, its wall seconds, the CPU seconds of its own process and of the
subprocesses it waited for, and the seconds JAX reported for tracing, lowering and compiling
(``jax.monitoring``'s duration events, per jitted function's name; a compilation-cache load counts
as a compilation; a function traced inside another's trace counts in both). Every xdist worker
appends to the same file.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time

import pytest

EVENTS = {  # jax.monitoring event -> the short name in the records
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_seconds: collections.Counter = collections.Counter()  # (kind, function) -> seconds, this test so far


def _listen(event: str, duration: float, **kwargs) -> None:
    if event in EVENTS:
        _seconds[EVENTS[event], str(kwargs.get("fun_name"))] += duration


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def pytest_configure(config) -> None:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_listen)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _seconds.clear()
    t0, own0, kids0 = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    yield
    record = {
        "id": item.nodeid,
        "wall": time.time() - t0,
        "cpu": _cpu(resource.RUSAGE_SELF) - own0,
        "subprocess_cpu": _cpu(resource.RUSAGE_CHILDREN) - kids0,
        "jax": {f"{kind} {fn}": s for (kind, fn), s in _seconds.items()},
    }
    with open(os.environ["SUITE_PROFILE"], "a") as f:
        f.write(json.dumps(record) + "\n")


def summary(path: str, top: int = 15) -> str:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    totals: collections.Counter = collections.Counter()
    per_fn: collections.Counter = collections.Counter()
    for r in rows:
        totals.update({k: r[k] for k in ("wall", "cpu", "subprocess_cpu")})
        for key, s in r["jax"].items():
            totals[key.split()[0]] += s
            per_fn[key] += s
    lines = [f"{len(rows)} tests; seconds summed over them:"]
    lines += [f"  {k:15s} {totals[k]:8.1f}" for k in ("wall", "cpu", "subprocess_cpu", *EVENTS.values())]
    lines.append(f"the {top} costliest (kind, jitted function):")
    lines += [f"  {s:8.1f}  {key}" for key, s in per_fn.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
