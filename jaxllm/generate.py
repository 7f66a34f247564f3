"""Sampling from a trained model: temperature, top-k and top-p (nucleus) over full forward passes.

Each new token reruns the model over a fixed buffer of ``max_seq_len`` positions, so one compiled
program serves every prompt length; causality makes the not-yet-written positions irrelevant.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.errors import ConfigError


def filter_logits(logits_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scaled logits with everything outside the top-k / top-p set at -inf (float32)."""
    logits = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth_B = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth_B, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff_B = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff_B, -jnp.inf, logits)
    return logits


def next_token(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_BxV, temperature, top_k, top_p)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("apply_fn", "n_new", "temperature", "top_k", "top_p"))
def _sample(params, buf_BxS, start, rng, *, apply_fn, n_new, temperature, top_k, top_p):
    def body(i, carry):
        buf, rng = carry
        rng, sub = jax.random.split(rng)
        logits_BxSxV = apply_fn(params, buf)
        logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxSxV, i - 1, axis=1, keepdims=False)
        tok_B = next_token(logits_BxV, sub, temperature, top_k, top_p)
        return jax.lax.dynamic_update_index_in_dim(buf, tok_B, i, axis=1), rng

    buf, _ = jax.lax.fori_loop(start, start + n_new, body, (buf_BxS, rng))
    return buf


def generate_tokens(
    apply_fn: Callable,
    params,
    prompt: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """The ``max_new_tokens`` ids that follow ``prompt`` (``apply_fn(params, tokens_BxS) -> logits``)."""
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one token")
    if len(prompt) + max_new_tokens > max_seq_len:
        raise ConfigError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {max_seq_len} tokens"
        )
    buf = np.zeros((1, max_seq_len), np.int32)
    buf[0, : len(prompt)] = prompt
    out = _sample(
        params,
        jnp.asarray(buf),
        len(prompt),
        jax.random.PRNGKey(seed),
        apply_fn=apply_fn,
        n_new=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    return np.asarray(out[0, len(prompt) : len(prompt) + max_new_tokens]).tolist()
