"""The decoder-only transformer, in two flavours, as a pure Flax linen module.

    tokens_BxT -> embed (+ learned positions, gpt2) -> L x Block -> final norm -> logits_BxTxV
    Block (pre-LN):  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    Block (post-LN): x = norm1(x + attn(x));  x = norm2(x + mlp(x))
    no residual:     the "x +" terms are dropped (the ablation of the course's first lesson).

gpt2: LayerNorm, GELU MLP, learned positions, biases. llama: RMSNorm, SwiGLU, RoPE, grouped-query
attention (n_kv_head < n_head), no biases. Init as GPT-2: normal(0.02) everywhere, the two output
projections that write into the residual stream scaled by 1/sqrt(2 n_layer) so the stream's variance
does not grow with depth.

The blocks are one ``nn.scan``: every block parameter has a leading ``layers`` axis, so pipeline
stages can slice the stack and compile time does not grow with depth. Every parameter and the key
activations carry logical axis names (batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
layers); the model knows nothing of meshes, ``jaxllm.parallel.sharding`` maps the names to mesh axes.
Attention itself is ``jaxllm.model.attention`` (``model.attention``: xla, chunked, cudnn, splash, auto).
When the plan splits the sequence (context parallelism: ``q_seq`` mapped to a mesh axis), the blocks
run it in zig-zag order and the head gets it back in order; a token keeps its position throughout.
Shape letters: B batch, T query positions, S key positions, D d_model, N query heads, K key/value
heads, H head size, F MLP width, V vocabulary, L layers.

Inference hooks, both inert in training: given a ``cache`` collection (``apply(..., mutable=["cache"])``,
built by ``jaxllm.model.decode``), attention writes this call's keys/values at ``positions`` and attends to
every cached slot up to each query's position; a ``Linear`` whose stored kernel is a
``QuantizedKernel`` (``jaxllm.model.quantize``) multiplies by its integers instead.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import ModelConfig
from jaxllm.model import attention, moe, remat
from jaxllm.model.linear import Linear
from jaxllm.model.loss import chunked_cross_entropy, cross_entropy

Array = jax.Array
constrain = nn.with_logical_constraint


def _init(std: float, axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def compute_dtype(cfg: ModelConfig) -> Any:
    return jnp.dtype(cfg.dtype)


def fp8(cfg: ModelConfig) -> bool:
    """Whether the blocks' projections multiply in float8 (``model.matmul_dtype``, jaxllm.model.fp8)."""
    return cfg.matmul_dtype == "fp8"


def residual_std(cfg: ModelConfig) -> float:
    """Init std of projections that write into the residual stream (GPT-2's 1/sqrt(2L) scaling)."""
    return 0.02 / math.sqrt(2 * cfg.n_layer)


def rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float) -> Array:
    """Rotary position embedding, in the half-split layout of Hugging Face's LLaMA (for weight parity)."""
    half = x_BxTxNxH.shape[-1] // 2
    inv_freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxh = positions_BxT[..., None].astype(jnp.float32) * inv_freq_h
    sin, cos = jnp.sin(angle_BxTxh)[:, :, None, :], jnp.cos(angle_BxTxh)[:, :, None, :]
    x1, x2 = x_BxTxNxH[..., :half].astype(jnp.float32), x_BxTxNxH[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def write_cache(cache_BxSxKxH: Array, new_BxTxKxH: Array, positions_BxT: Array) -> Array:
    """The key (or value) cache with each row's new entries written at that row's own positions."""
    rows_Bx1 = jnp.arange(new_BxTxKxH.shape[0])[:, None]
    return cache_BxSxKxH.at[rows_Bx1, positions_BxT].set(new_BxTxKxH.astype(cache_BxSxKxH.dtype))


def norm(c: ModelConfig, name: str | None = None) -> nn.Module:
    """The model's LayerNorm (gpt2) or RMSNorm (llama) under ``name`` itself: its parameters are
    ``<name>/scale`` (and ``<name>/bias``), the names checkpoints and ``jaxllm.hf.layout`` use."""
    if c.arch == "gpt2":
        return nn.LayerNorm(
            epsilon=c.norm_eps,
            dtype=compute_dtype(c),
            scale_init=_ones(("embed",)),
            bias_init=_zeros(("embed",)),
            name=name,
        )
    return nn.RMSNorm(epsilon=c.norm_eps, dtype=compute_dtype(c), scale_init=_ones(("embed",)), name=name)


def linear_axes(model: nn.Module, params: Any) -> dict[tuple[str, ...], tuple[int, int]]:
    """``{path of a Linear module: (input axes, input + output axes) of its kernel}``, found by tracing
    one call on one token (a layer-stacked kernel has one more axis than the module sees).

    Whether an axis of a kernel is an input or an output is known only to the module that multiplies
    by it, so the model is run abstractly and every ``Linear`` call is recorded.
    """
    found: dict[tuple[str, ...], tuple[int, int]] = {}

    def record(next_fn, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            m = context.module
            found[tuple(m.path)] = (len(m.in_shape), len(m.in_shape) + len(m.out_shape))
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 1), jnp.int32)), params)
    return found


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None) -> Array:
        c = self.cfg
        head = c.d_model // c.n_head
        bias = c.arch == "gpt2"

        def proj(n_heads: int, heads_axis: str, name: str) -> Array:
            axes = ("embed", heads_axis, "head_dim")
            return Linear((c.d_model,), (n_heads, head), axes, 0.02, bias, compute_dtype(c), fp8(c), name=name)(x_BxTxD)

        q_BxTxNxH = proj(c.n_head, "heads", "q")
        k_BxSxKxH = proj(c.n_kv_head, "kv_heads", "k")
        v_BxSxKxH = proj(c.n_kv_head, "kv_heads", "v")
        if c.arch == "llama":
            q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, c.rope_theta)
            k_BxSxKxH = rope(k_BxSxKxH, positions_BxT, c.rope_theta)
        # In order unless the sequence runs in context parallelism's zig-zag layout (Transformer.__call__).
        in_order = attention.zigzag_order(positions_BxT.shape[1], attention.sequence_shards()) is None
        mask = attention.Mask(positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT, in_order)
        if self.has_variable("cache", "key"):  # decoding (jaxllm.model.decode): attend to every cached position
            cache_k, cache_v = self.variable("cache", "key"), self.variable("cache", "value")
            cache_k.value = write_cache(cache_k.value, k_BxSxKxH, positions_BxT)
            cache_v.value = write_cache(cache_v.value, v_BxSxKxH, positions_BxT)
            k_BxSxKxH, v_BxSxKxH = cache_k.value, cache_v.value
            # slot s of the cache holds position s; queries need not start at position 0
            slots_BxS = jnp.broadcast_to(jnp.arange(k_BxSxKxH.shape[1]), k_BxSxKxH.shape[:2])
            mask = attention.Mask(positions_BxT, slots_BxS, None, None, False)
        # Context parallelism: queries stay split along the sequence, keys and values are gathered.
        q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "q_seq", "heads", "head_dim"))
        k_BxSxKxH = constrain(k_BxSxKxH, ("batch", "kv_seq", "kv_heads", "head_dim"))
        v_BxSxKxH = constrain(v_BxSxKxH, ("batch", "kv_seq", "kv_heads", "head_dim"))
        impl = attention.resolve(c.attention, attention.platform(), c.dtype)
        out_BxTxNxH = attention.attend(impl, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, c.attention_block)
        out_BxTxNxH = constrain(out_BxTxNxH, ("batch", "q_seq", "heads", "head_dim"))
        out_BxTxD = Linear(
            (c.n_head, head),
            (c.d_model,),
            ("heads", "head_dim", "embed"),
            residual_std(c),
            bias,
            compute_dtype(c),
            fp8(c),
            name="o",
        )(out_BxTxNxH)
        return nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)


