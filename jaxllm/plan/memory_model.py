"""Per-device memory of a train step, from shapes and shardings alone (nothing compiled or allocated).

Four parts, per device, in bytes:

- ``params``: each float32 parameter's shard under the logical-axis rules (exact, from the shardings);
- ``grads``: the gradients, sharded like the parameters; with grad accumulation the step keeps the
  running sum beside the micro-batch's gradient, so two copies;
- ``optimizer``: Adam's two moments, sharded like the parameters or, with ZeRO-1
  (``optim.shard_state``), also over the data axes (exact, through ``sharding._zero1``);
- ``activations``: what the backward pass keeps from the forward pass of one micro-batch, plus the
  largest transient (the logits and their gradient), estimated per token below.

Activations per token of one layer, after Korthikanti et al. 2022 ("Reducing activation recomputation
in large transformer models", section 4): the norm inputs and outputs and the residual adds (``~6 D``
values), queries, keys, values and the attention output (``(2 N + 2 K) H / t``), the MLP's hidden
activations (2 or 3 ``F / t`` for GELU or SwiGLU), in the compute dtype, plus float32 attention
values that depend on the kernel ``model.attention`` resolves to on the target (:func:`score_values`):
XLA's attention keeps the ``N T / t`` probabilities, a fused kernel (cuDNN, splash) only the softmax's
row statistics, chunked attention one block of scores. Sequence parallelism divides the ``D`` terms
by ``t``. ``model.remat`` (:func:`saved_values_per_token`): ``full`` and ``offload`` leave a layer its
input alone on the device, ``dots`` its input and every matmul's output, ``dots_no_batch`` the
projections' outputs; one layer at a time is recomputed, its values held once on a TPU and twice
elsewhere (:func:`recompute_copies`). ``model.loss_chunk`` bounds the head's
buffers to one block of positions. A pipeline stage keeps its input at every loop iteration
(``M R + P - 1`` of them, each ``b / M`` rows) and recomputes one stage iteration at a time. A
dropless MoE layer adds, while its backward runs, the per-expert copies in which XLA:CPU and
XLA:GPU expand its grouped matmuls (:func:`grouped_matmul_bytes`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from jaxllm.core.config import Config, ModelConfig
from jaxllm.model import attention
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import pipeline, sharding


@dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def boxed_params(model_cfg: ModelConfig, seq_len: int) -> Any:
    """The model's parameters as ``nn.Partitioned`` ShapeDtypeStructs (shapes and logical names only).

    Traced with XLA's attention: the kernel changes no parameter, and the target's kernel (cuDNN,
    splash) may not exist on the planning host."""
    model = Transformer(dataclasses.replace(model_cfg, attention="xla"))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32)))["params"]


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def _shard_bytes(shape: tuple[int, ...], named, itemsize: int) -> int:
    return int(np.prod(named.shard_shape(shape))) * itemsize


def state_bytes(boxed: Any, sizes: dict[str, int], rule_table, zero1: bool) -> tuple[int, int]:
    """``(params, optimizer)`` bytes per device: float32 parameters and Adam's two float32 moments."""
    shardings = sharding.logical_shardings(boxed, abstract_mesh(sizes), rule_table)
    leaves = jax.tree.leaves(nn.unbox(boxed))
    params = optimizer = 0
    for leaf, named in zip(leaves, jax.tree.leaves(shardings)):
        params += _shard_bytes(leaf.shape, named, 4)
        moment = sharding._zero1(named, leaf.shape) if zero1 else named
        optimizer += 2 * _shard_bytes(leaf.shape, moment, 4)
    return params, optimizer


def score_values(m: ModelConfig, seq_len: int, tensor: int, kernel: str) -> float:
    """float32 attention values one layer keeps per token, by kernel: XLA's attention about 2.5 copies
    of the ``N T`` scores (scores, probabilities, part of the mask); chunked attention one ``N x block``
    tile of them; a fused kernel (``cudnn``, ``splash``) the softmax's row statistics alone (``N``)."""
    if kernel == "xla":
        return 2.5 * m.n_head * seq_len / tensor
    if kernel == "chunked":
        return m.n_head * min(m.attention_block, seq_len) / tensor
    return m.n_head / tensor


def layer_values_per_token(
    m: ModelConfig,
    seq_len: int,
    tensor: int,
    sequence_parallel: bool,
    kernel: str = "xla",
    expert_ways: int = 1,
    copies: int = 2,
) -> tuple[float, float]:
    """``(compute-dtype values, float32 values)`` one layer keeps per token for its backward pass.

    Korthikanti's minimum without dropout is ``8 D + 2 F`` values (GELU MLP); XLA:CPU and XLA:GPU keep
    about twice that (``copies`` = 2: fusions save both sides of the norms, the bias adds and the
    activation function), XLA:TPU once while it recomputes a layer (:func:`recompute_copies`); the
    float32 values are the attention kernel's (:func:`score_values`).
    """
    head = m.d_model // m.n_head
    whole = 4 * m.d_model / (tensor if sequence_parallel else 1)  # norms in and out, residual adds
    split = ((2 * m.n_head + 2 * m.n_kv_head) * head + mlp_values_per_token(m, expert_ways)) / tensor
    return copies * (whole + split), score_values(m, seq_len, tensor, kernel)


