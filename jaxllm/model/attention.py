"""Attention kernels behind ``model.attention``, and the sequence layout of context parallelism.

    attend(impl, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask) -> out_BxTxNxH

A query may read a key when the key's position is not after the query's (causal by position, not
by index, so a sequence reordered for context parallelism, or a KV cache, masks correctly) and,
for packed rows, when both carry the same segment id. GQA: query head n reads key/value head
n // (N / K).

- ``xla``: ``jax.nn.dot_product_attention``; the scores ``[B, N, T, S]`` are materialised.
- ``chunked``: query blocks x key blocks with the online softmax of FlashAttention, in pure JAX:
  per device O(T) memory on any backend. Both loops are ``jax.checkpoint``-ed, so the backward pass
  recomputes one query block's scores at a time and never holds T x S either. Key blocks wholly
  after a query block are skipped when the sequence is in order.
- ``cudnn``: cuDNN's fused kernel (GPU, bfloat16/float16); ``splash``: Pallas splash attention (TPU).
- ``auto``: splash on TPU, cudnn on GPU in half precision, otherwise chunked (one log line says so).

Context parallelism: the logical name ``q_seq`` (queries, MLP hidden, logits) and the residual
stream's ``seq`` map to the ``context`` mesh axis, ``kv_seq`` (keys, values) to nothing, so each
device holds T/c queries and the compiler all-gathers keys and values. The model runs the sequence
in zig-zag order (:func:`zigzag_order`): device i holds chunks i and 2c-1-i of 2c, so every device
has the same share of the causal triangle.

Shape letters beyond ARCHITECTURE.md's: G = N / K query heads per key/value head; in ``chunked``,
c sequence chunks (one per context device) of n query blocks of q positions.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.core.errors import ConfigError

Array = jax.Array
_NEG = -1e30  # a masked score: finite, so a block with no visible key yields exp(0) weights that a later max erases
_HALF = ("bfloat16", "float16")


class Mask(NamedTuple):
    """Who may read whom: positions (and segment ids of packed rows) of queries and keys.

    ``in_order``: static; queries and keys are one sequence in index order (training without a
    cache or a zig-zag split), so index-causal kernels (cuDNN's, splash's) and block skipping apply."""

    q_pos_BxT: Array
    k_pos_BxS: Array
    q_seg_BxT: Array | None
    k_seg_BxS: Array | None
    in_order: bool


def dense_mask(mask: Mask) -> Array:
    """``[B, 1, T, S]`` bool: the full mask, for the kernels that take one."""
    ok_BxTxS = mask.k_pos_BxS[:, None, :] <= mask.q_pos_BxT[:, :, None]
    if mask.q_seg_BxT is not None:
        ok_BxTxS &= mask.k_seg_BxS[:, None, :] == mask.q_seg_BxT[:, :, None]
    return ok_BxTxS[:, None]


def segment_mask(mask: Mask) -> Array | None:
    if mask.q_seg_BxT is None:
        return None
    return (mask.q_seg_BxT[:, :, None] == mask.k_seg_BxS[:, None, :])[:, None]


# --------------------------------------------------------------------------- choosing a kernel


def platform() -> str:
    """The platform the program being traced runs on: the devices of the mesh in context (a TPU
    slice when ``--plan`` compiles for one on a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, platform: str, dtype: str) -> str:
    """The kernel ``model.attention=impl`` runs on ``platform`` (cpu/gpu/tpu) in ``dtype``."""
    if impl == "splash" and platform != "tpu":
        raise ConfigError(f"model.attention=splash needs a TPU (this is {platform}); use chunked or auto")
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attention=cudnn needs a GPU (this is {platform}); use chunked or auto")
    if impl == "cudnn" and dtype not in _HALF:
        raise ConfigError(f"model.attention=cudnn needs model.dtype=bfloat16 or float16, got {dtype}")
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and dtype in _HALF:
        return "cudnn"
    _say_fallback(platform, dtype)
    return "chunked"


@functools.cache
def _say_fallback(platform: str, dtype: str) -> None:
    print(f"model.attention=auto: no fused kernel for {platform}/{dtype}; using chunked", file=sys.stderr)