class MLP(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        c = self.cfg
        bias = c.arch == "gpt2"

        def dense(features: int, axes: tuple[str, str], std: float, name: str) -> Linear:
            in_dim = c.d_model if axes[0] == "embed" else c.d_ff
            return Linear((in_dim,), (features,), axes, std, bias, compute_dtype(c), fp8(c), name=name)

        if c.arch == "gpt2":
            h_BxTxF = jax.nn.gelu(dense(c.d_ff, ("embed", "mlp"), 0.02, "up")(x_BxTxD), approximate=True)
        else:
            gate_BxTxF = dense(c.d_ff, ("embed", "mlp"), 0.02, "gate")(x_BxTxD)
            h_BxTxF = jax.nn.silu(gate_BxTxF) * dense(c.d_ff, ("embed", "mlp"), 0.02, "up")(x_BxTxD)
        h_BxTxF = constrain(h_BxTxF, ("batch", "q_seq", "mlp"))
        out_BxTxD = dense(c.d_model, ("mlp", "embed"), residual_std(c), "down")(h_BxTxF)
        return nn.Dropout(c.dropout)(out_BxTxD, deterministic=self.deterministic)


class Adapter(nn.Module):
    """Bottleneck adapter (Houlsby et al. 2019): ``h + up(gelu(down(h)))``, D -> adapter_dim -> D.

    ``up`` starts at zero, so a freshly added adapter is the identity and fine-tuning starts from
    exactly the pre-trained function."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxD: Array) -> Array:
        c = self.cfg
        down = Linear((c.d_model,), (c.adapter_dim,), ("embed", None), 0.02, True, compute_dtype(c), name="down")
        up = Linear((c.adapter_dim,), (c.d_model,), (None, "embed"), 0.0, True, compute_dtype(c), name="up")
        return h_BxTxD + up(jax.nn.gelu(down(h_BxTxD), approximate=True))


def _then(sublayer: nn.Module, adapter: Adapter):
    return lambda *args: adapter(sublayer(*args))


class Block(nn.Module):
    """One residual block; shaped ``(carry, _) -> (carry, None)`` for ``nn.scan``. Its MLP is a mixture
    of experts (``jaxllm.model.moe``) when ``model.moe.n_experts`` is set, unless ``dense``."""

    cfg: ModelConfig
    deterministic: bool = True
    dense: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None):
        c = self.cfg
        attn = Attention(c, self.deterministic, name="attn")
        if c.moe.n_experts and not self.dense:
            mlp = moe.MoEMLP(c, residual_std(c), self.deterministic, name="mlp")
        else:
            mlp = MLP(c, self.deterministic, name="mlp")
        if c.adapter_dim:  # fine-tuning: each sublayer's output passes through its own adapter
            attn = _then(attn, Adapter(c, name="adapter_attn"))
            mlp = _then(mlp, Adapter(c, name="adapter_mlp"))
        norm1, norm2 = norm(c, "norm1"), norm(c, "norm2")

        def add(x: Array, h: Array) -> Array:
            return x + h if c.residual else h

        if c.norm_position == "pre":
            x_BxTxD = add(x_BxTxD, attn(norm1(x_BxTxD), positions_BxT, segment_ids_BxT))
            x_BxTxD = add(x_BxTxD, mlp(norm2(x_BxTxD)))
        else:
            x_BxTxD = norm1(add(x_BxTxD, attn(x_BxTxD, positions_BxT, segment_ids_BxT)))
            x_BxTxD = norm2(add(x_BxTxD, mlp(x_BxTxD)))
        return constrain(x_BxTxD, ("batch", "seq", "embed")), None


class Group(nn.Module):
    """``model.moe.every`` = k blocks, k - 1 dense then one MoE: what the scan repeats when k > 1."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD: Array, positions_BxT: Array, segment_ids_BxT: Array | None):
        k = self.cfg.moe.every
        for i in range(k):
            block = Block(self.cfg, self.deterministic, dense=i < k - 1, name=f"block{i}")
            x_BxTxD, _ = block(x_BxTxD, positions_BxT, segment_ids_BxT)
        return x_BxTxD, None


def scan_length(cfg: ModelConfig) -> int:
    """The block stack's scanned units (its ``layers`` axis): n_layer blocks, or n_layer / k groups of k
    blocks when ``model.moe.every`` = k > 1."""
    return cfg.n_layer // cfg.moe.every if cfg.moe.n_experts and cfg.moe.every > 1 else cfg.n_layer


def block_stack(cfg: ModelConfig, deterministic: bool, name: str = "blocks", length: int | None = None) -> nn.Module:
    """All n_layer blocks as one scanned module; parameters gain a leading ``layers`` axis of
    :func:`scan_length` units.

    ``length``: scan only that many units (a pipeline stage applies its slice of the stack)."""
    unit = Group if cfg.moe.n_experts and cfg.moe.every > 1 else Block
    block = remat.wrap(unit, cfg.remat)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0, moe.COLLECTION: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=scan_length(cfg) if length is None else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
        unroll=cfg.scan_unroll,
    )
    return scanned(cfg, deterministic, name=name)


