"""Supervised fine-tuning: a pre-trained model continues on demonstrations, loss on the answers only.

    init.from (jaxllm run or Hugging Face dir) -> jaxllm.load -> tokenizer + chat markers, their
    embedding rows as a parameter of their own, trained by every method (jaxllm.sft.peft.new_tokens_init)
    -> method's extra parameters (jaxllm.sft.peft)
    -> packed batches [B, 5, T] (jaxllm.data.chat) -> the shared train step, with an optax-masked
    optimizer -> exact match of greedy answers on held-out prompts, before and after
    -> run.dir: config.yaml + tokenizer.json + checkpoints (jaxllm.load reads them), sft.yaml, eval.json

The train step is the pre-training one (:func:`jaxllm.train.train_step.make_train_step`) and so is the
loop (:mod:`jaxllm.train.loop`): a batch is one int32 array, so gradient accumulation, metrics, periodic
checkpoints, bitwise resume, the SIGTERM save and the NaN stop carry over unchanged; only the loss
differs (masked, packed). The data-parallel axes of ``mesh`` split the batch; parameters and optimizer
state are sharded as pre-training shards them, and a Hugging Face base streams straight into its
shards (:mod:`jaxllm.sft.sft_base`).
A checkpoint holds the merged model (``params``, what :func:`jaxllm.load` reads) and the training state
(``train``, what a resumed run continues from). ``run.dir`` is new or holds this very fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core import signals
from jaxllm.core.config import (
    Config,
    ModelConfig,
    OptimConfig,
    SFTConfig,
    TrainConfig,
    save_config,
    to_dict,
    validate_model,
)
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import write_json
from jaxllm.core.runtime import init_compile_cache, init_cpu_devices
from jaxllm.data import chat, tasks
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.evals import during_training
from jaxllm.infer import api
from jaxllm.model import decode as gen
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding
from jaxllm.sft import peft, sft_base
from jaxllm.sft.sft_loss import make_loss_fn
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import skeleton
from jaxllm.train.metrics_log import plot_losses
from jaxllm.train.optim import optimizer, schedule
from jaxllm.train.run_dir import Changes, check_checkpoints, check_finetune_dir, lock
from jaxllm.train.train_step import TrainState, make_train_step

PLACEHOLDER = api.PLACEHOLDER  # token id at prompt tuning's virtual positions; the model replaces its embedding


def init_from(cfg: SFTConfig) -> str:
    return getattr(cfg.init, "from")


def method_optim(cfg: SFTConfig) -> OptimConfig:
    """``cfg.optim`` with the method's own peak learning rate (``lora.lr``, ``prompt.lr``,
    ``adapter.lr``) where one is set; ``min_lr`` keeps its ratio to the peak. Parameter-efficient
    methods move few weights, and want larger steps than full fine-tuning."""
    section = {"lora": cfg.lora, "prompt": cfg.prompt, "adapter": cfg.adapter}.get(cfg.sft.method)
    lr = section.lr if section is not None else 0.0
    if lr == 0.0:
        return cfg.optim
    return dataclasses.replace(cfg.optim, lr=lr, min_lr=cfg.optim.min_lr * lr / cfg.optim.lr)


def validate_sft(cfg: SFTConfig) -> None:
    """Checks that need neither the model nor the data."""
    peft.check_method(cfg.sft.method)
    for key in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(cfg.train, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(cfg.train, key)}")
    if cfg.optim.lr <= 0 or not 0 <= cfg.optim.min_lr <= cfg.optim.lr:
        raise ConfigError(
            f"optim.lr must be positive and optim.min_lr in [0, optim.lr], got {cfg.optim.lr}, {cfg.optim.min_lr}"
        )
    for key in ("lora.lr", "prompt.lr", "adapter.lr"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"{key} must be positive (or 0 for optim.lr), got {getattr(getattr(cfg, section), name)}")
    for key, value in (
        ("sft.n_train", cfg.sft.n_train),
        ("sft.n_eval", cfg.sft.n_eval),
        ("sft.max_new_tokens", cfg.sft.max_new_tokens),
        ("lora.rank", cfg.lora.rank),
        ("prompt.n_virtual_tokens", cfg.prompt.n_virtual_tokens),
        ("adapter.dim", cfg.adapter.dim),
    ):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    src = Path(init_from(cfg))
    if not src.exists():
        raise ConfigError(
            f"init.from={str(src)!r} does not exist: run `python train.py` first (it writes runs/tiny), "
            "or point init.from at a jaxllm run or a Hugging Face model directory"
        )


# --------------------------------------------------------------------------- data


@dataclass
class EvalSet:
    tasks: list[str]  # the task of each example
    prompts: list[list[int]]  # token ids, ending in <|assistant|>
    answers: list[str]


def load_data(cfg: SFTConfig, tok: Tokenizer) -> tuple[list[chat.Chat], EvalSet]:
    """Training conversations and the held-out prompts with their expected answers."""
    if cfg.sft.data == "tasks":
        train = [c for _, c in tasks.dataset("train", cfg.sft.n_train, cfg.train.seed)]
        held = tasks.dataset("eval", cfg.sft.n_eval, cfg.train.seed)
    else:
        records = chat.read_jsonl(cfg.sft.data)
        held = [("jsonl", c) for i, c in enumerate(records) if i % 20 == 0]
        train = [c for i, c in enumerate(records) if i % 20 != 0] or records
    pairs = [chat.prompt_and_answer(tok, c) for _, c in held]
    return train, EvalSet([t for t, _ in held], [p for p, _ in pairs], [a for _, a in pairs])


def packed_rows(chats: list[chat.Chat], tok: Tokenizer, seq_len: int, prefix: int) -> np.ndarray:
    return chat.pack([chat.shift(*chat.encode(tok, c), prefix=prefix) for c in chats], seq_len, chat.pad_id(tok))


# --------------------------------------------------------------------------- evaluation


def make_greedy(model_cfg: ModelConfig, lora_scale: float, max_new: int, end_id: int) -> Callable:
    """``greedy(params, prompts) -> answers``: greedy token ids of all prompts as one batch, cut at
    ``end_id``, by :mod:`jaxllm.model.decode`'s cached decoder on the method's merged weights (a learned
    prompt is a model parameter, so prompt tuning decodes the same way)."""
    decoder = gen.Decoder(model_cfg)

    def greedy(params, prompts: list[list[int]]) -> list[list[int]]:
        return decoder(peft.model_params(params, lora_scale), prompts, max_new, temperature=0.0, eos_ids=[end_id])

    return greedy


def exact_match(task_names: list[str], predictions: list[str], answers: list[str]) -> dict[str, float]:
    """``{"overall": share, "<task>": share, ...}`` of predictions equal to the answer."""
    hits = [p == a for p, a in zip(predictions, answers)]
    out = {"overall": float(np.mean(hits))}
    for t in dict.fromkeys(task_names):
        out[t] = float(np.mean([h for h, n in zip(hits, task_names) if n == t]))
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class Prepared:
    """Everything checked and built before anything is written to ``run.dir``."""

    model_cfg: ModelConfig
    base_config: Config
    tokenizer: Tokenizer
    params: dict
    mask: dict
    lora_scale: float
    rows: np.ndarray  # [R, 5, seq_len] packed training rows
    eval_set: EvalSet
    prefix: int  # placeholder positions before every example (prompt tuning)
    mesh: jax.sharding.Mesh
    rules: Any  # the logical-axis rules table (sharding.rules)
    shardings: dict  # of params, leaf by leaf


def _method_init(cfg: SFTConfig, model_cfg: ModelConfig, params: dict, base: ModelConfig) -> tuple[dict, float]:
    """``params`` plus the parameters of ``sft.method`` (drawn from ``train.seed``), and LoRA's scale
    (0 for the other methods); a base that has adapters already keeps its own."""
    key = jax.random.PRNGKey(cfg.train.seed)
    method = cfg.sft.method
    if method == "lora":
        targets = peft.parse_targets(cfg.lora.targets, params, model_cfg.arch)
        return peft.lora_init(params, targets, cfg.lora.rank, key), cfg.lora.alpha / cfg.lora.rank
    if method == "prompt":
        return peft.prompt_init(params, cfg.prompt.n_virtual_tokens, key), 0.0
    if method == "adapter" and base.adapter_dim == 0:
        return {**params, "blocks": {**params["blocks"], **peft.adapter_init(model_cfg, key)}}, 0.0
    return params, 0.0


def prepare(cfg: SFTConfig, devices: list | None = None) -> Prepared:
    """Loads the base model (a Hugging Face one straight into its shardings on the run's mesh) and the
    data, and adds the method's parameters; raises on any bad input."""
    validate_sft(cfg)
    check_checkpoints(Path(cfg.run.dir))  # before the base model and the data are read
    during_training.check(cfg.eval)
    init_compile_cache(cfg.run.compile_cache)  # before the base model compiles or touches a device
    init_cpu_devices(cfg.dist.cpu_devices)
    mesh, rule_table = sharding.make_mesh(cfg.mesh, devices), sharding.rules(cfg.mesh)
    base = sft_base.load(init_from(cfg), cfg.model, mesh, rule_table)
    tok = chat.chat_tokenizer(base.tokenizer)
    method = cfg.sft.method
    m = base.config.model
    # Chat markers the base tokenizer lacks are new rows of their own (trained by every method), even
    # where the base table's padding rows could hold them: those were never trained as tokens.
    grown = tok.vocab_size > base.tokenizer.vocab_size
    model_cfg = dataclasses.replace(
        m,
        vocab_size=tok.vocab_size if grown else m.vocab_size,
        adapter_dim=cfg.adapter.dim if method == "adapter" else m.adapter_dim,
        prompt_tokens=cfg.prompt.n_virtual_tokens if method == "prompt" else m.prompt_tokens,
    )
    validate_model(model_cfg)
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's context of {model_cfg.max_seq_len} tokens"
        )
    base_params = peft.vocab_rows(base.params, base.tokenizer.vocab_size) if grown else base.params
    params, lora_scale = _method_init(cfg, model_cfg, peft.new_tokens_init(base_params, model_cfg.vocab_size), m)
    prefix = model_cfg.prompt_tokens  # placeholder positions the model fills with its learned prompt
    train_chats, eval_set = load_data(cfg, tok)
    longest = prefix + max(len(p) for p in eval_set.prompts) + cfg.sft.max_new_tokens
    if longest > model_cfg.max_seq_len:
        raise ConfigError(
            f"the longest held-out prompt plus sft.max_new_tokens needs {longest} positions; "
            f"the model has {model_cfg.max_seq_len}"
        )
    rows = packed_rows(train_chats, tok, cfg.train.seq_len, prefix)
    base_shape = dataclasses.replace(model_cfg, vocab_size=m.vocab_size)  # the markers' rows are replicated
    sharding.check_divisible(base_shape, mesh, cfg.train.batch_size, jax.process_count())
    shardings = sft_base.param_shardings(params, base_shape, mesh, rule_table)
    return Prepared(
        model_cfg,
        base.config,
        tok,
        params,
        peft.trainable_mask(params, method),
        lora_scale,
        rows,
        eval_set,
        prefix,
        mesh,
        rule_table,
        shardings,
    )