def recompute_copies(platform: str) -> int:
    """How many copies of :func:`layer_values_per_token`'s values a layer's backward holds while
    ``model.remat`` recomputes it: XLA:TPU fuses the norms and the activation function into the
    matmuls beside them, so the live set at the peak of its backward holds each value once (the
    MLP's gate and up outputs and their gradient, the keys and values broadcast to the query heads,
    the queries, the attention output, a few ``D``-wide values: ``--xla_dump_to``'s live ranges of a
    v5p compile); XLA:CPU and XLA:GPU twice."""
    return 1 if platform == "tpu" else 2


def mlp_values_per_token(m: ModelConfig, expert_ways: int = 1) -> float:
    """Hidden values of a layer's MLP per token, averaged over the layers: ``mats F`` for a dense MLP
    (mats = 2 for GELU, 3 for SwiGLU); an MoE layer keeps its k dispatched copies of the token in and
    out and their ``mats F_e`` hidden values, the shared experts' ``mats S F_e`` and the ``E`` router
    probabilities. Copies: k times the capacity factor on the capacity path; dropless with the experts
    split ``expert_ways`` = n ways, k n, as the experts run on ``jaxllm.model.moe_dispatch``'s padded
    buffer of n times a device's assignments."""
    mats, e = (2 if m.arch == "gpt2" else 3), m.moe
    if not e.n_experts:
        return mats * m.d_ff
    copies = e.top_k * (e.capacity_factor or expert_ways)
    expert = (
        copies * (2 * m.d_model + mats * (e.d_ff or m.d_ff))
        + mats * e.shared_experts * (e.d_ff or m.d_ff)
        + e.n_experts
    )
    return (mats * m.d_ff * (e.every - 1) + expert) / e.every


def grouped_matmul_bytes(m: ModelConfig, tokens: float, tensor: int, c: int, platform: str) -> int:
    """Bytes a dropless MoE layer's grouped matmuls hold beside its saved activations during its
    backward pass, for ``tokens`` tokens per device.

    ``jax.lax.ragged_dot`` on CPU and GPU (XLA's) computes ``[Gk, in] x [E, in, out]`` as one dense
    matmul of a masked copy of its input per expert, ``[E, Gk, in]``; the backward does it for the
    gradients too. The compiled steps held ``E Gk (f F + D)`` such values (the sorted inputs' and the
    hidden ones'), f = 2 (mats - 1) for SwiGLU's 3 or GELU's 2 matrices, and f = 2 mats on XLA:CPU
    with ``model.remat`` under its default flags, which keep the recomputed forward's copies too (CPU
    compiles of tests/test_plan_moe.py's shapes; XLA:GPU from one H200 step with remat, moe_dropless
    of bench/results). TPU's grouped matmul is native: no copies."""
    e = m.moe
    if not e.n_experts or e.capacity_factor or platform == "tpu":
        return 0
    mats = 2 if m.arch == "gpt2" else 3
    f = 2 * mats if platform == "cpu" and m.remat != "none" else 2 * (mats - 1)
    return int(e.n_experts * tokens * e.top_k * (f * (e.d_ff or m.d_ff) / tensor + m.d_model) * c)


def layer_weight_bytes(m: ModelConfig, tensor: int, itemsize: int, expert: int = 1) -> int:
    """One block's matrices, as a tensor-parallel device holds them once FSDP has gathered them (an MoE
    block: its ``E / expert`` experts and shared experts, averaged over the layers)."""
    head = m.d_model // m.n_head
    attn = 2 * m.d_model * (m.n_head + m.n_kv_head) * head
    mats, e = (2 if m.arch == "gpt2" else 3), m.moe
    mlp = mats * m.d_model * m.d_ff
    if e.n_experts:
        moe_mlp = mats * m.d_model * (e.d_ff or m.d_ff) * (e.n_experts / expert + e.shared_experts)
        mlp = (mlp * (e.every - 1) + moe_mlp) / e.every
    return int((attn + mlp) / tensor * itemsize)


def loss_bytes(platform: str, c: int) -> int:
    """Bytes per logit the loss keeps beside the compute-dtype logits, as each compiler was seen to:
    XLA:CPU three float32 copies (logits, log-probabilities, gradient; the CPU compiles of
    tests/test_plan.py), XLA:TPU none (it fuses the float32 loss into the logits' compute-dtype
    gradient, which takes the logits' place: bench/plan_configs.py's v5p compiles), XLA:GPU the
    gradient in the compute dtype (an H200, bench/accelerator.sh's gpt2_124m)."""
    return {"cpu": 12, "tpu": 0}.get(platform, c)


