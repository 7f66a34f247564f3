"""The training loop that pre-training, fine-tuning and distillation share.

    state, start = restore or init                         (the caller: trainer/sft.restore_or_init)
    for step in start..steps:
        batch = batches(step)         built while the device runs the previous step
        state, metrics = step(state, batch)
        every log.every:        fetch the metrics; stop at a non-finite loss     -> metrics.jsonl
        every eval.every:       evaluate(state, step)                              -> metrics.jsonl
        every checkpoint.every: save(step, state) (finite state only)
        SIGTERM / SIGINT:       report, save, stop

Everything the loop changes is a local of :func:`run` or returned by a helper; the parts it is given
(:class:`Parts`) hold no state of the run, so one loop serves every script.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil

from jaxllm.core import signals
from jaxllm.core.errors import UserError
from jaxllm.train.checkpoint import NonFiniteState
from jaxllm.train.metrics_log import MetricsLog


class TrainingDiverged(UserError):
    """The loss, or the weights, became NaN or Inf."""


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves: every N steps, and at the last step."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def due(self, every: int, step: int) -> bool:
        return step % every == 0 or step == self.steps


@dataclass(frozen=True)
class Parts:
    """What one kind of training plugs into the loop."""

    step: Callable  # (state, batch) -> (state, metrics): jitted, the state donated
    batch_at: Callable[[int], Any]  # step -> that step's global batch
    save: Callable[[int, Any], None]  # (step, state) -> None; raises NonFiniteState
    checkpoint_dir: Path  # named when training stops on a non-finite loss
    log: MetricsLog
    mfu: Callable[[float], float]  # tokens/s -> model FLOPs utilisation
    tokens_per_step: int
    context: Callable  # () -> the context manager the step runs under (mesh, logical rules)
    evaluate: Callable[[Any, int], tuple[dict, str]] | None = None  # (state, step) -> (record, text to print)
    is_main: bool = True
    progress: bool = True
    data_stats: Callable[[int], dict] | None = None  # step -> the data's fields of its training record (epochs)


@dataclass
class Outcome:
    state: Any
    step: int
    loss: float = math.nan  # the last logged training loss
    eval: dict = field(default_factory=dict)  # the last evaluation's record
    interrupted: str | None = None  # the signal's name (SIGTERM, SIGINT) when one stopped the run
    signal: int = 0
    first_step_s: float = math.nan  # seconds from the process's start to the end of the first step


class Throughput:
    """Tokens per second since the last report, counted from the end of the first (compiling) step."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.since: float | None = None
        self.tokens = 0

    def stepped(self) -> None:
        if self.since is None:
            self.restart()
        else:
            self.tokens += self.tokens_per_step

    def restart(self) -> None:
        self.since, self.tokens = time.perf_counter(), 0

    def rate(self) -> float:
        """Tokens/s since the last call (or restart), then restarts."""
        now = time.perf_counter()
        tps = self.tokens / (now - self.since) if self.since is not None and self.tokens else 0.0
        self.since, self.tokens = now, 0
        return tps


def seconds_since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


def last_good(checkpoint_dir: Path, saved: int | None) -> str:
    return f"step {saved} in {checkpoint_dir}" if saved is not None else "none yet"


def report(pending: list[tuple[int, Any]], parts: Parts, meter: Throughput, saved: int | None) -> dict:
    """The record of the last pending step (metrics fetched from the device); stops at the first
    non-finite loss, naming the newest checkpoint (every checkpoint holds finite state)."""
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host):
        if not np.isfinite(m["loss"]):
            raise TrainingDiverged(
                f"loss became {float(m['loss'])} at step {s}; training stopped. "
                f"Last good checkpoint: {last_good(parts.checkpoint_dir, saved)}"
            )
    tps = meter.rate()
    s, m = pending[-1][0], host[-1]
    return {
        "step": s,
        "loss": float(m["loss"]),
        "lr": float(m["lr"]),
        "grad_norm": float(m["grad_norm"]),
        "tokens_per_sec": tps,
        "mfu": parts.mfu(tps),
        "layer_grad_norms": [float(x) for x in m["layer_grad_norms"]],
        **{k: np.asarray(v).tolist() for k, v in m.items() if k.startswith("moe_")},  # per MoE layer
        **(parts.data_stats(s) if parts.data_stats is not None else {}),
    }


