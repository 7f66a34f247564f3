"""The pure training and evaluation steps, shared by pre-training, fine-tuning and distillation.

``train_step(state, tokens_AxBxT1) -> (state, metrics)``: A micro-batches, each a loss and gradient,
averaged, one optimizer update. Whatever the loss (next-token, masked and packed for fine-tuning,
mixed with a teacher's for distillation), the step and its metrics are this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxllm.data import segments
from jaxllm.model import moe
from jaxllm.model.transformer import Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: the dropout key; step k uses fold_in(rng, k)


def layer_grad_norms(grads) -> jax.Array:
    """L2 norm of each block's gradient, ``[n_layer]`` (the stacked leaves' leading axis)."""
    sq = [
        jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
        for g in jax.tree.leaves(grads["blocks"])
    ]
    return jnp.sqrt(sum(sq))


def make_loss_fn(model: Transformer, eod_id: int | None = None) -> Callable:
    """``loss(params, tokens_BxT1, rng) -> (loss, stats)``: the mean next-token cross-entropy (nats; fused
    with the head under ``model.loss_chunk``) plus
    the weighted router losses of mixture-of-experts layers (``jaxllm.model.moe.loss``), and the router's
    statistics to log (``jaxllm.model.moe.telemetry``); both extras are absent from a dense model.
    ``eod_id``: attention stays within each document (``data.document_mask``)."""

    def loss_fn(params, tokens_BxT1, rng):
        (ce, _), sown = model.apply(
            {"params": params},
            tokens_BxT1,
            **segments.model_inputs(tokens_BxT1[:, :-1], eod_id),
            rngs={"dropout": rng},
            mutable=[moe.COLLECTION],
            method="next_token_loss",
        )
        return ce + moe.loss(sown), moe.telemetry(sown)

    return loss_fn


def with_stats(loss_fn: Callable) -> Callable:
    """``loss_fn`` returning ``(loss, stats)``: a loss function may return the loss alone (fine-tuning,
    distillation, the pipeline), or with a dict of arrays to log, averaged over micro-batches."""

    def loss_and_stats(*args):
        out = loss_fn(*args)
        return out if isinstance(out, tuple) else (out, {})

    return loss_and_stats


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, lr_schedule: optax.Schedule) -> Callable:
    """``step(state, tokens_AxBxT1) -> (state, metrics)``: A micro-batches accumulated, one update."""

    def train_step(state: TrainState, tokens_AxBxT1: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)

        def micro(carry, xs):
            grads_sum, loss_sum = carry
            tokens_BxT1, i = xs
            (loss, stats), grads = jax.value_and_grad(with_stats(loss_fn), has_aux=True)(
                state.params, tokens_BxT1, jax.random.fold_in(rng, i)
            )
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), stats

        accum = tokens_AxBxT1.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss), stats_A = jax.lax.scan(micro, (zeros, 0.0), (tokens_AxBxT1, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step),
            "layer_grad_norms": layer_grad_norms(grads),
            **jax.tree.map(lambda s_A: jnp.mean(s_A, axis=0), stats_A),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: Transformer, eod_id: int | None = None) -> Callable:
    """``eval(params, tokens_BxT1) -> mean next-token cross-entropy`` (nats), no dropout; ``eod_id`` as
    in :func:`make_loss_fn`."""

    def eval_step(params, tokens_BxT1):
        inputs = segments.model_inputs(tokens_BxT1[:, :-1], eod_id)
        return model.apply({"params": params}, tokens_BxT1, **inputs, method="next_token_loss")[0]

    return eval_step
