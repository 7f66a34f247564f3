"""Pre-training: the jitted train step and the loop around it.

Data path: ``data.train_batch`` (numpy, this process's rows) -> a global ``jax.Array`` sharded over
the data axes -> ``train_step`` (``jax.jit`` with explicit shardings, the state donated) -> metrics
fetched every ``log.every`` steps -> ``metrics.jsonl``, TensorBoard, the progress bar.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import checkpoint as ckpt
from jaxllm import data as data_lib
from jaxllm import distill, flops, generate, pipeline, sharding, synthetic
from jaxllm.config import Config, ModelConfig, resolve_model, save_config, to_dict, validate
from jaxllm.errors import UserError
from jaxllm.model import Transformer, cross_entropy
from jaxllm.optim import optimizer, schedule
from jaxllm.runtime import init_process


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: the dropout key; step k uses fold_in(rng, k)


# --------------------------------------------------------------------------- the pure step


def layer_grad_norms(grads) -> jax.Array:
    """L2 norm of each block's gradient, ``[n_layer]`` (the stacked leaves' leading axis)."""
    sq = [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads["blocks"])]
    return jnp.sqrt(sum(sq))


def make_loss_fn(model: Transformer) -> Callable:
    """``loss(params, tokens_BxT1, rng) -> mean next-token cross-entropy`` (nats)."""

    def loss_fn(params, tokens_BxT1, rng):
        logits_BxTxV = model.apply({"params": params}, tokens_BxT1[:, :-1], rngs={"dropout": rng})
        return cross_entropy(logits_BxTxV, tokens_BxT1[:, 1:])[0]

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, lr_schedule: optax.Schedule) -> Callable:
    """``step(state, tokens_AxBxT1) -> (state, metrics)``: A micro-batches accumulated, one update."""

    def train_step(state: TrainState, tokens_AxBxT1: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)

        def micro(carry, xs):
            grads_sum, loss_sum = carry
            tokens_BxT1, i = xs
            loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens_BxT1, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

        accum = tokens_AxBxT1.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss), _ = jax.lax.scan(micro, (zeros, 0.0), (tokens_AxBxT1, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step),
            "layer_grad_norms": layer_grad_norms(grads),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable:
    def eval_step(params, tokens_BxT1):
        logits = model.apply({"params": params}, tokens_BxT1[:, :-1])
        return cross_entropy(logits, tokens_BxT1[:, 1:])[0]

    return eval_step


# --------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    """Everything compiled for one run: model, mesh, shardings and the jitted functions."""

    model_cfg: ModelConfig
    model: Transformer
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    state_shardings: TrainState
    batch_sharding: Any
    init: Callable  # () -> TrainState, sharded
    step: Callable  # (state, tokens_AxBxT1) -> (state, metrics)
    eval: Callable  # (params, tokens_BxT1) -> loss

    @contextmanager
    def context(self):
        """The mesh and logical-axis rules that the model's constraints resolve against."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def build(cfg: Config, model_cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Setup:
    """Model, optimizer and shardings; jitted init/step/eval with explicit shardings and donation."""
    rule_table = sharding.rules(cfg.mesh)
    model = Transformer(model_cfg, deterministic=model_cfg.dropout == 0.0)
    eval_model = Transformer(model_cfg, deterministic=True)
    tx = optimizer(cfg.optim, cfg.train.steps)

    def dummy():  # created inside each traced function: an eager array here would compile a program
        return jnp.zeros((1, cfg.train.seq_len), jnp.int32)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy()))["params"]
        sharding.check_param_divisible(boxed, mesh, rule_table)  # any mesh.rules override included
        param_sh = sharding.logical_shardings(boxed, mesh, rule_table)
        abstract_params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), dummy()))["params"])
        opt_sh = sharding.opt_state_shardings(
            tx, jax.eval_shape(tx.init, abstract_params), param_sh, mesh, cfg.optim.shard_state
        )
    repl = sharding.replicated(mesh)
    state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, rng=repl)

    def init_fn():
        key = jax.random.PRNGKey(cfg.train.seed)
        params = nn.unbox(model.init(key, dummy())["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.fold_in(key, 1)
        )

    batch_sh = sharding.batch_sharding(mesh, leading=1)
    loss_fn, eval_step = make_loss_fn(model), make_eval_step(eval_model)
    if mesh.shape["pipe"] > 1:
        loss_fn = pipeline.make_loss_fn(model, cfg.pipeline, mesh, rule_table, param_sh["blocks"])
        eval_loss_fn = pipeline.make_loss_fn(eval_model, cfg.pipeline, mesh, rule_table, param_sh["blocks"])
        eval_step = functools.partial(eval_loss_fn, rng=None)
    train_step = make_train_step(loss_fn, tx, schedule(cfg.optim, cfg.train.steps))
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
    if cfg.distill.teacher:  # the loss also matches a frozen teacher, run inside the same jitted step
        teacher = distill.load_teacher(cfg.distill.teacher, mesh, rule_table)
        distill_step = distill.make_train_step(
            model, teacher.model, cfg.distill, lambda loss: make_train_step(loss, tx, schedule(cfg.optim, cfg.train.steps))
        )
        jitted = jax.jit(
            distill_step, in_shardings=(state_sh, batch_sh, teacher.shardings), out_shardings=(state_sh, repl), donate_argnums=0
        )
        step = lambda state, batch: jitted(state, batch, teacher.params)
    return Setup(
        model_cfg=model_cfg,
        model=model,
        mesh=mesh,
        rules=rule_table,
        tx=tx,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init=jax.jit(init_fn, out_shardings=state_sh),
        step=step,
        eval=jax.jit(
            eval_step, in_shardings=(param_sh, sharding.batch_sharding(mesh, 0)), out_shardings=repl
        ),
    )


def global_batch(local_np: np.ndarray, sharding_: Any, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows -> one global array (each host supplies only its own slice)."""
    return jax.make_array_from_process_local_data(sharding_, local_np, global_shape)


# --------------------------------------------------------------------------- the loop


class _Signals:
    """Turns SIGTERM / SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsLog:
    """``metrics.jsonl`` (process 0 only), truncated to the resume step so a rerun never duplicates."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, tensorboard_dir: Path | None):
        self.path, self.enabled = path, enabled
        self.writer = None
        if not enabled:
            return
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, record["step"])
            for i, v in enumerate(record.get("layer_grad_norms", [])):
                self.writer.add_scalar(f"layer_grad_norm/{i}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"training curve: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def _prepare_tokens(cfg: Config) -> data_lib.TokenData:
    """Tokenizes the corpus (or reads its cache). With several processes, process 0 goes first: hosts
    sharing a file system would otherwise write the same cache files at once. Its error is raised
    after the barrier, so the other processes fail the same way instead of waiting forever."""
    d = cfg.data

    def prepare() -> data_lib.TokenData:
        return data_lib.prepare(d.source, d.tokenizer, d.val_fraction, d.bpe_vocab_size, d.cache_dir)

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            prepare()
        except UserError as e:
            error = e
    multihost_utils.sync_global_devices("jaxllm: tokens cached")
    if error is not None:
        raise error
    return prepare()


def prepare_run(cfg: Config, devices: list | None = None) -> tuple[data_lib.TokenData, ModelConfig, jax.sharding.Mesh]:
    """All checks that can refuse the run, done before anything is written to ``run.dir``.

    ``devices``: the devices of the mesh (default: all visible ones)."""
    validate(cfg)
    init_process(cfg)
    tokens = _prepare_tokens(cfg)
    data_lib.check_length(tokens.train, cfg.train.seq_len, "train")
    data_lib.check_length(tokens.val, cfg.train.seq_len, "validation")
    generate.check_sample_prompt(tokens.tokenizer, cfg.eval)
    model_cfg = resolve_model(cfg.model, tokens.tokenizer.vocab_size, cfg.train.seq_len)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_divisible(model_cfg, mesh, cfg.train.batch_size, jax.process_count())
    pipeline.check(model_cfg, cfg.pipeline, mesh, cfg.train.batch_size)
    if cfg.distill.teacher:
        distill.check_teacher(cfg.distill.teacher, model_cfg, tokens.tokenizer, cfg.train.seq_len, mesh.shape["pipe"])
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        checker = ckpt.Checkpointer(Path(cfg.run.dir), cfg.checkpoint.keep)
        try:
            checker.check_model(model_cfg)
        finally:
            checker.close()
    return tokens, model_cfg, mesh


def train(cfg: Config, devices: list | None = None) -> dict:
    """Runs (or resumes) ``cfg`` on ``devices`` (default: all) and returns a summary."""
    tokens, model_cfg, mesh = prepare_run(cfg, devices)
    setup = build(cfg, model_cfg, mesh)  # may still refuse the run (mesh.rules), so before any write
    run_dir = Path(cfg.run.dir)
    is_main = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = Config(**{**vars(cfg), "model": model_cfg})
    if is_main:
        save_config(resolved, run_dir / "config.yaml")
        tokens.tokenizer.save(run_dir)

    checkpointer = ckpt.Checkpointer(run_dir, cfg.checkpoint.keep)
    t = cfg.train
    with setup.context():
        abstract_state = ckpt.abstract(jax.eval_shape(setup.init), setup.state_shardings)
        restored = checkpointer.restore_latest(abstract_state, model_cfg)
        state = restored[0] if restored else setup.init()
    start = int(restored[1]["step"]) if restored else 0
    last_saved = start if restored else None

    counts = flops.param_counts(model_cfg)
    n_devices = mesh.devices.size
    device = mesh.devices.flat[0]
    per_device_peak = flops.peak_flops(device, cfg.log.peak_flops)
    # Faked CPU devices share the host's cores: the peak is per process there, per device elsewhere.
    total_peak = per_device_peak * (jax.process_count() if device.platform == "cpu" else n_devices)
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len
    log = MetricsLog(run_dir / "metrics.jsonl", start, is_main, run_dir / "tb" if cfg.log.tensorboard else None)
    if is_main:
        print(
            f"jaxllm: {model_cfg.arch} {model_cfg.n_layer}x{model_cfg.d_model}, {counts['total'] / 1e6:.2f}M params "
            f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {model_cfg.vocab_size}, "
            f"{len(tokens.train) / 1e6:.2f}M train tokens, mesh {dict(mesh.shape)}, "
            + (f"resuming at step {start}" if restored else "from scratch"),
            file=sys.stderr,
        )
        if mesh.shape["pipe"] > 1:
            print(pipeline.describe(cfg.pipeline, mesh.shape["pipe"]), file=sys.stderr)
        if cfg.data.source.startswith("synthetic:"):
            H = synthetic.entropy_rate(synthetic.parse(cfg.data.source))
            print(f"jaxllm: true entropy rate of the source {H:.4f} nats/character (= nats/token with byte or char "
                  "tokens): the lowest loss any model can reach", file=sys.stderr)

    accum_shape = (t.grad_accum, t.batch_size, t.seq_len + 1)
    proc, nproc = sharding.process_block(setup.batch_sharding, accum_shape, axis=1)  # this process's rows

    def batch_at(step: int) -> jax.Array:
        local = data_lib.train_batch(tokens.train, t.seed, step, t.grad_accum, t.batch_size, t.seq_len, proc, nproc)
        return global_batch(local, setup.batch_sharding, accum_shape)

    def evaluate() -> float:
        losses = []
        for i in range(cfg.eval.batches):
            local = data_lib.eval_batch(tokens.val, i, cfg.eval.batches, t.batch_size, t.seq_len, proc, nproc)
            batch = global_batch(local, sharding.batch_sharding(mesh, 0), (t.batch_size, t.seq_len + 1))
            losses.append(setup.eval(state.params, batch))
        return float(np.mean(jax.device_get(losses)))

    apply_fn = _apply_fn(setup.model.clone(deterministic=True))

    def sample() -> str:
        if cfg.eval.sample_tokens <= 0:
            return ""
        prompt_text = cfg.eval.sample_prompt or tokens.tokenizer.decode(tokens.val[:16].tolist())
        prompt = tokens.tokenizer.encode(prompt_text)[: model_cfg.max_seq_len // 2]
        n_new = min(cfg.eval.sample_tokens, model_cfg.max_seq_len - len(prompt))
        out = generate.generate_tokens(
            apply_fn, state.params, prompt, n_new, model_cfg.max_seq_len, cfg.eval.temperature, cfg.eval.top_k, seed=t.seed
        )
        return prompt_text + tokens.tokenizer.decode(out)

    from tqdm import tqdm

    bar = tqdm(
        total=t.steps, initial=start, disable=not (cfg.log.progress and is_main), unit="step", dynamic_ncols=True,
        file=sys.stderr,
    )
    pending: list[tuple[int, dict]] = []
    summary: dict = {"start_step": start}
    eval_loss = math.nan
    timer_start, timer_tokens, compile_s = None, 0, None

    def save(step: int) -> None:
        nonlocal last_saved
        meta = {"step": step, "data_step": step, "model": to_dict(model_cfg), "config": to_dict(resolved)}
        checkpointer.save(step, state, meta)
        last_saved = step

    def flush(step: int) -> None:
        """Fetches the interval's metrics; stops at the first non-finite loss."""
        nonlocal timer_start, timer_tokens
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host):
            if not np.isfinite(m["loss"]):
                where = f"step {last_saved} in {checkpointer.directory}" if last_saved else "none yet"
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} at step {s}; training stopped. Last good checkpoint: {where}"
                )
        now = time.perf_counter()
        tps = timer_tokens / (now - timer_start) if timer_start is not None and timer_tokens else 0.0
        s, m = pending[-1][0], host[-1]
        record = {
            "step": s,
            "loss": float(m["loss"]),
            "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens_per_sec": tps,
            "mfu": flops.mfu(tps, model_cfg, t.seq_len, total_peak),
            "layer_grad_norms": [float(x) for x in m["layer_grad_norms"]],
        }
        log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        summary["loss"] = record["loss"]
        pending.clear()
        timer_start, timer_tokens = now, 0

    step = start
    try:
        with _Signals() as signals, setup.context():
            next_batch = batch_at(step) if step < t.steps else None
            while step < t.steps:
                batch = next_batch
                state, metrics = setup.step(state, batch)
                step += 1
                if step < t.steps:
                    next_batch = batch_at(step)  # overlaps with the step running on the device
                pending.append((step, metrics))
                if compile_s is None:
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter()
                    timer_start, timer_tokens = compile_s, 0
                else:
                    timer_tokens += tokens_per_step
                bar.update(1)
                if step % cfg.log.every == 0 or step == t.steps:
                    flush(step)
                if step % cfg.eval.every == 0 or step == t.steps:
                    if pending:
                        flush(step)
                    eval_loss = evaluate()
                    text = sample()
                    log.write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "sample": text})
                    if is_main:
                        bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(min(eval_loss, 50)):.2f}")
                        if text:
                            bar.write(f"--- sample ---\n{text}\n--------------")
                    timer_start, timer_tokens = time.perf_counter(), 0
                if step % cfg.checkpoint.every == 0 or step == t.steps:
                    save(step)
                if signals.received is not None:
                    if pending:
                        flush(step)
                    if last_saved != step:
                        save(step)
                    summary["interrupted"] = signal.Signals(signals.received).name
                    break
    finally:
        bar.close()
        checkpointer.close()
        log.close()
    if is_main and (run_dir / "metrics.jsonl").exists():
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    summary.update(step=step, eval_loss=eval_loss, params=counts["total"])
    return summary


def _apply_fn(model: Transformer) -> Callable:
    """A stable, hashable ``(params, tokens) -> logits`` for the sampler's jit cache."""

    def apply(params, tokens_BxT):
        return model.apply({"params": params}, tokens_BxT)

    return apply
