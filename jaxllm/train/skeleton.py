"""The run skeleton that pre-training and fine-tuning share, around the one loop (:mod:`jaxllm.train.loop`).

    Compiled           the mesh, rules, state shardings and the jitted step and init of a run
    state_shardings    parameters as given, optimizer state after them (ZeRO-1 optional)
    jit_step           the train step, jitted with explicit shardings and the state donated
    restore_or_init    the newest intact checkpoint into the target shardings, else a fresh init
    resumed            checkpointer open, state restored, metrics.jsonl checked, then the caller writes
    run_loop           the loop's parts from a run's pieces, and the loop

Each script supplies only what differs: its model and loss, how a batch is made, what a checkpoint
holds and what it writes into ``run.dir``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import optax

from jaxllm.core import signals
from jaxllm.core.config import Config, ModelConfig
from jaxllm.core.fileio import read_jsonl
from jaxllm.model import flops
from jaxllm.parallel import sharding
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import loop
from jaxllm.train.metrics_log import CHANGES, MetricsLog
from jaxllm.train.train_step import TrainState


@dataclass(frozen=True)
class Compiled:
    """A run compiled for a mesh: its shardings and jitted functions."""

    mesh: jax.sharding.Mesh
    rules: tuple  # the logical-axis rules table (sharding.rules)
    state_shardings: TrainState
    batch_sharding: Any
    init: Callable  # () -> TrainState, sharded
    step: Callable  # (state, batch) -> (state, metrics)

    @contextmanager
    def context(self):
        """The mesh and logical-axis rules that the model's constraints resolve against."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_sh: Any, mesh: jax.sharding.Mesh, shard_state: bool
) -> TrainState:
    """The train state's shardings: parameters as given, the optimizer state after them (split over
    the data axes too with ``shard_state``), step and RNG replicated."""
    opt_sh = sharding.opt_state_shardings(jax.eval_shape(tx.init, abstract_params), param_sh, mesh, shard_state)
    repl = sharding.replicated(mesh)
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)


def jit_step(step_fn: Callable, state_sh: TrainState, batch_sh: Any, *extra_sh: Any) -> Callable:
    """``step_fn(state, batch, *extra) -> (state, metrics)`` jitted with explicit shardings, the state
    donated (updated in place) and the metrics replicated."""
    repl = sharding.replicated(batch_sh.mesh)
    return jax.jit(
        step_fn, in_shardings=(state_sh, batch_sh, *extra_sh), out_shardings=(state_sh, repl), donate_argnums=0
    )


def restore_or_init(
    checkpointer: ckpt.Checkpointer,
    compiled: Compiled,
    model_cfg: ModelConfig,
    saved_tree: Callable[[TrainState], Any] = lambda state: state,
    target_shardings: Any = None,
    train_state: Callable[[Any], TrainState] = lambda tree: tree,
) -> tuple[TrainState, int, bool]:
    """``(state, start step, restored?)``: the newest intact checkpoint, else ``compiled.init()``.

    A checkpoint holds ``saved_tree(state)`` (default: the state itself) under ``target_shardings``
    (default: the state's); ``train_state`` takes the state back out of a restored tree."""
    with compiled.context():
        abstract_tree = jax.eval_shape(saved_tree, jax.eval_shape(compiled.init))
        target = ckpt.abstract(abstract_tree, target_shardings or compiled.state_shardings)
        restored = checkpointer.restore_latest(target, model_cfg)
        if restored is None:
            return compiled.init(), 0, False
    tree, meta = restored
    return train_state(tree), int(meta["step"]), True


@dataclass(frozen=True)
class Resumed:
    """A run directory opened for training: its checkpointer and metrics log, the state to start from."""

    checkpointer: ckpt.Checkpointer
    log: MetricsLog
    state: TrainState
    start: int
    restored: bool


