"""Mixture-of-experts MLP (``model.moe.*``): the block's MLP replaced by E experts, each token sent to k.

    x_BxTxD -> tokens x_GxD -> router (float32) -> top-k experts and weights per token
            -> each expert's MLP (GELU for gpt2, SwiGLU for llama) on the tokens sent to it
            -> the k outputs of a token summed with its weights -> out_BxTxD

Two ways to run the experts. Dropless (``capacity_factor=0``, the default): the G*k assignments are
sorted by expert and multiplied with one grouped matmul (``jax.lax.ragged_dot``), so the FLOPs are
``k / E`` of running every expert on every token. Capacity: each expert takes at most
C = ceil(capacity_factor * G * k / E) assignments, first choices before second ones (GShard), into an
``[E, C, D]`` buffer multiplied with a batched matmul; assignments beyond C are dropped (the token
keeps its residual) and counted.

With top_k = 1 a token's output is scaled by its router probability (Switch), so the router learns
from the language-model loss; with top_k > 1 the k probabilities are renormalised to sum to 1
(Mixtral). One expert with top_k = 1 is therefore exactly the dense MLP.

Expert weights carry the logical name ``expert`` on their leading dimension; ``jaxllm.sharding`` maps
it to the ``expert`` mesh axis (expert parallelism) and XLA inserts the token exchange.

Each MoE layer sows into the ``moe`` collection (read with ``apply(..., mutable=["moe"])``): ``loss``
(the weighted load-balancing and z losses, added to the training loss by :func:`loss`), ``balance``
and ``z`` (unweighted), ``load`` (fraction of assignments per expert, ``[E]``) and ``dropped``
(fraction of assignments dropped; 0 when dropless). Shape letters: G tokens (B*T), E experts, K
choices per token, M = G*K assignments, C expert capacity, D d_model, F expert width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

Array = jax.Array
COLLECTION = "moe"
STATS = ("load", "dropped", "balance", "z")  # the sown statistics that training logs


def _init(std: float, axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def expert_width(cfg: ModelConfig) -> int:
    """F: the hidden width of one expert (``model.moe.d_ff``, 0 = ``model.d_ff``)."""
    return cfg.moe.d_ff or cfg.d_ff


def capacity(cfg: ModelConfig, n_tokens: int) -> int:
    """C: assignments one expert takes in the capacity path (0 = dropless)."""
    e = cfg.moe
    if not e.capacity_factor:
        return 0
    return max(1, math.ceil(e.capacity_factor * n_tokens * e.top_k / e.n_experts))


def route(logits_GxE: Array, top_k: int) -> tuple[Array, Array, Array]:
    """``(probs_GxE, weights_GxK, experts_GxK)``: softmax over experts, the k best and their weights."""
    probs_GxE = jax.nn.softmax(logits_GxE, axis=-1)
    weights_GxK, experts_GxK = jax.lax.top_k(probs_GxE, top_k)
    if top_k > 1:
        weights_GxK = weights_GxK / jnp.sum(weights_GxK, axis=-1, keepdims=True)
    return probs_GxE, weights_GxK, experts_GxK


def router_losses(logits_GxE: Array, probs_GxE: Array, experts_GxK: Array) -> dict[str, Array]:
    """``balance``: E * sum_e f_e p_e (Switch), f_e the fraction of assignments to expert e (no gradient),
    p_e its mean router probability; 1 when routing is even. ``z``: mean squared log-sum-exp of the
    logits (ST-MoE), keeping them small. ``load``: f, ``[E]``."""
    n_experts = probs_GxE.shape[-1]
    load_E = jnp.mean(jax.nn.one_hot(experts_GxK, n_experts, dtype=jnp.float32), axis=(0, 1))
    balance = n_experts * jnp.sum(jax.lax.stop_gradient(load_E) * jnp.mean(probs_GxE, axis=0))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxE, axis=-1)))
    return {"balance": balance, "z": z, "load": load_E}


def dropless(x_GxD: Array, weights_GxK: Array, experts_GxK: Array, ffn: Callable, n_experts: int) -> Array:
    """Assignments sorted by expert, one grouped matmul per projection, outputs summed back per token.

    ``ffn(x_MxD, group_sizes_E, expert_M) -> y_MxD`` runs the experts on rows grouped by expert."""
    G, K = experts_GxK.shape
    flat_M = experts_GxK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    group_sizes_E = jnp.sum(jax.nn.one_hot(flat_M, n_experts, dtype=jnp.int32), axis=0)
    y_MxD = ffn(x_GxD[order_M // K], group_sizes_E, flat_M[order_M])
    unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(G * K))
    y_GxKxD = y_MxD[unsort_M].reshape(G, K, -1)
    return jnp.einsum("gkd,gk->gd", y_GxKxD, weights_GxK.astype(y_GxKxD.dtype))


def with_capacity(
    x_GxD: Array, weights_GxK: Array, experts_GxK: Array, ffn: Callable, n_experts: int, cap: int
) -> tuple[Array, Array]:
    """``(out_GxD, dropped)``: each expert's first ``cap`` assignments, first choices of all tokens
    before second choices; the rest dropped. ``dropped``: the fraction of assignments dropped.

    ``ffn(x_ExCxD) -> y_ExCxD`` runs expert e on row e of the buffer."""
    G, K = experts_GxK.shape
    flat_M = experts_GxK.T.reshape(-1)  # choice-major: assignment m = k * G + g
    onehot_MxE = jax.nn.one_hot(flat_M, n_experts, dtype=jnp.int32)
    slot_M = jnp.sum((jnp.cumsum(onehot_MxE, axis=0) - 1) * onehot_MxE, axis=-1)
    keep_M = slot_M < cap
    token_M = jnp.arange(G * K) % G
    buffer_ExCxD = jnp.zeros((n_experts, cap, x_GxD.shape[-1]), x_GxD.dtype)
    buffer_ExCxD = buffer_ExCxD.at[flat_M, jnp.where(keep_M, slot_M, cap)].set(x_GxD[token_M], mode="drop")
    y_ExCxD = ffn(buffer_ExCxD)
    y_MxD = y_ExCxD[flat_M, jnp.minimum(slot_M, cap - 1)] * keep_M[:, None].astype(y_ExCxD.dtype)
    y_KxGxD = y_MxD.reshape(K, G, -1)
    out_GxD = jnp.einsum("kgd,gk->gd", y_KxGxD, weights_GxK.astype(y_KxGxD.dtype))
    return out_GxD, 1.0 - jnp.mean(keep_M.astype(jnp.float32))


class Experts(nn.Module):
    """E stacked ``[in, out]`` kernels (and biases): ``kernel[E, in, out]`` named ``(expert, *axes)``."""

    n_experts: int
    shape: tuple[int, int]
    axes: tuple[str, str]
    std: float
    use_bias: bool

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        kernel = self.param("kernel", _init(self.std, ("expert",) + self.axes), (self.n_experts,) + self.shape)
        if not self.use_bias:
            return kernel, None
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("expert", self.axes[1]))
        return kernel, self.param("bias", bias_init, (self.n_experts, self.shape[1]))


class ExpertFFN:
    """The experts' MLP over rows already grouped by expert, for either path (``grouped`` or batched)."""

    def __init__(self, weights: dict[str, tuple[Array, Array | None]], arch: str, dtype: Any):
        self.weights, self.arch, self.dtype = weights, arch, dtype

    def _mlp(self, x: Array, matmul: Callable, bias: Callable) -> Array:
        def proj(name: str, h: Array) -> Array:
            kernel, b = self.weights[name]
            y = matmul(h.astype(self.dtype), kernel.astype(self.dtype))
            return y if b is None else y + bias(b.astype(self.dtype))

        if self.arch == "gpt2":
            h = jax.nn.gelu(proj("up", x), approximate=True)
        else:
            h = jax.nn.silu(proj("gate", x)) * proj("up", x)
        return proj("down", h)

    def grouped(self, x_MxD: Array, group_sizes_E: Array, expert_M: Array) -> Array:
        return self._mlp(x_MxD, lambda h, w: jax.lax.ragged_dot(h, w, group_sizes_E), lambda b: b[expert_M])

    def batched(self, x_ExCxD: Array) -> Array:
        return self._mlp(x_ExCxD, lambda h, w: jnp.einsum("ecd,edf->ecf", h, w), lambda b: b[:, None, :])