def head_bytes(m: ModelConfig, rows: int, seq: int, tensor: int, c: int, platform: str) -> float:
    """The head's live bytes for ``rows`` sequences: the logits and the loss's copies of them, whole
    or, with ``model.loss_chunk``, one block's (compute-dtype logits, float32 logits and gradient)
    beside the loop's copy of the unembedding matrix and its float32 gradient accumulator; the
    embedding output and the final norm's input and output."""
    norm = rows * seq * 3 * m.d_model * c
    if m.loss_chunk:
        loop = m.vocab_size * m.d_model / tensor * (c + 4)
        return rows * m.loss_chunk * m.vocab_size / tensor * (c + 8) + loop + norm
    return rows * seq * m.vocab_size / tensor * (c + loss_bytes(platform, c)) + norm


def saved_values_per_token(m: ModelConfig, seq_len: int, tensor: int, kernel: str, platform: str) -> float:
    """Compute-dtype values per token a layer keeps on the device beyond its input under
    ``model.remat``'s ``dots`` (every matmul's output: q, k, v, the attention output projection, the
    MLP's up and gate and down; XLA's attention adds its batched score and value products) or
    ``dots_no_batch`` (the projections only); 0 for ``full``, and for ``offload`` (``dots_no_batch``'s
    values in host memory) except on a CPU, whose host memory is the device's own (XLA:CPU counts it)."""
    policy = "dots_no_batch" if m.remat == "offload" and platform == "cpu" else m.remat
    if policy not in ("dots", "dots_no_batch"):
        return 0.0
    head, mats = m.d_model // m.n_head, (2 if m.arch == "gpt2" else 3)
    projections = ((m.n_head + 2 * m.n_kv_head) * head + (mats - 1) * m.d_ff) / tensor + 2 * m.d_model
    if policy == "dots" and kernel == "xla":
        projections += m.n_head * (seq_len + head) / tensor
    return projections


def activation_bytes(cfg: Config, sizes: dict[str, int], platform: str = "cpu") -> int:
    """Bytes of activations per device for one micro-batch's forward and backward pass, on
    ``platform`` (cpu | gpu | tpu: which attention kernel runs, and :func:`loss_bytes`)."""
    m = cfg.model
    t, p = sizes["tensor"], sizes["pipe"]
    c = 2 if m.dtype in ("bfloat16", "float16") else 4
    rows = cfg.train.batch_size // (
        sizes["data"] * sizes["fsdp"] * sizes.get("expert", 1)
    )  # expert: a data axis outside MoE
    seq = cfg.train.seq_len
    kernel = attention.resolve(m.attention, platform, m.dtype)
    e = sizes.get("expert", 1)
    low, f32 = layer_values_per_token(m, seq, t, cfg.mesh.sequence_parallel, kernel, e)
    layer = rows * seq * (low * c + f32 * 4)
    residual = rows * seq * m.d_model * c / (t if cfg.mesh.sequence_parallel else 1)
    layers_here = m.n_layer // p
    head = head_bytes(m, rows, seq, t, c, platform)
    micro = pipeline.microbatches(cfg.pipeline, p) if p > 1 else 1
    if p > 1:
        rounds = pipeline.repeats(cfg.pipeline)
        saved = (micro * rounds + p - 1) * residual / micro + residual
        recompute = layer / micro * (1 if m.remat != "none" else layers_here // rounds)  # one stage iteration
    elif m.remat != "none":
        kept = rows * seq * saved_values_per_token(m, seq, t, kernel, platform) * c
        once, _ = layer_values_per_token(m, seq, t, cfg.mesh.sequence_parallel, kernel, e, recompute_copies(platform))
        saved, recompute = layers_here * (residual + kept), rows * seq * (once * c + f32 * 4)
    else:
        saved, recompute = layers_here * layer, 0
    recompute += grouped_matmul_bytes(m, rows * seq / micro, t, c, platform)  # live with one layer's backward
    # FSDP: one block's weights gathered, and its full weight gradient before the reduce-scatter; on a
    # TPU three blocks' (XLA:TPU's latency-hiding scheduler gathers the next block's weights, and
    # reduce-scatters the last block's gradient, while one block computes: the count that follows
    # libtpu's peaks for LLaMA 1B under FSDP over 4 and 16 chips, bench/plan_configs.py)
    gathered = layer_weight_bytes(m, t, c, e) + layer_weight_bytes(m, t, 4, e) if sizes["fsdp"] > 1 else 0
    gathered *= 3 if platform == "tpu" else 1
    # the head's buffers and a recomputed block are never live at once
    return int(saved + max(head, recompute) + gathered)


def estimate(cfg: Config, boxed: Any, sizes: dict[str, int], platform: str = "cpu") -> Memory:
    """The four parts per device for this config on a mesh of these axis sizes, on ``platform``
    (see :func:`activation_bytes`)."""
    params, optimizer = state_bytes(boxed, sizes, sharding.rules(cfg.mesh), cfg.optim.shard_state)
    grads = params * (2 if cfg.train.grad_accum > 1 else 1)
    return Memory(params, grads, optimizer, activation_bytes(cfg, sizes, platform))