def save(parts: Parts, step: int, state: Any, saved: int | None) -> int:
    """Saves ``state`` as checkpoint ``step`` and returns ``step``; non-finite state stops the run."""
    try:
        parts.save(step, state)
    except NonFiniteState:
        raise TrainingDiverged(
            f"the weights became NaN or Inf by step {step} (not saved); training stopped. "
            f"Last good checkpoint: {last_good(parts.checkpoint_dir, saved)}"
        ) from None
    return step


def _progress_bar(parts: Parts, cadence: Cadence, start: int):
    from tqdm import tqdm

    return tqdm(
        total=cadence.steps,
        initial=start,
        disable=not (parts.progress and parts.is_main),
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def two_in_flight(previous: Any, latest: Any) -> Any:
    """Waits for ``previous`` (the outputs of the computation dispatched before ``latest``) and returns
    ``latest``: at most two steps are ever queued, the next one dispatched while the last runs, which
    keeps any device busy.

    Unbounded asynchronous dispatch deadlocks XLA:CPU's collectives when the host's cores are split
    into devices (``dist.cpu_devices``): in a stuck process one device waits in an all-reduce for the
    other, whose launch never starts because the client's launch threads (as many as devices) are
    all held by later launches, one waiting for its inputs, one for an in-flight slot."""
    if previous is not None:
        jax.block_until_ready(previous)
    return latest


def _first_step_done(parts: Parts, metrics: Any, bar) -> float:
    """Waits for the first step (compilation included) and says how long the process took to get there."""
    jax.block_until_ready(metrics)
    elapsed = seconds_since_process_start()
    cpu = sum(psutil.Process().cpu_times()[:2])  # user + system: what a busy machine does not inflate
    if parts.is_main:
        bar.write(
            f"jaxllm: first step done {elapsed:.1f} s after the process started ({cpu:.1f} s of CPU; "
            "start-up and compilation)"
        )
    return elapsed


def _evaluate(parts: Parts, state: Any, step: int, bar) -> dict:
    record, text = parts.evaluate(state, step)
    parts.log.write({"step": step, **record})
    if parts.is_main and text:
        bar.write(text)
    return record


def run(parts: Parts, cadence: Cadence, state: Any, start: int, saved: int | None) -> Outcome:
    """Trains from ``state`` at step ``start`` to ``cadence.steps``; ``saved`` is the step of the newest
    checkpoint (None: none yet). Returns early, after saving, on SIGTERM or SIGINT."""
    out = Outcome(state=state, step=start)
    meter, pending, previous = Throughput(parts.tokens_per_step), [], None
    bar = _progress_bar(parts, cadence, start)
    try:
        with signals.deferred(), parts.context():
            batch = parts.batch_at(start) if start < cadence.steps else None
            while out.step < cadence.steps:
                out.state, metrics = parts.step(out.state, batch)
                out.step += 1
                if out.step < cadence.steps:
                    batch = parts.batch_at(out.step)  # overlaps with the step running on the device
                previous = two_in_flight(previous, metrics)
                pending.append((out.step, metrics))
                if math.isnan(out.first_step_s):
                    out.first_step_s = _first_step_done(parts, metrics, bar)
                meter.stepped()
                bar.update(1)
                stop = signals.received()  # read once: a signal arriving later is seen next step, not half now
                saved = _after_step(parts, cadence, out, pending, meter, saved, bar, stop)
                if stop is not None:
                    out.interrupted, out.signal = signal.Signals(stop).name, stop
                    break
    finally:
        bar.close()
    return out


def _after_step(
    parts: Parts,
    cadence: Cadence,
    out: Outcome,
    pending: list,
    meter: Throughput,
    saved: int | None,
    bar,
    stop: int | None,
) -> int | None:
    """Logging, evaluation and checkpointing due after ``out.step``; returns the newest checkpoint's step."""
    step = out.step
    if pending and (
        cadence.due(cadence.log_every, step)
        or stop is not None
        or (parts.evaluate is not None and cadence.due(cadence.eval_every, step))
    ):
        record = report(pending, parts, meter, saved)
        parts.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_sec']:,.0f}", refresh=False)
        out.loss = record["loss"]
        pending.clear()
    if parts.evaluate is not None and cadence.due(cadence.eval_every, step):
        out.eval = _evaluate(parts, out.state, step, bar)
        meter.restart()
    if cadence.due(cadence.checkpoint_every, step) or (stop is not None and saved != step):
        saved = save(parts, step, out.state, saved)
    return saved