class Transformer(nn.Module):
    """``apply(params, tokens_BxT) -> logits_BxTxV``; also ``embed``, ``blocks``, ``hidden``, ``head``,
    ``loss`` and ``next_token_loss`` as methods."""

    cfg: ModelConfig
    deterministic: bool = True

    def setup(self):
        c = self.cfg
        self.wte = nn.Embed(
            c.vocab_size, c.d_model, dtype=compute_dtype(c), embedding_init=_init(0.02, ("vocab", "embed"))
        )
        if c.arch == "gpt2":
            self.wpe = nn.Embed(
                c.max_seq_len, c.d_model, dtype=compute_dtype(c), embedding_init=_init(0.02, (None, "embed"))
            )
        if c.prompt_tokens:  # prompt tuning's vectors (jaxllm.sft.peft.prompt_init gives them their values)
            self.prompt = self.param("prompt", _init(0.02, (None, "embed")), (c.prompt_tokens, c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = block_stack(c, self.deterministic)
        if c.norm_position == "pre":
            self.norm_f = norm(c)  # named norm_f by the attribute
        if not c.tie_embeddings:
            self.lm_head = Linear((c.d_model,), (c.vocab_size,), ("embed", "vocab"), 0.02, False, compute_dtype(c))

    def embed(self, tokens_BxT: Array, positions_BxT: Array) -> Array:
        # Lookups read whole rows: by default (the rules' "embed_rows") the tables' FSDP-sharded embed
        # dimension is gathered first, as for any weight (otherwise XLA must move that sharding from D
        # to the batch, which it does by full rematerialisation). The vocabulary stays split over tensor.
        table_VxD = constrain(self.wte.embedding, ("vocab", "embed_rows")).astype(compute_dtype(self.cfg))
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0)
        if self.cfg.arch == "gpt2":
            x_BxTxD = x_BxTxD + jnp.take(
                constrain(self.wpe.embedding, (None, "embed_rows")), positions_BxT, axis=0
            ).astype(x_BxTxD.dtype)
        x_BxTxD = self.drop(x_BxTxD, deterministic=self.deterministic)
        if (
            n_prompt := self.cfg.prompt_tokens
        ):  # the first n_prompt positions hold the learned prompt, whatever their tokens
            virtual_BxTxD = self.prompt[jnp.minimum(positions_BxT, n_prompt - 1)].astype(x_BxTxD.dtype)
            x_BxTxD = jnp.where((positions_BxT < n_prompt)[..., None], virtual_BxTxD, x_BxTxD)
        return constrain(x_BxTxD, ("batch", "seq", "embed"))

    def head(self, x_BxTxD: Array) -> Array:
        if self.cfg.norm_position == "pre":  # post-LN blocks already end in a norm
            x_BxTxD = self.norm_f(x_BxTxD)
        logits_BxTxV = self.wte.attend(x_BxTxD) if self.cfg.tie_embeddings else self.lm_head(x_BxTxD)
        # Not "seq": under sequence parallelism seq would take the tensor axis and leave the vocabulary
        # whole, gathering the [V, D] table; Megatron gathers the sequence here and keeps V sharded.
        # "q_seq" is split by context parallelism alone.
        return constrain(logits_BxTxV, ("batch", "q_seq", "vocab"))

    def loss(self, x_BxTxD: Array, targets_BxT: Array, weights_BxT: Array | None = None) -> tuple[Array, Array]:
        """``(mean cross-entropy, token count)`` of the head on the blocks' output ``x_BxTxD``: the
        logits whole, or with ``model.loss_chunk`` fused with the loss a block of positions at a time
        (:func:`jaxllm.model.loss.chunked_cross_entropy`: the same loss, no ``[B, T, V]`` logits)."""
        c = self.cfg
        if not c.loss_chunk:
            return cross_entropy(self.head(x_BxTxD), targets_BxT, weights_BxT)
        if c.norm_position == "pre":
            x_BxTxD = self.norm_f(x_BxTxD)
        w_DxV = self.wte.embedding.T if c.tie_embeddings else self.lm_head.matrix()
        return chunked_cross_entropy(x_BxTxD, w_DxV, targets_BxT, weights_BxT, c.loss_chunk, compute_dtype(c))

    def next_token_loss(
        self, tokens_BxT1: Array, positions_BxT: Array | None = None, segment_ids_BxT: Array | None = None
    ) -> tuple[Array, Array]:
        """:meth:`loss` of predicting ``tokens_BxT1[:, 1:]`` from ``tokens_BxT1[:, :-1]``."""
        return self.loss(self.hidden(tokens_BxT1[:, :-1], positions_BxT, segment_ids_BxT), tokens_BxT1[:, 1:])

    def __call__(
        self, tokens_BxT: Array, positions_BxT: Array | None = None, segment_ids_BxT: Array | None = None
    ) -> Array:
        return self.head(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT))

    def hidden(
        self, tokens_BxT: Array, positions_BxT: Array | None = None, segment_ids_BxT: Array | None = None
    ) -> Array:
        """The last block's output ``x_BxTxD``, positions in order (what :meth:`head` reads)."""
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        # Context parallelism: the blocks see the sequence in zig-zag order (every token keeps its
        # position, so RoPE and the causal mask are unchanged); the head gets it back in order.
        order_T = attention.zigzag_order(tokens_BxT.shape[1], attention.sequence_shards())
        if order_T is not None:
            tokens_BxT, positions_BxT = tokens_BxT[:, order_T], positions_BxT[:, order_T]
            segment_ids_BxT = None if segment_ids_BxT is None else segment_ids_BxT[:, order_T]
        x_BxTxD = self.embed(tokens_BxT, positions_BxT)
        x_BxTxD, _ = self.blocks(x_BxTxD, positions_BxT, segment_ids_BxT)
        if order_T is not None:
            x_BxTxD = constrain(x_BxTxD[:, np.argsort(order_T)], ("batch", "seq", "embed"))
        return x_BxTxD
