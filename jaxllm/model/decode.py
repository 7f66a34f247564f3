"""Generating text: prefill the prompt into a key/value cache, then decode one token per step.

    prefill:  one forward pass over the (right-padded) prompts ``[B, T]``; every layer writes the keys and
              values of positions 0..T-1 into its cache ``[L, B, S, K, H]`` (S cache slots:
              the longest prompt plus the new tokens, rounded up to 64, at most max_seq_len).
    decode:   a jitted ``lax.while_loop``; each step feeds one token per row at that row's own
              position, appends its keys/values, attends to the cache up to that position, samples.

Each row keeps its true positions (a prompt of length n decodes at n, n+1, ...), so a batch of
prompts of different lengths gives every row exactly what it would get alone. The pad slots a
shorter prompt leaves in the cache are overwritten before any query can see them: a query at
position p sees slots <= p only, and slot p is written in the same call. A step costs O(params +
S) instead of the O(params x S) of rerunning the whole sequence, which is what
:func:`generate_tokens` (the reference, also the trainer's eval sample) does.

Sampling: temperature 0 is greedy; otherwise logits / temperature, cut to the top-k and to the
smallest top-p nucleus. A row stops at its end-of-sequence token, or where an optional host
function ``stop_fn(tokens_BxU, n) -> done_B`` (stop strings, which only the text shows) says so, asked
every :data:`STOP_EVERY` steps; the loop stops when all rows have.
The command line over a run directory is :mod:`jaxllm.infer.generate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import EvalConfig, ModelConfig
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.model.transformer import Transformer, compute_dtype

STOP_EVERY = 4  # steps between asks of a stop_fn: a host round trip each, at most this many steps wasted


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


EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")


def eos_id(tokenizer) -> int | None:
    """The tokenizer's end-of-sequence id: the ``eos_token`` its ``tokenizer_config.json`` names, else
    the first of :data:`EOS_NAMES` it reads as one token (byte and char tokenizers have none unless
    one was added as a special token)."""
    named = tokenizer.role_id("eos_token") if "eos_token" in tokenizer.roles else None  # only HF tokenizers name it
    if named is not None:
        return named
    for name in EOS_NAMES:
        try:
            ids = tokenizer.encode(name)
        except UserError:  # a char tokenizer whose alphabet lacks the name's characters
            continue
        if len(ids) == 1 and tokenizer.decode(ids) == name:
            return ids[0]
    return None


def check_request(prompt_lengths: list[int], max_new_tokens: int, max_seq_len: int) -> None:
    """Refuses empty prompts and requests that do not fit the model's context."""
    if not prompt_lengths or min(prompt_lengths) == 0:
        raise ConfigError("a prompt is empty; give at least one token")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if max(prompt_lengths) + max_new_tokens > max_seq_len:
        raise ConfigError(
            f"prompt ({max(prompt_lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {max_seq_len} tokens"
        )


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Refuses settings that have no meaning (and would otherwise sample garbage silently)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = all tokens), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1] (1 = all tokens), got {top_p}")


def check_tokens(tokens: np.ndarray, vocab_size: int, max_len: int) -> None:
    """Refuses token ids outside ``[0, vocab_size)`` (a lookup there reads no row: NaN or garbage, not
    an error) and rows longer than ``max_len`` positions."""
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"token ids must be integers, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise ConfigError(f"token id {int(bad)} is outside the model's vocabulary [0, {vocab_size})")
    if tokens.ndim and tokens.shape[-1] > max_len:
        raise ConfigError(f"{tokens.shape[-1]} tokens exceed the model's context of {max_len}")


def check_sample_prompt(tokenizer, sample: EvalConfig) -> None:
    """Refuses, before a run writes anything, an ``eval.sample_prompt`` the tokenizer cannot encode (or
    encodes to no token): it would otherwise fail at the first evaluation, losing the steps since a save."""
    if not (sample.sample_tokens and sample.sample_prompt):
        return
    try:
        ids = tokenizer.encode(sample.sample_prompt)
    except UserError as e:
        raise ConfigError(f"eval.sample_prompt={sample.sample_prompt!r} cannot be encoded: {e}") from None
    if not ids:
        raise ConfigError(f"eval.sample_prompt={sample.sample_prompt!r} encodes to no token")


# --------------------------------------------------------------------------- with the cache


