"""Pipeline parallelism: the stacked blocks split into stages over the ``pipe`` mesh axis.

The ``layers`` axis of every block parameter is sharded over ``pipe`` (rule ``layers -> pipe``), so
each of the P devices along ``pipe`` stores 1/P of the layers. A batch is split into M
micro-batches; they flow through the stages one iteration apart (GPipe). The circular schedule cuts
the stack into P*R chunks and hands chunk c to stage c % P, so a micro-batch goes round the pipe R
times and each device runs R non-adjacent chunks (Megatron's interleaving, MaxText's "circular"
pipeline); the pipe fills and drains once per step instead of once per chunk, which shrinks the
idle share from (P-1)/(M+P-1) to (P-1)/(M R+P-1).

How it is written (the "vmap and shift" formulation, after MaxText): the P stages are one
``jax.vmap`` over a leading stage axis whose arrays are sharded over ``pipe``, so each device
computes only its own stage. Each loop iteration every stage runs its layers on its state, then the
states move one stage on with ``jnp.roll`` along that axis, which the compiler turns into a
collective permute between neighbouring devices. Stage 0 reads its next input from a ring of M
micro-batch slots, and the last stage writes its output back into the slot its micro-batch came
from; after the last iteration the ring holds the stack's output for every micro-batch. Work item k
(micro-batch k % M in round k // M) runs on stage p at iteration k + p: :func:`work_items` is that
table, the loop reads it, and the bubble fraction is counted from it. Everything else is the
compiler's: the data, fsdp and tensor axes keep working inside each stage through the model's own
logical constraints (``spmd_axis_name='pipe'`` puts the stage axis in front of them), and the
gradients come from autodiff of the loop (all forwards, then all backwards), each stage iteration
rematerialised.

Shape letters: P stages, R rounds (``pipeline.repeats``), C layers per chunk (n_layer / (P R)),
M micro-batches, b rows per micro-batch (B / M), I loop iterations (M R + P - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig, PipelineConfig
from jaxllm.errors import ConfigError
from jaxllm.model import Transformer, block_stack, cross_entropy

Array = jax.Array


def microbatches(cfg: PipelineConfig, stages: int) -> int:
    """M: ``pipeline.microbatches``, or the stage count when it is 0."""
    return cfg.microbatches or stages


def repeats(cfg: PipelineConfig) -> int:
    """R: rounds through the pipe; the GPipe schedule makes one."""
    return cfg.repeats if cfg.schedule == "circular" else 1


def check(model: ModelConfig, cfg: PipelineConfig, mesh: Mesh, batch_size: int) -> None:
    """Errors for pipelines the sizes cannot form, raised before anything compiles."""
    p = mesh.shape["pipe"]
    if p == 1:
        return
    m, r = microbatches(cfg, p), repeats(cfg)
    if model.n_layer % (p * r):
        raise ConfigError(
            f"model.n_layer={model.n_layer} is not divisible by mesh.pipe*pipeline.repeats={p * r}; "
            "every stage chunk needs the same number of layers"
        )
    if m < p:
        raise ConfigError(
            f"pipeline.microbatches={m} is smaller than mesh.pipe={p}; use at least {p} so every stage has "
            f"work (e.g. pipeline.microbatches={2 * p})"
        )
    ways = m * mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by pipeline.microbatches*data*fsdp={ways}; "
            "each micro-batch must split evenly over the data axes"
        )


# --------------------------------------------------------------------------- the schedule


def work_items(stages: int, micro: int, rounds: int) -> np.ndarray:
    """The schedule, ``[I, P]`` int: the work item each stage runs at each iteration, -1 when idle.

    Work item k is micro-batch k % M in round k // M; stage p runs it at iteration k + p, so stage
    p+1 gets it straight from stage p, and stage 0 gets round r+1 of micro-batch m from the last
    stage's round r, finished M - P + 1 iterations earlier (hence M >= P)."""
    n_items = micro * rounds
    k_IxP = np.arange(n_items + stages - 1)[:, None] - np.arange(stages)[None, :]
    return np.where((k_IxP >= 0) & (k_IxP < n_items), k_IxP, -1)