def attend(impl: str, q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask, block: int = 512) -> Array:
    """Softmax(q k^T / sqrt(H)) v under ``mask``, by the (resolved) kernel ``impl``."""
    if impl == "chunked":
        return chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, block)
    if impl == "splash" and mask.in_order:
        return splash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask)
    if impl == "splash":
        raise ConfigError("model.attention=splash supports neither a KV cache nor mesh.context > 1; use chunked")
    implementation = "cudnn" if impl == "cudnn" else "xla"
    if mask.in_order:  # today's program exactly: causal by index, segments as a mask
        return jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=segment_mask(mask), is_causal=True, implementation=implementation
        )
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=dense_mask(mask), implementation=implementation
    )


# --------------------------------------------------------------------------- chunked (online softmax)


def block_size(n: int, block: int) -> int:
    """The largest divisor of n that is at most ``block``."""
    return max(d for d in range(1, min(n, block) + 1) if n % d == 0)


def chunked(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask, block: int) -> Array:
    """Blockwise attention in O(T) memory: a map over query blocks, a scan over key blocks.

    Queries are laid out ``[B, c, T/c]`` with c the plan's shards of ``q_seq``, so the loop runs over
    each device's own query blocks instead of gathering the queries."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1:3]
    c = sequence_shards() if T % sequence_shards() == 0 else 1
    bq, bk = block_size(T // c, block), block_size(S, block)
    nq, nk = T // c // bq, S // bk
    q_seg = jnp.zeros_like(mask.q_pos_BxT) if mask.q_seg_BxT is None else mask.q_seg_BxT
    k_seg = jnp.zeros_like(mask.k_pos_BxS) if mask.k_seg_BxS is None else mask.k_seg_BxS

    def q_blocks(x: Array) -> Array:  # [B, T, ...] -> [nq, B, c, bq, ...]
        x = x.reshape(B, c, nq, bq, *x.shape[2:])
        return nn.with_logical_constraint(jnp.moveaxis(x, 2, 0), (None, "batch", "q_seq") + (None,) * (x.ndim - 3))

    def k_blocks(x: Array) -> Array:  # [B, S, ...] -> [nk, B, bk, ...]
        return jnp.moveaxis(x.reshape(B, nk, bk, *x.shape[2:]), 1, 0)

    q_n = q_blocks(q_BxTxNxH.reshape(B, T, K, N // K, H))
    kv = (k_blocks(k_BxSxKxH), k_blocks(v_BxSxKxH), k_blocks(mask.k_pos_BxS), k_blocks(k_seg))
    # Which (query block, key block) pairs can see anything; only known statically for in-order sequences.
    visible_nqxnk = np.arange(nk)[None, :] * bk <= (np.arange(nq)[:, None] + 1) * bq - 1
    if not (mask.in_order and c == 1):
        visible_nqxnk = np.ones((nq, nk), bool)
    step = jax.checkpoint(functools.partial(_key_step, scale=H**-0.5), prevent_cse=False)

    def query_block(xs):
        q_BxcxqxKxGxH, qpos_Bxcxq, qseg_Bxcxq, visible_nk = xs
        G = N // K
        init = (
            jnp.full((B, c, K, G, bq), _NEG, jnp.float32),
            jnp.zeros((B, c, K, G, bq), jnp.float32),
            jnp.zeros((B, c, K, G, bq, H), jnp.float32),
        )
        q = (q_BxcxqxKxGxH, qpos_Bxcxq, qseg_Bxcxq)
        (_, l, acc), _ = jax.lax.scan(lambda carry, x: (step(carry, q, x), None), init, (*kv, visible_nk))
        out_BxcxKxGxqxH = acc / l[..., None]
        return jnp.moveaxis(out_BxcxKxGxqxH, 4, 2).reshape(B, c, bq, N, H).astype(q_BxTxNxH.dtype)

    xs = (q_n, q_blocks(mask.q_pos_BxT), q_blocks(q_seg), jnp.asarray(visible_nqxnk))
    out_nxBxcxqxNxH = jax.lax.map(jax.checkpoint(query_block, prevent_cse=False), xs)
    return jnp.moveaxis(out_nxBxcxqxNxH, 0, 2).reshape(B, T, N, H)


def _key_step(carry, q, kv, *, scale: float):
    """One key block folded into the running (max, normaliser, weighted sum) of one query block."""
    q_BxcxqxKxGxH, qpos_Bxcxq, qseg_Bxcxq = q
    k_BxsxKxH, v_BxsxKxH, kpos_Bxs, kseg_Bxs, visible = kv

    def fold(carry):
        m, l, acc = carry
        s = jnp.einsum("bcqkgh,bskh->bckgqs", q_BxcxqxKxGxH, k_BxsxKxH, preferred_element_type=jnp.float32) * scale
        ok = (kpos_Bxs[:, None, None, :] <= qpos_Bxcxq[..., None]) & (
            kseg_Bxs[:, None, None, :] == qseg_Bxcxq[..., None]
        )
        s = jnp.where(ok[:, :, None, None], s, _NEG)
        # The result does not depend on the running max, only its rounding does: no gradient through it.
        m_new = jnp.maximum(m, jax.lax.stop_gradient(s.max(-1)))
        p = jnp.exp(s - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        pv = jnp.einsum("bckgqs,bskh->bckgqh", p, v_BxsxKxH.astype(jnp.float32))
        return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

    return jax.lax.cond(visible, fold, lambda carry: carry, carry)


# --------------------------------------------------------------------------- splash (TPU)


def splash(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask: Mask) -> Array:
    """Pallas splash attention, causal by index, segments as splash ``SegmentIds``; GQA by repeating K/V.

    XLA cannot partition a Mosaic kernel, so under a mesh each device runs it on its own rows and
    heads: a ``shard_map`` over the layout the plan gives queries, keys and values (whole sequences:
    splash refuses ``mesh.context > 1``, see :func:`attend`)."""
    mesh = jax.sharding.get_abstract_mesh()
    args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH) + (() if mask.q_seg_BxT is None else (mask.q_seg_BxT, mask.k_seg_BxS))
    if not mesh.shape:
        return _splash_local(*args)
    q_spec = _divisible(nn.logical_to_mesh_axes(("batch", "q_seq", "heads", "head_dim")), q_BxTxNxH.shape, mesh)
    kv_spec = _divisible(nn.logical_to_mesh_axes(("batch", "kv_seq", "kv_heads", "head_dim")), k_BxSxKxH.shape, mesh)
    seg_specs = () if len(args) == 3 else (P(q_spec[0], None), P(kv_spec[0], None))
    return jax.shard_map(
        _splash_local, in_specs=(q_spec, kv_spec, kv_spec, *seg_specs), out_specs=q_spec, check_vma=False
    )(*args)


def _ways(axes, mesh) -> int:
    """Into how many pieces one dimension's mesh axes (None, a name or a tuple of names) split it."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in names]))


