"""Mixture-of-experts MLP (``model.moe.*``): the block's MLP replaced by E experts, each token sent to k.

    x_BxTxD -> tokens x_GxD -> router (float32) -> top-k experts and weights per token
            -> each expert's MLP (GELU for gpt2, SwiGLU for llama) on the tokens sent to it
            -> the k outputs of a token summed with its weights -> out_BxTxD

Two ways to run the experts. Dropless (``capacity_factor=0``, the default): the G*k assignments are
sorted by expert and multiplied with one grouped matmul (``jax.lax.ragged_dot``), so the FLOPs are
``k / E`` of running every expert on every token. Capacity: each expert takes at most
C = ceil(capacity_factor * G * k / E) assignments, first choices before second ones (GShard), into an
``[E, C, D]`` buffer multiplied with a batched matmul; assignments beyond C are dropped (the token
keeps its residual) and counted. G: the whole batch's tokens, or one device's when the experts are
split over devices (each fills its own capacity: ``moe_dispatch.layout``). ``shared_experts`` = S adds
one dense MLP of width S*F that every token goes through, unweighted (DeepSeekMoE's shared experts), to
the routed experts' output.

With top_k = 1 a token's output is scaled by its router probability (Switch), so the router learns
from the language-model loss; with top_k > 1 the k probabilities are renormalised to sum to 1
(Mixtral). One expert with top_k = 1 is therefore exactly the dense MLP.

Expert weights carry the logical name ``expert`` on their leading dimension; ``jaxllm.parallel.sharding`` maps
it to the ``expert`` mesh axis. Under a mesh, :mod:`jaxllm.model.moe_dispatch` runs the routing and the
experts per device (``shard_map``): each device routes its own tokens and, when the experts are split,
exchanges assignments with the devices holding their experts by ``all_to_all`` (expert parallelism).

Each MoE layer sows into the ``moe`` collection (read with ``apply(..., mutable=["moe"])``): ``loss``
(the weighted load-balancing and z losses, added to the training loss by :func:`loss`), ``balance``
and ``z`` (unweighted), ``load`` (fraction of assignments per expert, ``[E]``) and ``dropped``
(fraction of assignments dropped; 0 when dropless). Shape letters: G tokens (B*T), E experts, k
choices per token, Gk = G*k assignments, C expert capacity, D d_model, F expert width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.core.config import ModelConfig
from jaxllm.model import moe_dispatch

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
    """``(probs_GxE, weights_Gxk, experts_Gxk)``: softmax over experts, the k best and their weights."""
    probs_GxE = jax.nn.softmax(logits_GxE, axis=-1)
    weights_Gxk, experts_Gxk = jax.lax.top_k(probs_GxE, top_k)
    if top_k > 1:
        weights_Gxk = weights_Gxk / jnp.sum(weights_Gxk, axis=-1, keepdims=True)
    return probs_GxE, weights_Gxk, experts_Gxk


def router_losses(logits_GxE: Array, probs_GxE: Array, experts_Gxk: Array) -> dict[str, Array]:
    """``balance``: E * sum_e f_e p_e (Switch), f_e the fraction of assignments to expert e (no gradient),
    p_e its mean router probability; 1 when routing is even. ``z``: mean squared log-sum-exp of the
    logits (ST-MoE), keeping them small. ``load``: f, ``[E]``."""
    n_experts = probs_GxE.shape[-1]
    load_E = jnp.mean(jax.nn.one_hot(experts_Gxk, n_experts, dtype=jnp.float32), axis=(0, 1))
    balance = n_experts * jnp.sum(jax.lax.stop_gradient(load_E) * jnp.mean(probs_GxE, axis=0))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxE, axis=-1)))
    return {"balance": balance, "z": z, "load": load_E}


def dropless(x_GxD: Array, weights_Gxk: Array, experts_Gxk: Array, ffn: Callable, n_experts: int) -> Array:
    """Assignments sorted by expert, one grouped matmul per projection, outputs summed back per token.

    ``ffn(x_GkxD, group_sizes_E, expert_Gk) -> y_GkxD`` runs the experts on rows grouped by expert."""
    G, k = experts_Gxk.shape
    flat_Gk = experts_Gxk.reshape(-1)
    order_Gk = jnp.argsort(flat_Gk, stable=True)
    group_sizes_E = jnp.sum(jax.nn.one_hot(flat_Gk, n_experts, dtype=jnp.int32), axis=0)
    y_GkxD = ffn(x_GxD[order_Gk // k], group_sizes_E, flat_Gk[order_Gk])
    unsort_Gk = jnp.zeros_like(order_Gk).at[order_Gk].set(jnp.arange(G * k))
    y_GxkxD = y_GkxD[unsort_Gk].reshape(G, k, -1)
    return jnp.einsum("gkd,gk->gd", y_GxkxD, weights_Gxk.astype(y_GxkxD.dtype))


def with_capacity(
    x_GxD: Array, weights_Gxk: Array, experts_Gxk: Array, ffn: Callable, n_experts: int, cap: int
) -> tuple[Array, Array]:
    """``(out_GxD, dropped)``: each expert's first ``cap`` assignments, first choices of all tokens
    before second choices; the rest dropped. ``dropped``: the fraction of assignments dropped.

    ``ffn(x_ExCxD) -> y_ExCxD`` runs expert e on row e of the buffer."""
    G, k = experts_Gxk.shape
    flat_Gk = experts_Gxk.T.reshape(-1)  # choice-major: choice c of token g is assignment c * G + g
    onehot_GkxE = jax.nn.one_hot(flat_Gk, n_experts, dtype=jnp.int32)
    slot_Gk = jnp.sum((jnp.cumsum(onehot_GkxE, axis=0) - 1) * onehot_GkxE, axis=-1)
    keep_Gk = slot_Gk < cap
    token_Gk = jnp.arange(G * k) % G
    buffer_ExCxD = jnp.zeros((n_experts, cap, x_GxD.shape[-1]), x_GxD.dtype)
    buffer_ExCxD = buffer_ExCxD.at[flat_Gk, jnp.where(keep_Gk, slot_Gk, cap)].set(x_GxD[token_Gk], mode="drop")
    y_ExCxD = ffn(buffer_ExCxD)
    y_GkxD = y_ExCxD[flat_Gk, jnp.minimum(slot_Gk, cap - 1)] * keep_Gk[:, None].astype(y_ExCxD.dtype)
    y_kxGxD = y_GkxD.reshape(k, G, -1)
    out_GxD = jnp.einsum("kgd,gk->gd", y_kxGxD, weights_Gxk.astype(y_kxGxD.dtype))
    return out_GxD, 1.0 - jnp.mean(keep_Gk.astype(jnp.float32))


def run_experts(
    cfg: ModelConfig,
    per_token: tuple[Array, Array],
    weights: dict[str, tuple[Array, Array | None]],
    exchange: moe_dispatch.Exchange,
) -> tuple[tuple[Array, Array, Array], Array]:
    """``((out_GxD, probs_GxE, experts_Gxk), dropped)``: the G tokens at hand (``(x_GxD, logits_GxE)``)
    routed and run through the experts, dropless or with a capacity for these G. ``weights``: the experts
    at hand; ``exchange`` sends rows to the other experts' devices and back."""
    x_GxD, logits_GxE = per_token
    probs_GxE, weights_Gxk, experts_Gxk = route(logits_GxE, cfg.moe.top_k)
    ffn = ExpertFFN(weights, cfg.arch, jnp.dtype(cfg.dtype))
    cap = capacity(cfg, x_GxD.shape[0])
    if cap:
        out_GxD, dropped = with_capacity(
            x_GxD, weights_Gxk, experts_Gxk, exchange.batched(ffn.batched), cfg.moe.n_experts, cap
        )
    else:
        out_GxD = dropless(x_GxD, weights_Gxk, experts_Gxk, exchange.grouped(ffn.grouped), cfg.moe.n_experts)
        dropped = jnp.zeros((), jnp.float32)
    return (out_GxD, probs_GxE, experts_Gxk), dropped


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

    def grouped(self, x_GkxD: Array, group_sizes_E: Array, expert_Gk: Array) -> Array:
        return self._mlp(x_GkxD, lambda h, w: jax.lax.ragged_dot(h, w, group_sizes_E), lambda b: b[expert_Gk])

    def batched(self, x_ExCxD: Array) -> Array:
        return self._mlp(x_ExCxD, lambda h, w: jnp.einsum("ecd,edf->ecf", h, w), lambda b: b[:, None, :])

    def dense(self, x_GxD: Array) -> Array:
        return self._mlp(x_GxD, jnp.matmul, lambda b: b)