def _export_config(cfg: SFTConfig, p: Prepared) -> Config:
    """The pre-training form of this run's config, which :func:`jaxllm.load` reads back."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    return Config(**{**sections, "model": p.model_cfg, "data": p.base_config.data})


def _print_table(before: dict, after: dict) -> None:
    print(f"{'task':<10} {'before':>7} {'after':>7}")
    for k, score in after.items():
        print(f"{k:<10} {before[k]:>7.1%} {score:>7.1%}")


@dataclass(frozen=True)
class Job(skeleton.Compiled):
    """A fine-tuning run compiled for a mesh, parameters and optimizer state sharded as pre-training
    shards them (:func:`jaxllm.sft.sft_base.param_shardings`)."""

    merged_shardings: dict  # of the merged model params a checkpoint holds
    lora_scale: float


def build(cfg: SFTConfig, p: Prepared) -> Job:
    t, mesh = cfg.train, p.mesh
    model = Transformer(p.model_cfg, deterministic=p.model_cfg.dropout == 0.0)
    optim_cfg = method_optim(cfg)
    tx = peft.masked(optimizer(optim_cfg, t.steps), p.mask)
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(p.rules):
        state_sh = skeleton.state_shardings(tx, p.params, p.shardings, mesh, optim_cfg.shard_state)
        step_fn = skeleton.jit_step(
            make_train_step(make_loss_fn(model, p.mask, p.lora_scale), tx, schedule(optim_cfg, t.steps)),
            state_sh,
            batch_sh,
        )

    def init() -> TrainState:
        params = jax.device_put(p.params, p.shardings)
        rng = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
        return jax.device_put(
            TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng), state_sh
        )

    merged = jax.eval_shape(lambda x: peft.model_params(x, p.lora_scale), p.params)
    merged_sh = sft_base.param_shardings(merged, p.model_cfg, mesh, p.rules)
    return Job(mesh, p.rules, state_sh, batch_sh, init, step_fn, merged_sh, p.lora_scale)


def batch_order(n_rows: int, t: TrainConfig) -> np.ndarray:
    """``[steps, A, B]`` row indices: epochs of shuffled rows, the same for any ``t.steps`` up to a step."""
    order = np.random.default_rng(t.seed)
    need = t.steps * t.grad_accum * t.batch_size
    picks = np.concatenate([order.permutation(n_rows) for _ in range(-(-need // n_rows))])[:need]
    return picks.reshape(t.steps, t.grad_accum, t.batch_size)


def batch_at(rows: np.ndarray, picks: np.ndarray, batch_sharding: Any, step: int) -> jax.Array:
    return jax.device_put(jnp.asarray(rows[picks[step]]), batch_sharding)


def saved_tree(lora_scale: float, state: TrainState) -> dict:
    """What a checkpoint holds: the merged model ``params`` that :func:`jaxllm.load` reads (LoRA folded
    in, the markers' rows appended) and the training state ``train`` a resumed run continues from."""
    return {"params": peft.model_params(state.params, lora_scale), "train": state}


def save_state(
    lora_scale: float, model: dict, config: dict, checkpointer: ckpt.Checkpointer, step: int, state: TrainState
) -> None:
    checkpointer.save(step, saved_tree(lora_scale, state), {"step": step, "model": model, "config": config})


def restore_or_init(checkpointer: ckpt.Checkpointer, job: Job, model_cfg: ModelConfig) -> tuple[TrainState, int, bool]:
    """The newest intact checkpoint's training state, else ``job.init()``."""
    return skeleton.restore_or_init(
        checkpointer,
        job,
        model_cfg,
        functools.partial(saved_tree, job.lora_scale),
        {"params": job.merged_shardings, "train": job.state_shardings},
        lambda tree: tree["train"],
    )


def finetune(cfg: SFTConfig, devices: list | None = None) -> dict:
    """Fine-tunes ``init.from`` as ``cfg`` says; writes (or resumes) ``run.dir``; returns a summary."""
    p = prepare(cfg, devices)
    signals.check("loading the base model and the data")
    changes = check_finetune_dir(Path(cfg.run.dir), Path(init_from(cfg)), cfg)
    job = build(cfg, p)
    signals.check("building the model")
    with lock(Path(cfg.run.dir), "another fine-tuning run"):
        return _finetune(cfg, p, job, Path(cfg.run.dir), changes)


def _banner(cfg: SFTConfig, p: Prepared, start: int, restored: bool) -> None:
    trainable, total = peft.count(p.params, p.mask)
    print(
        f"sft: {cfg.sft.method} on {init_from(cfg)}: {trainable:,} trainable of {total:,} parameters "
        f"({trainable / total:.2%}); {len(p.rows)} packed rows of {cfg.train.seq_len} tokens; "
        f"peak lr {method_optim(cfg).lr:g}; " + (f"resuming at step {start}" if restored else "from the start"),
        file=sys.stderr,
    )


def _finetune(cfg: SFTConfig, p: Prepared, job: Job, run_dir: Path, changes: Changes) -> dict:
    greedy = make_greedy(p.model_cfg, p.lora_scale, cfg.sft.max_new_tokens, chat.end_id(p.tokenizer))
    prompts = [[PLACEHOLDER] * p.prefix + q for q in p.eval_set.prompts]

    def evaluate(params) -> dict[str, float]:
        with job.context():
            ids = greedy(params, prompts)
        return exact_match(p.eval_set.tasks, [p.tokenizer.decode(i) for i in ids], p.eval_set.answers)

    restore = functools.partial(restore_or_init, job=job, model_cfg=p.model_cfg)
    with skeleton.resumed(run_dir, cfg, restore, changes=changes.keys) as run:
        save_config(cfg, run_dir / "sft.yaml", changes.recorded(run.start, run.restored))
        save_config(_export_config(cfg, p), run_dir / "config.yaml")
        p.tokenizer.save(run_dir)
        _banner(cfg, p, run.start, run.restored)
        t0 = time.perf_counter()
        before = evaluate(jax.device_put(p.params, p.shardings))
        batches = functools.partial(batch_at, p.rows, batch_order(len(p.rows), cfg.train), job.batch_sharding)
        save = functools.partial(save_state, job.lora_scale, to_dict(p.model_cfg), to_dict(cfg))
        merge = functools.partial(peft.model_params, lora_scale=p.lora_scale)
        tasks_eval = during_training.make(cfg.eval, p.model_cfg, p.tokenizer, job.mesh, job.rules, merge)
        out = skeleton.run_loop(run, cfg, job, p.model_cfg, batches, save, during_training.loop_evaluate(tasks_eval))
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    trainable, total = peft.count(p.params, p.mask)
    summary = {"before": before, "trainable": trainable, "total": total, "loss": out.loss, "step": out.step}
    summary["first_step_s"] = out.first_step_s
    if out.interrupted:
        return {**summary, "interrupted": out.interrupted, "signal": out.signal}
    after = evaluate(out.state.params)
    _print_table(before, after)
    write_json(run_dir / "eval.json", {"before": before, "after": after})
    return {**summary, "after": after, "seconds": time.perf_counter() - t0}