def _divisible(spec: P, shape: tuple[int, ...], mesh) -> P:
    """``spec`` without the mesh axes a dimension cannot be split over (``init`` traces one row)."""
    padded = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(axes if size % _ways(axes, mesh) == 0 else None for axes, size in zip(padded, shape)))


def _splash_local(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, q_seg_BxT=None, k_seg_BxS=None) -> Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    T, N, H = q_BxTxNxH.shape[1:]
    S, K = k_BxSxKxH.shape[1:3]
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((T, S))] * N), head_shards=1, q_seq_shards=1)
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * H**-0.5, 1, 2)
    k_BxNxSxH = jnp.repeat(jnp.swapaxes(k_BxSxKxH, 1, 2), N // K, axis=1)
    v_BxNxSxH = jnp.repeat(jnp.swapaxes(v_BxSxKxH, 1, 2), N // K, axis=1)
    if q_seg_BxT is None:
        out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxNxSxH, v_BxNxSxH)
    else:
        segments = sk.SegmentIds(q=q_seg_BxT, kv=k_seg_BxS)
        out_BxNxTxH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(
            q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, segments
        )
    return jnp.swapaxes(out_BxNxTxH, 1, 2)


# --------------------------------------------------------------------------- context parallelism's layout


def logical_shards(name: str) -> int:
    """Into how many pieces the active plan splits the logical axis ``name`` (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return _ways(nn.logical_to_mesh_axes((name,))[0] if mesh.shape else None, mesh)


def sequence_shards() -> int:
    """Into how many pieces the active plan splits ``q_seq``: the context ways."""
    return logical_shards("q_seq")


def zigzag_order(length: int, shards: int) -> np.ndarray | None:
    """Which original position each slot of the zig-zag layout holds, or None when there is none.

    The sequence is cut into 2c chunks; shard i holds chunks i and 2c-1-i, one early and one late,
    so the causal work (each query reads the keys before it) is the same on every shard."""
    if shards == 1 or length % (2 * shards):
        return None
    chunks = np.arange(length).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])
