"""A corpus with a known entropy rate: text sampled from a random Markov chain over a small alphabet.

The best possible next-token loss on it is the chain's entropy rate, sum_s pi(s) entropy(P(. | s))
(nats per token, with pi the stationary distribution over contexts and P the transition matrix), so
a scaling-law fit of L = E + A/N^alpha + B/D^beta on such a corpus should find E close to that rate.
With the byte tokenizer one character is one token, so the rate is also the entropy per token.

Spec: ``synthetic:markov:vocab=16,order=2,concentration=0.3,tokens=2000000,seed=0``; every field is
optional. ``concentration`` is the Dirichlet parameter of each row: small values give peaked rows
(low entropy), large values near-uniform ones (an entropy rate near log(vocab)).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from jaxllm.core.errors import ConfigError

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + "+/"


@dataclass(frozen=True)
class MarkovSpec:
    vocab: int = 16
    order: int = 1
    concentration: float = 0.3
    tokens: int = 2_000_000
    seed: int = 0


def parse(source: str) -> MarkovSpec:
    """Parses ``synthetic:markov:k=v,...`` into a :class:`MarkovSpec`, checking every field."""
    parts = source.split(":", 2)
    if len(parts) < 2 or parts[1] != "markov":
        raise ConfigError(f"data.source={source!r}: the only synthetic source is synthetic:markov:key=value,...")
    fields = {}
    for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
        key, _, value = item.partition("=")
        if key not in MarkovSpec.__dataclass_fields__:
            raise ConfigError(
                f"synthetic:markov has no field {key!r}; fields: vocab, order, concentration, tokens, seed"
            )
        try:
            fields[key] = float(value) if key == "concentration" else int(value)
        except ValueError:
            raise ConfigError(f"synthetic:markov field {key}={value!r} is not a number") from None
    spec = MarkovSpec(**fields)
    if not 2 <= spec.vocab <= len(ALPHABET):
        raise ConfigError(f"synthetic:markov vocab must be in [2, {len(ALPHABET)}], got {spec.vocab}")
    if not 1 <= spec.order <= 4 or spec.vocab**spec.order > 1_000_000:
        raise ConfigError("synthetic:markov order must be in [1, 4] with vocab**order <= 1e6")
    if spec.concentration <= 0 or spec.tokens < 1000:
        raise ConfigError("synthetic:markov needs concentration > 0 and tokens >= 1000")
    return spec


def transition_matrix(spec: MarkovSpec) -> np.ndarray:
    """P[context, next]: one Dirichlet(concentration) row per context of ``order`` symbols."""
    rng = np.random.default_rng(spec.seed)
    return rng.dirichlet(np.full(spec.vocab, spec.concentration), size=spec.vocab**spec.order)


def stationary(P_CxV: np.ndarray, vocab: int) -> np.ndarray:
    """Stationary distribution over contexts, by power iteration on the context chain."""
    n_ctx = P_CxV.shape[0]
    next_ctx_CxV = (np.arange(n_ctx)[:, None] * vocab) % n_ctx + np.arange(vocab)[None, :]
    pi = np.full(n_ctx, 1.0 / n_ctx)
    for _ in range(10_000):
        new = np.bincount(next_ctx_CxV.ravel(), weights=(pi[:, None] * P_CxV).ravel(), minlength=n_ctx)
        if np.abs(new - pi).sum() < 1e-13:
            break
        pi = new
    return new


def entropy_rate(spec: MarkovSpec) -> float:
    """The chain's entropy rate in nats per token: the irreducible loss of any model on it."""
    P = transition_matrix(spec)
    pi = stationary(P, spec.vocab)
    row_entropy = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0), axis=1)
    return float(pi @ row_entropy)


def sample_text(spec: MarkovSpec) -> str:
    """``spec.tokens`` characters sampled from the chain (deterministic in ``spec.seed``)."""
    P = transition_matrix(spec)
    cdf = np.cumsum(P, axis=1)
    rng = np.random.default_rng(spec.seed + 1)
    u = rng.random(spec.tokens)
    n_ctx = P.shape[0]
    out = np.empty(spec.tokens, dtype=np.int64)
    ctx = 0
    for i in range(spec.tokens):  # sequential by nature: one Python step per token
        sym = int(np.searchsorted(cdf[ctx], u[i], side="right"))
        sym = min(sym, spec.vocab - 1)
        out[i] = sym
        ctx = (ctx * spec.vocab) % n_ctx + sym
    return "".join(np.array(list(ALPHABET[: spec.vocab]))[out])