def cache_slots(cfg: ModelConfig, width: int, n_new: int) -> int:
    """Cache positions a decode of ``n_new`` tokens after prompts padded to ``width`` can write, rounded
    up to 64 (fewer distinct programs) and capped at the context: attention reads every slot, so a
    short generation from a long-context model should not pay for all ``max_seq_len`` of them."""
    return min(cfg.max_seq_len, -(-(width + n_new) // 64) * 64)


def init_cache(cfg: ModelConfig, batch: int, slots: int | None = None) -> dict:
    """Zero keys and values ``[L, B, S, K, H]`` (S = ``slots``, default the whole context) in the compute
    dtype, laid out as the model's ``cache`` collection (mirrors ``params['blocks']['attn']``; the
    scan adds the layers axis). With ``model.moe.every`` = k > 1 the scan runs groups of k blocks:
    ``[L / k, ...]`` per block of a group."""
    S = cfg.max_seq_len if slots is None else slots
    k = cfg.moe.every if cfg.moe.n_experts else 1
    shape = (cfg.n_layer // k, batch, S, cfg.n_kv_head, cfg.d_model // cfg.n_head)
    zeros = jnp.zeros(shape, compute_dtype(cfg))
    attn = {"attn": {"key": zeros, "value": zeros}}
    return {"blocks": attn if k == 1 else {f"block{i}": attn for i in range(k)}}


def host_stop(stop_fn: Callable | None, tokens_BxU: jax.Array, n: int, done_B: jax.Array) -> jax.Array:
    """Rows ``stop_fn(tokens_BxU, n)`` ends on the host (``[B]`` bool), asked after every
    :data:`STOP_EVERY`-th of the ``n`` tokens so far while some row runs; all False without a ``stop_fn``."""
    B = done_B.shape[0]
    if stop_fn is None:
        return jnp.zeros((B,), jnp.bool_)
    asked = partial(jax.pure_callback, stop_fn, jax.ShapeDtypeStruct((B,), jnp.bool_), tokens_BxU, n)
    return jax.lax.cond((n % STOP_EVERY == 0) & ~jnp.all(done_B), asked, partial(jnp.zeros, (B,), jnp.bool_))


def _decode(
    model: Transformer,
    params: Any,
    prompt_BxT: jax.Array,
    lengths_B: jax.Array,
    rng: jax.Array,
    *,
    n_new: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: tuple[int, ...],
    with_logits: bool,
    on_token: Callable | None,
    stop_fn: Callable | None = None,
):
    """Prefill + decode loop. Returns ``(tokens_BxU, logits_BxUxV or None)``: the U = n_new tokens
    (``eos_ids[0]`` after a row's end, which any of ``eos_ids`` marks, or ``stop_fn`` on the host) and,
    if asked, the float32 logits each was chosen from."""
    B, T = prompt_BxT.shape

    def forward(cache, tokens_BxT, positions_BxT):
        logits_BxTxV, updated = model.apply(
            {"params": params, "cache": cache}, tokens_BxT, positions_BxT, mutable=["cache"]
        )
        return logits_BxTxV.astype(jnp.float32), updated["cache"]

    def choose(i, logits_BxV, rng, done_B, tokens_BxU, logits_BxUxV):
        tok_B = jnp.where(done_B, eos_ids[0], next_token(logits_BxV, rng, temperature, top_k, top_p))
        if on_token is not None:
            jax.debug.callback(on_token, i, tok_B, ordered=True)
        tokens_BxU = tokens_BxU.at[:, i].set(tok_B)
        if with_logits:
            logits_BxUxV = logits_BxUxV.at[:, i].set(logits_BxV)
        done_B = done_B | jnp.isin(tok_B, jnp.asarray(eos_ids))
        return tok_B, done_B, tokens_BxU, logits_BxUxV

    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits_BxTxV, cache = forward(init_cache(model.cfg, B, cache_slots(model.cfg, T, n_new)), prompt_BxT, positions_BxT)
    last_BxV = logits_BxTxV[jnp.arange(B), lengths_B - 1]
    tokens_BxU = jnp.full((B, n_new), eos_ids[0], jnp.int32)
    logits_BxUxV = jnp.zeros((B, n_new, last_BxV.shape[-1]), jnp.float32) if with_logits else None
    rng, sub = jax.random.split(rng)
    tok_B, done_B, tokens_BxU, logits_BxUxV = choose(0, last_BxV, sub, jnp.zeros((B,), bool), tokens_BxU, logits_BxUxV)

    def cond(carry):
        i, _, done_B, *_ = carry
        return (i < n_new) & ~jnp.all(done_B)

    def body(carry):
        i, tok_B, done_B, cache, rng, tokens_BxU, logits_BxUxV = carry
        logits_Bx1xV, cache = forward(cache, tok_B[:, None], (lengths_B + i - 1)[:, None])
        rng, sub = jax.random.split(rng)
        tok_B, done_B, tokens_BxU, logits_BxUxV = choose(i, logits_Bx1xV[:, 0], sub, done_B, tokens_BxU, logits_BxUxV)
        done_B = done_B | host_stop(stop_fn, tokens_BxU, i + 1, done_B)
        return i + 1, tok_B, done_B, cache, rng, tokens_BxU, logits_BxUxV

    carry = (jnp.int32(1), tok_B, done_B, cache, rng, tokens_BxU, logits_BxUxV)
    *_, tokens_BxU, logits_BxUxV = jax.lax.while_loop(cond, body, carry)
    return tokens_BxU, logits_BxUxV


class Decoder:
    """Cached decoding for one model shape; compiled programs are kept per shape and sampling setting.

    ``Decoder(model_cfg)(params, prompts, max_new_tokens, ...)`` -> the new tokens of each prompt.
    """

    def __init__(self, cfg: ModelConfig):
        # Recomputing activations only matters for gradients; dropout is off at inference.
        self.cfg = dataclasses.replace(cfg, remat="none")
        self._run = jax.jit(
            partial(_decode, Transformer(self.cfg, deterministic=True)),
            static_argnames=("n_new", "temperature", "top_k", "top_p", "eos_ids", "with_logits", "on_token", "stop_fn"),
        )

    def run(
        self,
        params: Any,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_ids: Sequence[int] = (),
        seed: int = 0,
        with_logits: bool = False,
        on_token: Callable[[Any, Any], None] | None = None,
        stop_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The raw ``(tokens_BxU, logits_BxUxV or None)`` of :func:`_decode` for a batch of prompts.

        A row ends at the first of ``eos_ids`` it chooses; none never stops early.
        ``on_token(i, tokens_B)`` is called from inside the loop as each step's tokens are chosen
        (for streaming). ``stop_fn(tokens_BxU, n)`` -> bool ``[B]``, the rows to end after their
        first n tokens, is asked on the host every :data:`STOP_EVERY` steps
        (hashable and stable, like ``on_token``: it is part of the compiled program's key)."""
        lengths = [len(p) for p in prompts]
        check_request(lengths, max_new_tokens, self.cfg.max_seq_len)
        check_sampling(temperature, top_k, top_p)
        for p in prompts:
            check_tokens(np.asarray(p), self.cfg.vocab_size, self.cfg.max_seq_len)
        # Round the padded width up so that prompts of similar lengths share one compiled program.
        width = min(-(-max(lengths) // 16) * 16, self.cfg.max_seq_len)
        buf = np.zeros((len(prompts), width), np.int32)
        for row, p in enumerate(prompts):
            buf[row, : len(p)] = p
        return self._run(
            params,
            jnp.asarray(buf),
            jnp.asarray(lengths, jnp.int32),
            jax.random.PRNGKey(seed),
            n_new=int(max_new_tokens),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            eos_ids=tuple(int(i) for i in eos_ids) or (-1,),  # -1: never chosen
            with_logits=with_logits,
            on_token=on_token,
            stop_fn=stop_fn,
        )

    def __call__(self, params: Any, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        """The new tokens of each prompt, cut before its first end-of-sequence token (``eos_ids``; -1, the
        fill after a row that ``stop_fn`` ended, when there are none)."""
        tokens_BxU, _ = self.run(params, prompts, max_new_tokens, **sampling)
        ends = set(sampling.get("eos_ids", ())) or {-1}
        rows = np.asarray(tokens_BxU).tolist()
        return [row[: next((i for i, t in enumerate(row) if t in ends), len(row))] for row in rows]


# --------------------------------------------------------------------------- without the cache


@partial(jax.jit, static_argnames=("apply_fn", "n_new", "temperature", "top_k", "top_p"))
def decode_full_forward(params, buf_BxS, start, rng, *, apply_fn, n_new, temperature, top_k, top_p):
    """Writes n_new tokens into every row of buf_BxS from position start on, each by rerunning
    ``apply_fn(params, buf) -> logits`` over the whole buffer (no cache: O(params x S) per token)."""

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
    """The ``max_new_tokens`` ids after ``prompt`` by full forward passes (``apply_fn(params,
    tokens_BxS) -> logits``) over a fixed buffer of ``max_seq_len``: one compiled program serves every
    prompt length, and it runs under any mesh the params live on (the trainer's eval sample)."""
    check_request([len(prompt)], max_new_tokens, max_seq_len)
    check_sampling(temperature, top_k, top_p)
    buf = np.zeros((1, max_seq_len), np.int32)
    buf[0, : len(prompt)] = prompt
    out = decode_full_forward(
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