def bubble_fraction(stages: int, micro: int, rounds: int) -> float:
    """Share of (iteration, stage) slots of the loop in which a stage holds no real micro-batch."""
    return float(np.mean(work_items(stages, micro, rounds) < 0))


def theory_bubble(stages: int, micro: int, rounds: int) -> float:
    return (stages - 1) / (micro * rounds + stages - 1)


def describe(cfg: PipelineConfig, stages: int) -> str:
    """The start-up line: the schedule and its bubble, counted from the loop next to the theory."""
    m, r = microbatches(cfg, stages), repeats(cfg)
    return (
        f"pipeline: {cfg.schedule} P={stages} M={m} R={r}, {work_items(stages, m, r).shape[0]} iterations, "
        f"bubble {bubble_fraction(stages, m, r):.4f} (theory (P-1)/(M R+P-1) = {theory_bubble(stages, m, r):.4f})"
    )


# --------------------------------------------------------------------------- the pipelined forward


def _stage_layout(w_LxZ: Array, sharding: NamedSharding, stages: int, rounds: int) -> Array:
    """``[L, ...] -> [R, P, C, ...]``: layer r*P*C + p*C + c is round r's chunk on stage p.

    The stage axis goes over ``pipe``, the trailing axes keep their own sharding. With R = 1 this is
    the stored layout already; with R > 1 it regroups the layers (the compiler moves them between
    devices each step, and their gradients back), so that the stored parameters, and every
    checkpoint, stay the same for any mesh and schedule."""
    w_RxPxCxZ = w_LxZ.reshape(rounds, stages, -1, *w_LxZ.shape[1:])
    rest = tuple(sharding.spec[1:]) + (None,) * (w_LxZ.ndim - max(len(sharding.spec), 1))
    spec = PartitionSpec(None, "pipe", None, *rest)
    return jax.lax.with_sharding_constraint(w_RxPxCxZ, NamedSharding(sharding.mesh, spec))


def run_stages(
    stage: Callable, w_RxPxCxZ: Any, x_MxbxTxD: Array, table_IxP: np.ndarray, state_spec: NamedSharding, rng: Array
) -> Array:
    """Runs every micro-batch through all chunks; returns the stack's output, ``[M, b, T, D]``.

    ``stage(w_RxCxZ, round, x_bxTxD, rng) -> y_bxTxD`` is one stage's chunk in that round. In a
    bubble slot a stage computes on a zero or stale state; that result only ever reaches stages that
    are idle too, and is never written into the ring, so it adds no value and no gradient."""
    micro, stages = x_MxbxTxD.shape[0], table_IxP.shape[1]
    stage_P = jax.vmap(stage, in_axes=(1, 0, 0, 0), spmd_axis_name="pipe")
    stage_P = jax.checkpoint(stage_P, prevent_cse=False)  # remat per stage iteration
    is_first_P = (jnp.arange(stages) == 0)[:, None, None, None]

    def iteration(carry, xs):
        ring_MxbxTxD, out_PxbxTxD = carry
        t, k_P = xs
        first_bxTxD = ring_MxbxTxD[jnp.maximum(k_P[0], 0) % micro]
        in_PxbxTxD = jnp.where(is_first_P, first_bxTxD, jnp.roll(out_PxbxTxD, 1, axis=0))
        in_PxbxTxD = jax.lax.with_sharding_constraint(in_PxbxTxD, state_spec)
        round_P = jnp.maximum(k_P, 0) // micro
        out_PxbxTxD = stage_P(w_RxPxCxZ, round_P, in_PxbxTxD, jax.random.split(jax.random.fold_in(rng, t), stages))
        out_PxbxTxD = jax.lax.with_sharding_constraint(out_PxbxTxD, state_spec)
        k_last, slot = k_P[-1], jnp.maximum(k_P[-1], 0) % micro
        done_bxTxD = jnp.where(k_last >= 0, out_PxbxTxD[-1], ring_MxbxTxD[slot])
        ring_MxbxTxD = jax.lax.dynamic_update_index_in_dim(ring_MxbxTxD, done_bxTxD, slot, 0)
        return (ring_MxbxTxD, out_PxbxTxD), None

    init = (x_MxbxTxD, jnp.zeros((stages, *x_MxbxTxD.shape[1:]), x_MxbxTxD.dtype))
    xs = (jnp.arange(table_IxP.shape[0]), jnp.asarray(table_IxP))
    (ring_MxbxTxD, _), _ = jax.lax.scan(iteration, init, xs)
    return ring_MxbxTxD


