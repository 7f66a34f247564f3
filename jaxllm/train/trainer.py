"""Pre-training: set-up (model, mesh, shardings, jitted steps) and the run around the shared loop.

Data path: ``TrainData.rows`` (numpy, this process's rows of prepared datasets, built ahead on the
prefetch thread) -> a global ``jax.Array`` sharded over the data axes -> ``train_step`` (``jax.jit``
with explicit shardings, the state donated) -> metrics fetched every ``log.every`` steps ->
``metrics.jsonl``, TensorBoard, the progress bar (:mod:`jaxllm.train.loop`, which fine-tuning and distillation share).

``train(cfg)``: ``prepare_run`` (every check that can refuse the run) -> ``build`` -> lock ``run.dir``
-> restore the newest intact checkpoint or initialise -> config, tokenizer -> the loop -> loss.png.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.core import signals
from jaxllm.core.config import Config, ModelConfig, resolve, save_config, to_dict, validate
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.core.runtime import init_process, one_off_compiler_options
from jaxllm.data import corpus as data_lib
from jaxllm.data import synthetic
from jaxllm.data.batches import TrainData
from jaxllm.data.prefetch import Prefetcher
from jaxllm.evals import during_training
from jaxllm.model import decode, flops
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import pipeline, sharding
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import distill, loop, skeleton
from jaxllm.train import run_dir as run_dir_lib
from jaxllm.train.loop import TrainingDiverged
from jaxllm.train.metrics_log import plot_expert_load, plot_losses
from jaxllm.train.optim import optimizer, schedule
from jaxllm.train.run_dir import Changes, lock
from jaxllm.train.train_step import TrainState, make_eval_step, make_loss_fn, make_train_step

__all__ = ["Setup", "TrainState", "TrainingDiverged", "build", "global_batch", "prepare_run", "train"]

# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Setup(skeleton.Compiled):
    """A pre-training run compiled for a mesh: the model and the evaluation step beside the step."""

    model_cfg: ModelConfig
    model: Transformer
    tx: optax.GradientTransformation
    eval: Callable  # (params, tokens_BxT1) -> loss


def build(cfg: Config, mesh: jax.sharding.Mesh, eod_id: int | None = None) -> Setup:
    """Model, optimizer and shardings of ``cfg`` (its model resolved: :func:`prepare_run`); jitted
    init/step/eval with explicit shardings and donation. ``eod_id``: attention stays within documents
    (``data.document_mask``; see :func:`document_eod`)."""
    model_cfg, rule_table = cfg.model, sharding.rules(cfg.mesh)
    model = Transformer(model_cfg, deterministic=model_cfg.dropout == 0.0)
    eval_model = Transformer(model_cfg, deterministic=True)
    tx = optimizer(cfg.optim, cfg.train.steps)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        # the tokens are created inside the traced function: an eager array here would compile a program
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, cfg.train.seq_len), jnp.int32)))[
            "params"
        ]
        sharding.check_param_divisible(boxed, mesh, rule_table)  # any mesh.rules override included
        param_sh = sharding.logical_shardings(boxed, mesh, rule_table)
        abstract_params = jax.eval_shape(nn.unbox, boxed)  # the boxes hold ShapeDtypeStructs: no model trace
        state_sh = skeleton.state_shardings(tx, abstract_params, param_sh, mesh, cfg.optim.shard_state)

    batch_sh = sharding.batch_sharding(mesh, leading=1)
    loss_fn, eval_step = make_loss_fn(model, eod_id), make_eval_step(eval_model, eod_id)
    if mesh.shape["pipe"] > 1:
        loss_fn = pipeline.make_loss_fn(model, cfg.pipeline, mesh, rule_table, param_sh["blocks"])
        eval_step = pipeline.make_eval_fn(eval_model, cfg.pipeline, mesh, rule_table, param_sh["blocks"])
    lr = schedule(cfg.optim, cfg.train.steps)
    step = skeleton.jit_step(make_train_step(loss_fn, tx, lr), state_sh, batch_sh)
    if cfg.distill.teacher:  # the loss also matches a frozen teacher, run inside the same jitted step
        teacher = distill.load_teacher(cfg.distill.teacher, mesh, rule_table)
        distill_step = distill.make_train_step(
            model, teacher.model, cfg.distill, lambda loss: make_train_step(loss, tx, lr)
        )
        jitted = skeleton.jit_step(distill_step, state_sh, batch_sh, teacher.shardings)
        step = lambda state, batch: jitted(state, batch, teacher.params)
    init = make_init(model_cfg, tx, cfg.train.seed, cfg.train.seq_len)
    return Setup(
        mesh=mesh,
        rules=rule_table,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init=jax.jit(init, out_shardings=state_sh, compiler_options=one_off_compiler_options()),
        step=step,
        model_cfg=model_cfg,
        model=model,
        tx=tx,
        eval=jax.jit(
            eval_step,
            in_shardings=(param_sh, sharding.batch_sharding(mesh, 0)),
            out_shardings=sharding.replicated(mesh),
        ),
    )


def make_init(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, seq_len: int) -> Callable:
    """``() -> TrainState``: fresh parameters and optimizer state. The layer loop is traced rolled:
    unrolling (``model.scan_unroll``) speeds the step, not this one-off program, whose compilation it
    only slows, and the parameters are the same either way."""
    model = Transformer(dataclasses.replace(model_cfg, scan_unroll=1), deterministic=True)

    def init_fn():
        key = jax.random.PRNGKey(seed)
        params = nn.unbox(model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.fold_in(key, 1)
        )

    return init_fn


def global_batch(local_np: np.ndarray, sharding_: Any, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows -> one global array (each host supplies only its own slice)."""
    return jax.make_array_from_process_local_data(sharding_, local_np, global_shape)


