"""lm-evaluation-harness tasks inside a training run: ``eval.tasks`` every ``eval.every`` steps on the
run's own parameters, with no reload from disk, each score a field of the evaluation's record
(``metrics.jsonl`` and TensorBoard, beside the validation loss): ``lm_eval/<task>/<metric>``.

    check(eval_cfg)             at start-up, before any training: lm_eval installed, every task known
    make(eval_cfg, model, ...)  the run's :class:`TaskEval`, or None without ``eval.tasks``
    TaskEval(params)            ``{"lm_eval/<task>/<metric>": score}`` of the model on ``params``
    loop_evaluate(task_eval)    the loop's ``evaluate`` of a run whose only evaluation is the tasks

The scores are those ``python -m jaxllm.evaluate RUN --tasks ... --limit N`` gives on the saved run:
the same ``LM`` (:mod:`jaxllm.evals.lm`) over the same forward pass, decoder and tokenizer roles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.core.config import EvalConfig, ModelConfig
from jaxllm.core.errors import ConfigError
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.hf import tokenizer_export
from jaxllm.model import decode
from jaxllm.model.transformer import Transformer

INSTALL = 'eval.tasks needs lm-evaluation-harness; install it with: pip install -e ".[eval]" (or pip install lm_eval)'
PREFIX = "lm_eval/"  # the records' key prefix: lm_eval/<task>/<metric>
PLACEHOLDER = 0  # the token id at a prompt-tuned model's learned positions: the model replaces its embedding


def task_names(e: EvalConfig) -> tuple[str, ...]:
    return tuple(t.strip() for t in e.tasks.split(",") if t.strip())


def check(e: EvalConfig) -> None:
    """Refuses, before anything is trained or written, ``eval.tasks`` without lm_eval installed, an
    unknown task, a task file that does not parse or a task whose documents cannot be fetched
    (one-line errors), and a run of several processes (the harness feeds one process's requests)."""
    if not task_names(e):
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None
    if e.tasks_num_fewshot < -1:
        raise ConfigError(f"eval.tasks_num_fewshot must be >= 0, or -1 for the task's own, got {e.tasks_num_fewshot}")
    if jax.process_count() > 1:
        raise ConfigError(f"eval.tasks runs in one process; this run has {jax.process_count()}")
    from jaxllm.evals.tasks import fetch

    fetch(list(task_names(e)), _manager(task_names(e), e.tasks_include_path or None))


@functools.lru_cache(maxsize=4)
def _manager(tasks: tuple[str, ...], include_path: str | None):
    from jaxllm.evals.tasks import task_manager

    return task_manager(list(tasks), include_path)


@dataclass
class TaskEval:
    """``eval.tasks`` on a model whose parameters are given at each call (``merge``: the model's own
    parameters from the run's, e.g. LoRA folded in)."""

    cfg: EvalConfig
    lm: Any  # jaxllm.evals.lm.JaxllmLM, its backend's params set for each evaluation
    merge: Callable | None = None

    def __call__(self, params: Any) -> dict[str, float]:
        from jaxllm.evals import tasks

        e = self.cfg
        self.lm.backend.params = params if self.merge is None else self.merge(params)
        try:
            results = tasks.evaluate(
                self.lm,
                list(task_names(e)),
                _manager(task_names(e), e.tasks_include_path or None),
                num_fewshot=None if e.tasks_num_fewshot < 0 else e.tasks_num_fewshot,
                limit=e.tasks_limit or None,
                bootstrap_iters=0,  # standard errors are not recorded
            )
        finally:
            self.lm.backend.params = None  # the training step donates these buffers
        return {PREFIX + k: v for k, v in tasks.scores(results).items()}


def loop_evaluate(tasks: TaskEval | None) -> Callable | None:
    """The training loop's ``evaluate(state, step) -> (record, text)`` of ``tasks`` alone (a run with no
    other evaluation); None without tasks."""
    if tasks is None:
        return None

    def evaluate(state: Any, step: int) -> tuple[dict, str]:
        scores = tasks(state.params)
        return scores, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())

    return evaluate


def make(
    e: EvalConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, mesh: jax.sharding.Mesh, rules: tuple,
    merge: Callable | None = None,
) -> TaskEval | None:  # fmt: skip
    """The :class:`TaskEval` of a run's model (``model_cfg``, ``tokenizer``) on ``mesh``; None without
    ``eval.tasks``."""
    if not task_names(e):
        return None
    from jaxllm.evals import lm

    model_cfg = dataclasses.replace(model_cfg, remat="none")  # recomputation only matters for gradients
    n_prefix = model_cfg.prompt_tokens
    backend = lm.Backend(
        None,
        _logits_fn(Transformer(model_cfg, deterministic=True), n_prefix),
        _decode_fn(decode.Decoder(model_cfg), n_prefix),
        tokenizer,
        tokenizer_export.roles(tokenizer, (), model_cfg.vocab_size),
        model_cfg.max_seq_len - n_prefix,
        **lm.on_mesh(mesh, rules),
    )
    return TaskEval(e, lm.JaxllmLM(backend, e.tasks_batch_size), None if merge is None else jax.jit(merge))


def _logits_fn(module: Transformer, n_prefix: int) -> Callable:
    """``(params, tokens_BxT) -> float32 logits_BxTxV`` after a learned prompt's placeholders, if any."""

    def logits(params, tokens_BxT):
        tokens_BxT = jnp.pad(tokens_BxT, ((0, 0), (n_prefix, 0)), constant_values=PLACEHOLDER)
        return module.apply({"params": params}, tokens_BxT)[:, n_prefix:].astype(jnp.float32)

    return logits


def _decode_fn(decoder: decode.Decoder, n_prefix: int) -> Callable:
    def decode_fn(params, prompts, n_new, **sampling):
        return decoder(params, [[PLACEHOLDER] * n_prefix + list(p) for p in prompts], n_new, **sampling)

    return decode_fn