@contextmanager
def resumed(
    run_dir: Path,
    cfg: Config,
    restore: Callable[[ckpt.Checkpointer], tuple],
    is_main: bool = True,
    changes: dict | None = None,
) -> Iterator[Resumed]:
    """Opens ``run_dir``'s checkpoints, restores (``restore(checkpointer)``, which may refuse; a
    signal received so far stops the run here, :func:`jaxllm.core.signals.check`) and opens
    ``metrics.jsonl`` (cut back to the resume step; an unreadable file refuses the run), all before
    the caller writes anything, then records the ``changes`` a resume was allowed
    (``{"section.key": [saved, now]}``) there; closes both on the way out."""
    checkpointer = ckpt.Checkpointer(run_dir, cfg.checkpoint.keep)
    log = None
    try:
        state, start, restored = restore(checkpointer)
        signals.check("restoring the checkpoint" if restored else "initialising the state")
        tb = run_dir / "tb" if cfg.log.tensorboard else None
        log = MetricsLog(run_dir / "metrics.jsonl", start, is_main, tb)
        if changes and restored:
            log.write({"step": start, CHANGES: changes})
        yield Resumed(checkpointer, log, state, start, restored)
    finally:
        checkpointer.close()
        if log is not None:
            log.close()


def model_flops_utilisation(
    model_cfg: ModelConfig, mesh: jax.sharding.Mesh, seq_len: int, peak_flops: float
) -> Callable:
    """``tokens/s -> MFU`` over the mesh's devices. Faked CPU devices share the host's cores: the peak
    is per process there, per device elsewhere."""
    device = mesh.devices.flat[0]
    per_device = flops.peak_flops(device, peak_flops)
    total = per_device * (jax.process_count() if device.platform == "cpu" else mesh.devices.size)
    return functools.partial(flops.mfu, cfg=model_cfg, seq_len=seq_len, total_peak=total)


def cadence(cfg: Config) -> loop.Cadence:
    return loop.Cadence(cfg.train.steps, cfg.log.every, cfg.eval.every, cfg.checkpoint.every)


def run_loop(
    run: Resumed,
    cfg: Config,
    compiled: Compiled,
    model_cfg: ModelConfig,
    batch_at: Callable[[int], Any],
    save: Callable[[ckpt.Checkpointer, int, TrainState], None],
    evaluate: Callable | None = None,
    is_main: bool = True,
    data_stats: Callable[[int], dict] | None = None,
) -> loop.Outcome:
    """The shared loop from ``run.start`` to ``train.steps``; ``save(checkpointer, step, state)``
    writes one checkpoint; ``data_stats(step)``: the data's fields of a training record."""
    t = cfg.train
    parts = loop.Parts(
        step=compiled.step,
        batch_at=batch_at,
        save=functools.partial(save, run.checkpointer),
        checkpoint_dir=run.checkpointer.directory,
        log=run.log,
        mfu=model_flops_utilisation(model_cfg, compiled.mesh, t.seq_len, cfg.log.peak_flops),
        tokens_per_step=t.batch_size * t.grad_accum * t.seq_len,
        context=compiled.context,
        evaluate=evaluate,
        is_main=is_main,
        progress=cfg.log.progress,
        data_stats=data_stats,
    )
    out = loop.run(parts, cadence(cfg), run.state, run.start, run.start if run.restored else None)
    if out.step == run.start and run.log.path.is_file():  # nothing left to train: the run's own last figures
        out.loss, out.eval = reported(run.log.path, run.start)
    return out


def reported(metrics_path: Path, step: int) -> tuple[float, dict]:
    """The last training loss and the last evaluation's record that ``metrics.jsonl`` holds up to
    ``step`` (nan and ``{}`` where it holds none)."""
    rows = [r for r in read_jsonl(metrics_path, "metrics file", torn_tail_ok=True) if r.get("step", 0) <= step]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [{k: v for k, v in r.items() if k != "step"} for r in rows if "eval_loss" in r]
    return (losses[-1] if losses else math.nan), (evals[-1] if evals else {})
