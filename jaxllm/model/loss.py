"""The next-token cross-entropy, whole or fused with the head a block of positions at a time.

``cross_entropy(logits_BxTxV, targets_BxT)``: the logits exist whole, in float32 (B x T x V x 4
bytes, the largest buffer of a small model's step with a large vocabulary).

``chunked_cross_entropy(x_BxTxD, w_DxV, targets_BxT)`` (``model.loss_chunk`` = C positions): the
unembedding matmul and the loss run under ``jax.checkpoint`` inside a ``lax.scan`` over T / C blocks
of C positions, so the forward keeps one block's ``[B, C, V]`` logits at a time and the backward
recomputes each block's logits from its ``[B, C, D]`` input instead of saving them: the same loss and
gradients, summed in another order. Block j holds positions ``j, j + T/C, ...`` (strided), a reshape
that leaves a sequence or batch split over devices where it is; the vocabulary stays split over
``tensor`` inside each block (each device reduces its slice, as below).

The head's weight enters the loop as S copies ``w_SxDxV``, one per batch shard (S = the devices the
plan splits ``batch`` over), and each shard's rows ``[S, B / S, ...]`` multiply their own copy: the
weight's gradient then accumulates per shard inside the loop, with no communication there, and is
summed over the shards once, after it (a plain ``[D, V]`` weight would have its gradient all-reduced
at every block).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.core.errors import ConfigError
from jaxllm.model import attention

Array = jax.Array


def token_nll(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """``-log softmax(logits)[target]`` per token, in float32, ``[B, T]``."""
    logits = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot product rather than a gather: with the vocabulary sharded over `tensor` each device
    # reduces its own slice and the full logits are never gathered.
    onehot_BxTxV = jax.nn.one_hot(targets_BxT, logits.shape[-1], dtype=logits.dtype)
    return logz_BxT - jnp.sum(logits * onehot_BxTxV, axis=-1)


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array | None = None) -> tuple[Array, Array]:
    """Mean next-token cross-entropy in nats over weighted tokens, computed in float32.

    Returns ``(mean_loss, token_count)``; ``weights`` masks padding or prompt tokens.
    """
    nll_BxT = token_nll(logits_BxTxV, targets_BxT)
    if weights_BxT is None:
        weights_BxT = jnp.ones_like(nll_BxT)
    count = jnp.sum(weights_BxT)
    return jnp.sum(nll_BxT * weights_BxT) / jnp.maximum(count, 1.0), count


def _strided_blocks(a_BxTxZ: Array, chunk: int, shards: int) -> Array:
    """``[B, T, ...] -> [T / chunk, S, B / S, chunk, ...]``; block j holds positions j, j + T / chunk, ..."""
    b, t = a_BxTxZ.shape[:2]
    split = a_BxTxZ.reshape(shards, b // shards, chunk, t // chunk, *a_BxTxZ.shape[2:])
    return jnp.moveaxis(split, 3, 0)


@functools.partial(jax.checkpoint, prevent_cse=False, static_argnums=(4,))
def _block_nll_sum(x_SxbxCxD: Array, w_SxDxV: Array, targets_SxbxC: Array, weights_SxbxC: Array, dtype: Any) -> Array:
    """One block's weighted negative log-likelihood sum; its logits are recomputed in the backward."""
    logits_SxbxCxV = jnp.einsum("sbcd,sdv->sbcv", x_SxbxCxD.astype(dtype), w_SxDxV.astype(dtype))
    logits_SxbxCxV = nn.with_logical_constraint(logits_SxbxCxV, ("batch", None, "q_seq", "vocab"))
    return jnp.sum(token_nll(logits_SxbxCxV, targets_SxbxC) * weights_SxbxC)


def chunked_cross_entropy(
    x_BxTxD: Array, w_DxV: Array, targets_BxT: Array, weights_BxT: Array | None, chunk: int, dtype: Any
) -> tuple[Array, Array]:
    """:func:`cross_entropy` of ``x @ w`` (the head's input and unembedding matrix; the logits in
    ``dtype``, the loss in float32), ``chunk`` positions at a time: ``(mean_loss, token_count)``."""
    b, t = x_BxTxD.shape[:2]
    if t % chunk:
        raise ConfigError(f"model.loss_chunk={chunk} does not divide the {t} positions of the batch")
    if weights_BxT is None:
        weights_BxT = jnp.ones(targets_BxT.shape, jnp.float32)
    shards = attention.logical_shards("batch")
    shards = shards if b % shards == 0 else 1
    w_SxDxV = nn.with_logical_constraint(jnp.broadcast_to(w_DxV, (shards, *w_DxV.shape)), ("batch", None, "vocab"))

    def body(total, block):
        x_SxbxCxD, t_SxbxC, m_SxbxC = block
        return total + _block_nll_sum(x_SxbxCxD, w_SxDxV, t_SxbxC, m_SxbxC, dtype), None

    blocks = tuple(_strided_blocks(a, chunk, shards) for a in (x_BxTxD, targets_BxT, weights_BxT))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), blocks)
    count = jnp.sum(weights_BxT)
    return total / jnp.maximum(count, 1.0), count