class Router(nn.Module):
    """``x_GxD -> logits_GxE`` in float32 whatever the compute dtype: top-k and the losses are sensitive to
    rounding, and the router is a sliver of the FLOPs."""

    n_experts: int

    @nn.compact
    def __call__(self, x_GxD: Array) -> Array:
        kernel_DxE = self.param("kernel", _init(0.02, ("embed", None)), (x_GxD.shape[-1], self.n_experts))
        return x_GxD.astype(jnp.float32) @ kernel_DxE.astype(jnp.float32)


class MoEMLP(nn.Module):
    """``x_BxTxD -> out_BxTxD``, a drop-in for ``model.MLP``; ``down_std``: init std of the output kernels."""

    cfg: ModelConfig
    down_std: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c, e = self.cfg, self.cfg.moe
        D, F, bias = c.d_model, expert_width(c), c.arch == "gpt2"
        x_GxD = x_BxTxD.reshape(-1, D)
        logits_GxE = Router(e.n_experts, name="router")(x_GxD)
        probs_GxE, weights_GxK, experts_GxK = route(logits_GxE, e.top_k)
        weights = {
            "up": Experts(e.n_experts, (D, F), ("embed", "mlp"), 0.02, bias, name="up")(),
            "down": Experts(e.n_experts, (F, D), ("mlp", "embed"), self.down_std, bias, name="down")(),
        }
        if c.arch == "llama":
            weights["gate"] = Experts(e.n_experts, (D, F), ("embed", "mlp"), 0.02, False, name="gate")()
        ffn = ExpertFFN(weights, c.arch, jnp.dtype(c.dtype))
        cap = capacity(c, x_GxD.shape[0])
        if cap:
            out_GxD, dropped = with_capacity(x_GxD, weights_GxK, experts_GxK, ffn.batched, e.n_experts, cap)
        else:
            out_GxD, dropped = dropless(x_GxD, weights_GxK, experts_GxK, ffn.grouped, e.n_experts), jnp.zeros((), jnp.float32)
        stats = router_losses(logits_GxE, probs_GxE, experts_GxK)
        self.sow(COLLECTION, "loss", e.aux_loss * stats["balance"] + e.router_z_loss * stats["z"])
        for name in ("balance", "z", "load"):
            self.sow(COLLECTION, name, stats[name])
        self.sow(COLLECTION, "dropped", dropped)
        out_BxTxD = out_GxD.reshape(x_BxTxD.shape).astype(jnp.dtype(c.dtype))
        return nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)


def loss(collections: dict) -> Array:
    """The weighted router losses of every MoE layer, summed (0 for a dense model)."""
    sown = collections.get(COLLECTION, {})
    leaves = jax.tree_util.tree_leaves_with_path(sown)
    return sum((jnp.sum(v) for p, v in leaves if getattr(p[-2], "key", None) == "loss"), jnp.zeros((), jnp.float32))


def telemetry(collections: dict) -> dict[str, Array]:
    """The sown statistics of every MoE layer, in layer order: ``moe_load`` ``[L_moe, E]``, ``moe_dropped``,
    ``moe_balance`` and ``moe_z`` ``[L_moe]`` (unweighted); empty for a dense model."""
    by_name: dict[str, list[Array]] = {}
    for path, v in jax.tree_util.tree_leaves_with_path(collections.get(COLLECTION, {})):
        name = getattr(path[-2], "key", None)
        if name in STATS:  # scanned layers sow with a leading layers axis (groups of ``every`` blocks)
            by_name.setdefault(name, []).append(v.reshape((-1, v.shape[-1]) if name == "load" else (-1,)))
    return {f"moe_{name}": jnp.concatenate(parts).astype(jnp.float32) for name, parts in by_name.items()}