def make_loss_fn(model: Transformer, cfg: PipelineConfig, mesh: Mesh, rules: Any, block_shardings: Any) -> Callable:
    """``loss(params, tokens_BxT1, rng) -> mean next-token cross-entropy`` (nats), the blocks pipelined.

    The same value, and by autodiff the same gradients, as ``trainer.make_loss_fn(model)``: embedding
    and head run on the whole batch as usual, only the block stack is split into micro-batches
    (rows i*M + m form micro-batch m, so each device's rows split locally) and stages.
    ``rules``: the logical-axis rules; ``block_shardings``: the NamedShardings of ``params['blocks']``;
    ``rng`` may be None when the model is deterministic."""
    mc = model.cfg
    stages = mesh.shape["pipe"]
    micro, rounds = microbatches(cfg, stages), repeats(cfg)
    table_IxP = work_items(stages, micro, rounds)
    chunk = block_stack(mc, model.deterministic, length=mc.n_layer // (stages * rounds))
    act = nn.logical_to_mesh_axes(("batch", "seq", "embed"), rules)
    state_spec = NamedSharding(mesh, PartitionSpec("pipe", *act))
    ring_spec = NamedSharding(mesh, PartitionSpec(None, *act))

    def stage(w_RxCxZ, round_, x_bxTxD, rng):
        w_CxZ = jax.tree.map(lambda w: w[round_], w_RxCxZ)
        # The stage sees b rows; positions are the same for every row.
        positions_bxT = jnp.broadcast_to(jnp.arange(x_bxTxD.shape[1]), x_bxTxD.shape[:2])
        y_bxTxD, _ = chunk.apply({"params": w_CxZ}, x_bxTxD, positions_bxT, None, rngs={"dropout": rng})
        return y_bxTxD

    def loss_fn(params, tokens_BxT1, rng):
        rng = jax.random.PRNGKey(0) if rng is None else rng
        inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
        (batch, seq), rngs = inputs_BxT.shape, {"dropout": jax.random.fold_in(rng, 0)}
        positions_BxT = jnp.broadcast_to(jnp.arange(seq), inputs_BxT.shape)
        x_BxTxD = model.apply({"params": params}, inputs_BxT, positions_BxT, method="embed", rngs=rngs)
        x_MxbxTxD = x_BxTxD.reshape(batch // micro, micro, seq, -1).swapaxes(0, 1)
        x_MxbxTxD = jax.lax.with_sharding_constraint(x_MxbxTxD, ring_spec)
        w = jax.tree.map(lambda w, s: _stage_layout(w, s, stages, rounds), params["blocks"], block_shardings)
        y_MxbxTxD = run_stages(stage, w, x_MxbxTxD, table_IxP, state_spec, jax.random.fold_in(rng, 1))
        y_BxTxD = y_MxbxTxD.swapaxes(0, 1).reshape(x_BxTxD.shape)
        logits_BxTxV = model.apply({"params": params}, y_BxTxD, method="head")
        return cross_entropy(logits_BxTxV, targets_BxT)[0]

    return loss_fn