class SharedExperts(nn.Module):
    """``x_...xD -> y_...xD``: the shared experts, one dense MLP of width S*F that every token goes through
    (DeepSeekMoE), its kernels named like a dense MLP's (no ``expert`` dimension)."""

    cfg: ModelConfig
    down_std: float

    @nn.compact
    def __call__(self, x_GxD: Array) -> Array:
        c = self.cfg
        D, SF, bias = c.d_model, c.moe.shared_experts * expert_width(c), c.arch == "gpt2"

        def weight(name: str, shape: tuple[int, int], axes: tuple[str, str], std: float, use_bias: bool):
            kernel = self.param(f"{name}_kernel", _init(std, axes), shape)
            if not use_bias:
                return kernel, None
            return kernel, self.param(
                f"{name}_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]), shape[1:]
            )

        weights = {
            "up": weight("up", (D, SF), ("embed", "mlp"), 0.02, bias),
            "down": weight("down", (SF, D), ("mlp", "embed"), self.down_std, bias),
        }
        if c.arch == "llama":
            weights["gate"] = weight("gate", (D, SF), ("embed", "mlp"), 0.02, False)
        return ExpertFFN(weights, c.arch, jnp.dtype(c.dtype)).dense(x_GxD)


class Router(nn.Module):
    """``x_...xD -> logits_...xE`` in float32 whatever the compute dtype: top-k and the losses are sensitive to
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
        logits_BxTxE = Router(e.n_experts, name="router")(x_BxTxD)
        weights = {
            "up": Experts(e.n_experts, (D, F), ("embed", "mlp"), 0.02, bias, name="up")(),
            "down": Experts(e.n_experts, (F, D), ("mlp", "embed"), self.down_std, bias, name="down")(),
        }
        if c.arch == "llama":
            weights["gate"] = Experts(e.n_experts, (D, F), ("embed", "mlp"), 0.02, False, name="gate")()
        lay = moe_dispatch.layout(x_BxTxD.shape[0], e.n_experts, dropless=not e.capacity_factor)
        (out_BxTxD, probs_BxTxE, experts_BxTxk), dropped = moe_dispatch.dispatch(
            functools.partial(run_experts, c), lay, (x_BxTxD, logits_BxTxE), weights
        )
        if e.shared_experts:
            out_BxTxD = out_BxTxD + SharedExperts(c, self.down_std, name="shared")(x_BxTxD)
        stats = router_losses(
            logits_BxTxE.reshape(-1, e.n_experts),
            probs_BxTxE.reshape(-1, e.n_experts),
            experts_BxTxk.reshape(-1, e.top_k),
        )
        self.sow(COLLECTION, "loss", e.aux_loss * stats["balance"] + e.router_z_loss * stats["z"])
        for name in ("balance", "z", "load"):
            self.sow(COLLECTION, name, stats[name])
        self.sow(COLLECTION, "dropped", dropped)
        out_BxTxD = out_BxTxD.astype(jnp.dtype(c.dtype))
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