def _prepare_data(cfg: Config) -> TrainData:
    """The run's prepared datasets; corpora among the sources are prepared into the cache first. With
    several processes, process 0 prepares: hosts sharing a file system would otherwise write the same
    cache at once. Its error is raised after the barrier, so the other processes fail the same way
    instead of waiting forever."""
    d, t = cfg.data, cfg.train
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        error = None
        if jax.process_index() == 0:
            try:
                data_lib.prepare_into_cache(d)
            except UserError as e:
                error = e
        multihost_utils.sync_global_devices("jaxllm: data prepared")
        if error is not None:
            raise error
    return data_lib.load(d, t.seq_len, t.seed)


def document_eod(cfg: Config, data: TrainData) -> int | None:
    """The end-of-document id that ``data.document_mask`` masks attention at; None when it is off."""
    if not cfg.data.document_mask:
        return None
    if cfg.mesh.pipe > 1 or cfg.distill.teacher:
        raise ConfigError("data.document_mask=true is not supported with mesh.pipe > 1 or distill.teacher")
    return data.eod_id


def check_resume(cfg: Config) -> Changes:
    """Refuses to resume a run directory whose newest readable checkpoint is another model, or one of
    another trajectory unless ``run.allow_changes`` (:func:`jaxllm.train.run_dir.check_resume`)."""
    run_dir = Path(cfg.run.dir)
    meta = ckpt.newest_meta(run_dir, cfg.checkpoint.keep) or {}
    if meta:
        ckpt.check_same_model(meta.get("model", {}), cfg.model, (run_dir / "checkpoints").absolute())
    return run_dir_lib.resume_changes(run_dir, cfg, meta.get("config"), run_dir / "config.yaml")


def prepare_run(cfg: Config, devices: list | None = None) -> tuple[TrainData, Config, jax.sharding.Mesh, Changes]:
    """All checks that can refuse the run, done before anything is written to ``run.dir``: the
    data, ``cfg`` with its model resolved (every size that was 0 = automatic filled in), the mesh,
    and what resuming changes (:func:`check_resume`).

    ``devices``: the devices of the mesh (default: all visible ones)."""
    validate(cfg)
    run_dir_lib.check_checkpoints(Path(cfg.run.dir))  # before the data is read
    init_process(cfg)
    data = _prepare_data(cfg)
    signals.check("preparing the data")
    document_eod(cfg, data)
    decode.check_sample_prompt(data.tokenizer, cfg.eval)
    during_training.check(cfg.eval)
    cfg = resolve(cfg, data.tokenizer.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_divisible(cfg.model, mesh, cfg.train.batch_size, jax.process_count())
    pipeline.check(cfg.model, cfg.pipeline, mesh, cfg.train.batch_size)
    if cfg.distill.teacher:
        distill.check_teacher(cfg.distill.teacher, cfg.model, data.tokenizer, cfg.train.seq_len, mesh.shape["pipe"])
    return data, cfg, mesh, check_resume(cfg)


# --------------------------------------------------------------------------- the run's parts


def process_rows(cfg: Config, batch_sharding: Any) -> tuple[int, int]:
    """``(block, blocks)``: which share of every batch's rows this process supplies."""
    t = cfg.train
    return sharding.process_block(batch_sharding, (t.grad_accum, t.batch_size, t.seq_len + 1), axis=1)


def batch_at(data: TrainData, cfg: Config, batch_sharding: Any, step: int) -> jax.Array:
    """The global batch ``[A, B, T+1]`` of ``step``, this process supplying (and reading) its own rows."""
    t = cfg.train
    shape = (t.grad_accum, t.batch_size, t.seq_len + 1)
    proc, nproc = process_rows(cfg, batch_sharding)
    local = data.rows(step, t.grad_accum, t.batch_size, proc, nproc)
    return global_batch(local, batch_sharding, shape)


@dataclass(frozen=True)
class Evaluator:
    """Validation loss over ``eval.batches`` evenly spaced windows, a sample of the model's text and the
    scores of ``eval.tasks`` (:mod:`jaxllm.evals.during_training`)."""

    cfg: Config
    setup: Setup
    data: TrainData
    apply_fn: Callable  # one function for the whole run: the sampler's compiled program is cached by it
    tasks: Callable[[Any], dict] | None = None  # params -> {"lm_eval/<task>/<metric>": score}

    def loss(self, params) -> float:
        t, n = self.cfg.train, self.cfg.eval.batches
        batch_sh = sharding.batch_sharding(self.setup.mesh, 0)
        proc, nproc = process_rows(self.cfg, self.setup.batch_sharding)
        losses, previous = [], None
        for i in range(n):
            local = self.data.eval_rows(i, n, t.batch_size, proc, nproc)
            losses.append(self.setup.eval(params, global_batch(local, batch_sh, (t.batch_size, t.seq_len + 1))))
            previous = loop.two_in_flight(previous, losses[-1])
        return float(np.mean(jax.device_get(losses)))

    def sample(self, params) -> str:
        e, m, tok = self.cfg.eval, self.setup.model_cfg, self.data.tokenizer
        if e.sample_tokens <= 0:
            return ""
        prompt_text = e.sample_prompt or tok.decode(self.data.prompt_ids(16))
        prompt = tok.encode(prompt_text)[: m.max_seq_len // 2]
        n_new = min(e.sample_tokens, m.max_seq_len - len(prompt))
        out = decode.generate_tokens(
            self.apply_fn, params, prompt, n_new, m.max_seq_len, e.temperature, e.top_k, seed=self.cfg.train.seed
        )
        return prompt_text + tok.decode(out)

    def __call__(self, state: TrainState, step: int) -> tuple[dict, str]:
        eval_loss = self.loss(state.params)
        text = self.sample(state.params)
        ppl = math.exp(min(eval_loss, 50.0))
        shown = f"step {step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}"
        if text:
            shown += f"\n--- sample ---\n{text}\n--------------"
        scores = self.tasks(state.params) if self.tasks is not None else {}
        shown += "".join(f"\n{k}: {v:.4f}" for k, v in scores.items())
        return {"eval_loss": eval_loss, "eval_ppl": ppl, "sample": text, **scores}, shown


def save_state(model: dict, config: dict, checkpointer: ckpt.Checkpointer, step: int, state: TrainState) -> None:
    checkpointer.save(step, state, {"step": step, "data_step": step, "model": model, "config": config})


def banner(cfg: Config, setup: Setup, data: TrainData, start: int, restored: bool) -> None:
    m, counts = setup.model_cfg, flops.param_counts(setup.model_cfg)
    print(
        f"jaxllm: {m.arch} {m.n_layer}x{m.d_model}, {counts['total'] / 1e6:.2f}M params "
        f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {m.vocab_size}, "
        f"{data.train_tokens / 1e6:.2f}M train tokens, mesh {dict(setup.mesh.shape)}, "
        + (f"resuming at step {start}" if restored else "from scratch"),
        file=sys.stderr,
    )
    if setup.mesh.shape["pipe"] > 1:
        print(pipeline.describe(cfg.pipeline, setup.mesh.shape["pipe"]), file=sys.stderr)
    if cfg.data.source.startswith("synthetic:"):
        rate = synthetic.entropy_rate(synthetic.parse(cfg.data.source))
        print(
            f"jaxllm: true entropy rate of the source {rate:.4f} nats/character (= nats/token with byte or char "
            "tokens): the lowest loss any model can reach",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- the run


def train(cfg: Config, devices: list | None = None) -> dict:
    """Runs (or resumes) ``cfg`` on ``devices`` (default: all) and returns a summary."""
    data, cfg, mesh, changes = prepare_run(cfg, devices)
    setup = build(cfg, mesh, document_eod(cfg, data))  # may still refuse the run (mesh.rules), so before any write
    signals.check("building the model")
    run_dir = Path(cfg.run.dir)
    with lock(run_dir, "another training run"):
        return _train(cfg, setup, data, run_dir, changes)


def data_stats(data: TrainData, cfg: Config, batches: Prefetcher, step: int) -> dict:
    """What metrics.jsonl records of the data after ``step`` steps: epochs of each source read, and the
    seconds the loop has waited for batches (~0 while prefetching hides reading behind the step)."""
    epochs = data.epochs(step, cfg.train.grad_accum, cfg.train.batch_size)
    return {"epochs": epochs, "data_wait_s": batches.wait_s}


def _train(cfg: Config, setup: Setup, data: TrainData, run_dir: Path, changes: Changes) -> dict:
    is_main = jax.process_index() == 0
    restore = functools.partial(skeleton.restore_or_init, compiled=setup, model_cfg=cfg.model)
    make_batch = functools.partial(batch_at, data, cfg, setup.batch_sharding)
    with (
        Prefetcher(make_batch, depth=cfg.data.prefetch, stop=cfg.train.steps) as batches,
        skeleton.resumed(run_dir, cfg, restore, is_main, changes.keys) as run,
    ):
        if is_main:
            save_config(cfg, run_dir / "config.yaml", changes.recorded(run.start, run.restored))
            data.tokenizer.save(run_dir)
            banner(cfg, setup, data, run.start, run.restored)
        save = functools.partial(save_state, to_dict(cfg.model), to_dict(cfg))
        tasks = during_training.make(cfg.eval, setup.model_cfg, data.tokenizer, setup.mesh, setup.rules)
        evaluate = Evaluator(cfg, setup, data, _apply_fn(setup.model.clone(deterministic=True)), tasks)
        stats = functools.partial(data_stats, data, cfg, batches)
        out = skeleton.run_loop(run, cfg, setup, cfg.model, batches.get, save, evaluate, is_main, stats)
    if is_main and (run_dir / "metrics.jsonl").exists():
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        plot_expert_load(run_dir / "metrics.jsonl", run_dir / "expert_load.png")
    return summary(out, run.start, cfg.model)


def summary(out: loop.Outcome, start: int, model_cfg: ModelConfig) -> dict:
    s = {
        "start_step": start,
        "step": out.step,
        "eval_loss": out.eval.get("eval_loss", math.nan),
        "params": flops.param_counts(model_cfg)["total"],
        "first_step_s": out.first_step_s,
    }
    if not math.isnan(out.loss):
        s["loss"] = out.loss
    if out.interrupted:
        s.update(interrupted=out.interrupted, signal=out.signal)
    return s


def _apply_fn(model: Transformer) -> Callable:
    """A stable, hashable ``(params, tokens) -> logits`` for the sampler's jit cache."""

    def apply(params, tokens_BxT):
        return model.apply({"params": params}, tokens_BxT)

    return apply
