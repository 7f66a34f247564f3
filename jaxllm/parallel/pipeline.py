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

Mixture-of-experts blocks route each micro-batch on its own, as ``train.grad_accum`` = M does: a
chunk's router losses and statistics (``jaxllm.model.moe``) come out of its stage beside its output,
bubble slots' left out, and the loss adds their mean over the M micro-batches (so the balance loss
and the capacity are of a micro-batch's tokens, not of the whole batch's).

Shape letters: P stages, R rounds (``pipeline.repeats``), C layers per chunk (n_layer / (P R)),
M micro-batches, b rows per micro-batch (B / M), I loop iterations (M R + P - 1), Z a weight's own
axes (those after its layer axis).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.core.config import ModelConfig, PipelineConfig
from jaxllm.core.errors import ConfigError
from jaxllm.model import attention, moe
from jaxllm.model.transformer import Transformer, block_stack, scan_length
from jaxllm.parallel.schedule import bubble_fraction, one_f_one_b, theory_bubble, work_items

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
    m, r, units = microbatches(cfg, p), repeats(cfg), scan_length(model)
    if units % (p * r):
        stack = f"model.n_layer={model.n_layer}" if units == model.n_layer else f"model.n_layer/model.moe.every={units}"
        raise ConfigError(
            f"{stack} is not divisible by mesh.pipe*pipeline.repeats={p * r}; "
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


def describe(cfg: PipelineConfig, stages: int) -> str:
    """The start-up line: the schedule and its bubble, counted from the loop next to the theory."""
    m, r, s = microbatches(cfg, stages), repeats(cfg), cfg.schedule
    iterations = m + 2 * stages - 2 if s == "1f1b" else work_items(stages, m, r).shape[0]
    theory = "2(P-1)/(M+2P-2)" if s == "1f1b" else "(P-1)/(M R+P-1)"
    return (
        f"pipeline: {s} P={stages} M={m} R={r}, {iterations} iterations, "
        f"bubble {bubble_fraction(stages, m, r, s):.4f} (theory {theory} = {theory_bubble(stages, m, r, s):.4f})"
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
) -> tuple[Array, Any]:
    """Runs every micro-batch through all chunks; returns the stack's output, ``[M, b, T, D]``, and the
    chunks' ``aux`` by :func:`chunk_means`.

    ``stage(w_RxCxZ, round, x_bxTxD, rng) -> (y_bxTxD, aux)`` is one stage's chunk in that round. In a
    bubble slot a stage computes on a zero or stale state; that result only ever reaches stages that
    are idle too, and is never written into the ring nor counted in ``aux``, so it adds no value and
    no gradient."""
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
        out_PxbxTxD, aux_P = stage_P(
            w_RxPxCxZ, round_P, in_PxbxTxD, jax.random.split(jax.random.fold_in(rng, t), stages)
        )
        out_PxbxTxD = jax.lax.with_sharding_constraint(out_PxbxTxD, state_spec)
        k_last, slot = k_P[-1], jnp.maximum(k_P[-1], 0) % micro
        done_bxTxD = jnp.where(k_last >= 0, out_PxbxTxD[-1], ring_MxbxTxD[slot])
        ring_MxbxTxD = jax.lax.dynamic_update_index_in_dim(ring_MxbxTxD, done_bxTxD, slot, 0)
        return (ring_MxbxTxD, out_PxbxTxD), aux_P

    init = (x_MxbxTxD, jnp.zeros((stages, *x_MxbxTxD.shape[1:]), x_MxbxTxD.dtype))
    xs = (jnp.arange(table_IxP.shape[0]), jnp.asarray(table_IxP))
    (ring_MxbxTxD, _), aux_IxP = jax.lax.scan(iteration, init, xs)
    return ring_MxbxTxD, chunk_means(aux_IxP, table_IxP, micro)


def chunk_means(aux_IxP: Any, table_IxP: np.ndarray, micro: int) -> Any:
    """``[I, P, ...] -> [R, P, ...]``: what each chunk returned, summed over its real work items (bubble
    slots left out) and divided by M; chunk (r, p), round r on stage p, holds layers (r P + p) C on."""
    rounds = int(table_IxP.max()) // micro + 1
    w_RxIxP = np.stack([(table_IxP >= 0) & (table_IxP // micro == r) for r in range(rounds)]) / micro
    return jax.tree.map(lambda a: jnp.einsum("rip,ip...->rp...", w_RxIxP.astype(a.dtype), a), aux_IxP)


def router_terms(aux_RxP: Any) -> tuple[Array, dict[str, Array]]:
    """The chunks' mean router outputs -> ``(loss, statistics)``: the weighted router losses of every
    layer summed, and ``jaxllm.model.moe.telemetry``'s per-layer arrays, chunks in layer order."""
    loss_RxP, stats = aux_RxP
    return jnp.sum(loss_RxP), {k: v.reshape(-1, *v.shape[3:]) for k, v in stats.items()}


def run_1f1b(stage: Callable, w_PxCxZ: Any, ends: Any, micro: int, stages: int, state_spec: NamedSharding, rng: Array):
    """The 1F1B loop: every iteration each stage runs one micro-batch forward and another backward.

    ``stage(w_CxZ, x_bxTxD, rng) -> (y_bxTxD, (router_loss, stats))``; ``ends.first(m) -> (x_bxTxD,
    embed_vjp)`` is micro-batch m's embedding, ``ends.last(m, y_bxTxD) -> (loss, head_grads, dy_bxTxD)``
    its loss share. Each stage keeps the inputs of its live micro-batches (at most 2P-1 slots,
    :func:`one_f_one_b`) and recomputes its forward inside the backward (``jax.vjp``), as GPipe's
    rematerialisation does; a chunk's router loss, a micro-batch's own, gets its gradient there too.
    Returns ``(loss, aux_1xP, grads outside the blocks, grads of w_PxCxZ)``, ``aux`` as :func:`chunk_means`'s."""
    forward_IxP, backward_IxP = one_f_one_b(stages, micro)
    slots = 2 * stages - 1
    stage_Px1x1x1 = jnp.arange(stages)[:, None, None, None]
    is_first_P, is_last_P = stage_Px1x1x1 == 0, stage_Px1x1x1 == stages - 1
    spec = functools.partial(jax.lax.with_sharding_constraint, shardings=state_spec)
    stash_spec = NamedSharding(state_spec.mesh, PartitionSpec(state_spec.spec[0], None, *state_spec.spec[1:]))

    keys = functools.partial(_dropout_keys, rng, stages)
    stage_P = jax.vmap(stage, spmd_axis_name="pipe")
    backward_P = jax.vmap(functools.partial(_stage_vjp, stage), spmd_axis_name="pipe")
    put_P = jax.vmap(lambda s, x, m: jax.lax.dynamic_update_index_in_dim(s, x, m % slots, 0), spmd_axis_name="pipe")
    take_P = jax.vmap(lambda s, m: s[m % slots], spmd_axis_name="pipe")

    def iteration(carry, xs):
        out_P, dx_P, stash_P, loss, aux, g_ends, g_w = carry
        f_P, b_P = xs
        x0_bxTxD, _ = ends.first(jnp.clip(f_P[0], 0, micro - 1))
        in_P = spec(jnp.where(is_first_P, x0_bxTxD, jnp.roll(out_P, 1, axis=0)))
        keep_P = take_P(stash_P, jnp.maximum(f_P, 0))  # an idle stage must not overwrite a live slot
        in_or_keep_P = jnp.where((f_P >= 0)[:, None, None, None], in_P, keep_P)
        stash_P = jax.lax.with_sharding_constraint(put_P(stash_P, in_or_keep_P, jnp.maximum(f_P, 0)), stash_spec)
        out_P, aux_P = stage_P(w_PxCxZ, in_P, keys(f_P))
        out_P = spec(out_P)
        loss_m, g_head, dy_bxTxD = ends.last(jnp.clip(f_P[-1], 0, micro - 1), out_P[-1])
        dout_P = jnp.where(is_last_P, dy_bxTxD, jnp.roll(dx_P, -1, axis=0))
        dout_P = spec(jnp.where((b_P >= 0)[:, None, None, None], dout_P, 0))  # idle slots carry no gradient
        d_router_P = _share(micro, b_P, jnp.ones((stages,), jnp.float32))
        g_w_P, dx_P = backward_P(w_PxCxZ, take_P(stash_P, jnp.maximum(b_P, 0)), keys(b_P), dout_P, d_router_P)
        _, embed_vjp = ends.first(jnp.clip(b_P[0], 0, micro - 1))
        (g_embed,) = embed_vjp(dx_P[0])  # zero when stage 0 is idle: its dout was zero
        valid = f_P[-1] >= 0
        loss = loss + jnp.where(valid, loss_m, 0.0)
        aux = jax.tree.map(lambda a, x: a + _share(micro, f_P, x), aux, aux_P)
        g_ends = jax.tree.map(lambda a, h, e: a + jnp.where(valid, h, 0) + e, g_ends, g_head, g_embed)
        g_w = jax.tree.map(jnp.add, g_w, g_w_P)
        return (spec(out_P), spec(dx_P), stash_P, loss, aux, g_ends, g_w), None

    x0_bxTxD, embed_vjp = ends.first(0)
    zeros_P = jnp.zeros((stages, *x0_bxTxD.shape), x0_bxTxD.dtype)
    stash_P = jnp.zeros((stages, slots, *x0_bxTxD.shape), x0_bxTxD.dtype)
    aux_shapes = jax.eval_shape(stage_P, w_PxCxZ, zeros_P, keys(jnp.zeros(stages, int)))[1]
    aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shapes)
    g_ends = jax.tree.map(jnp.zeros_like, embed_vjp(x0_bxTxD)[0])
    init = (zeros_P, zeros_P, stash_P, jnp.float32(0), aux, g_ends, jax.tree.map(jnp.zeros_like, w_PxCxZ))
    (_, _, _, loss, aux, g_ends, g_w), _ = jax.lax.scan(
        iteration, init, (jnp.asarray(forward_IxP), jnp.asarray(backward_IxP))
    )
    return loss, jax.tree.map(lambda a: a[None], aux), g_ends, g_w


def _dropout_keys(rng: Array, stages: int, m_P: Array) -> Array:
    """Micro-batch ``m_P[p]``'s dropout key on stage p: the same in its forward and its backward."""
    return jax.vmap(lambda m, p: jax.random.fold_in(jax.random.fold_in(rng, m), p))(
        jnp.maximum(m_P, 0), jnp.arange(stages)
    )


def _stage_vjp(stage: Callable, w_CxZ, x_bxTxD, key, dy_bxTxD, d_router) -> tuple[Any, Array]:
    """``(dw_CxZ, dx_bxTxD)`` of ``dy . y + d_router * router_loss`` (the statistics carry no gradient)."""

    def differentiated(w, x):
        y_bxTxD, (router, _) = stage(w, x, key)
        return y_bxTxD, router

    return jax.vjp(differentiated, w_CxZ, x_bxTxD)[1]((dy_bxTxD, d_router))


def _share(micro: int, m_P: Array, a_PxZ: Array) -> Array:
    """Each stage's micro-batch m's share of a mean over the M micro-batches: a / M, 0 where idle (m < 0)."""
    return jnp.where((m_P >= 0).reshape(-1, *[1] * (a_PxZ.ndim - 1)), a_PxZ / micro, 0)


class _Ends(NamedTuple):
    first: Callable
    last: Callable


def make_loss_fn(model: Transformer, cfg: PipelineConfig, mesh: Mesh, rules: Any, block_shardings: Any) -> Callable:
    """``loss(params, tokens_BxT1, rng) -> (loss, stats)``, the blocks pipelined: the same values and
    gradients as ``train_step.make_loss_fn(model)`` accumulated over the same M micro-batches (for a
    dense model: as on the whole batch). Only the block stack is split into micro-batches (rows i*M + m
    form micro-batch m, so each device's rows split locally) and stages. GPipe and circular: embedding
    and head run on the whole batch and autodiff differentiates the loop. 1F1B: :func:`run_1f1b`
    computes the gradient inside the forward pass of a ``custom_vjp`` (the value alone takes the GPipe
    loop). ``rules``: the logical-axis rules; ``block_shardings``: the NamedShardings of
    ``params['blocks']``; ``rng`` may be None when the model is deterministic."""
    pipe = _Pipelined(model, cfg, mesh, rules, block_shardings)

    def gpipe_loss(params, tokens_BxT1, rng):
        ce, router, stats = pipe.forward(params, tokens_BxT1, rng)
        return ce + router, stats

    if cfg.schedule != "1f1b":
        return gpipe_loss
    loss_fn = jax.custom_vjp(gpipe_loss)
    loss_fn.defvjp(pipe.loss_and_grads_1f1b, lambda grads, ct: (jax.tree.map(lambda g: ct[0] * g, grads), None, None))
    return loss_fn


def make_eval_fn(model: Transformer, cfg: PipelineConfig, mesh: Mesh, rules: Any, block_shardings: Any) -> Callable:
    """``eval(params, tokens_BxT1) -> mean next-token cross-entropy`` (nats) through the pipelined blocks,
    without router losses, as ``train_step.make_eval_step``; ``model`` deterministic."""
    forward = _Pipelined(model, cfg, mesh, rules, block_shardings).forward
    return lambda params, tokens_BxT1: forward(params, tokens_BxT1, None)[0]


class _Pipelined:
    """The pipelined model's pieces: one stage's chunk, the GPipe/circular forward, the 1F1B gradients."""

    def __init__(self, model: Transformer, cfg: PipelineConfig, mesh: Mesh, rules: Any, block_shardings: Any):
        stages = mesh.shape["pipe"]
        self.model, self.block_shardings, self.stages = model, block_shardings, stages
        self.micro, self.rounds = microbatches(cfg, stages), repeats(cfg)
        self.chunk = block_stack(
            model.cfg, model.deterministic, length=scan_length(model.cfg) // (stages * self.rounds)
        )
        act = nn.logical_to_mesh_axes(("batch", "seq", "embed"), rules)
        self.state_spec = NamedSharding(mesh, PartitionSpec("pipe", *act))
        self.ring_spec = NamedSharding(mesh, PartitionSpec(None, *act))

    def stage(self, w_CxZ, x_bxTxD, rng, positions_T):
        """One chunk on one micro-batch: ``(y_bxTxD, (router_loss, stats))``, the weighted router losses
        of the chunk's MoE layers summed and their ``moe.telemetry`` (0 and {} for a dense model)."""
        positions_bxT = jnp.broadcast_to(positions_T, x_bxTxD.shape[:2])  # the same for every row
        (y_bxTxD, _), sown = self.chunk.apply(
            {"params": w_CxZ}, x_bxTxD, positions_bxT, None, rngs={"dropout": rng}, mutable=[moe.COLLECTION]
        )
        return y_bxTxD, (moe.loss(sown), moe.telemetry(sown))

    def forward(self, params, tokens_BxT1, rng):
        """``(cross-entropy, router loss, router stats)`` through the GPipe (or circular) loop."""
        model, micro, stages, rounds = self.model, self.micro, self.stages, self.rounds
        rng = jax.random.PRNGKey(0) if rng is None else rng
        inputs_BxT, targets_BxT, positions_T = ordered(tokens_BxT1)
        rngs = {"dropout": jax.random.fold_in(rng, 0)}
        positions_BxT = jnp.broadcast_to(positions_T, inputs_BxT.shape)
        x_BxTxD = model.apply({"params": params}, inputs_BxT, positions_BxT, method="embed", rngs=rngs)
        x_MxbxTxD = jax.lax.with_sharding_constraint(to_micro(x_BxTxD, micro), self.ring_spec)
        w = jax.tree.map(lambda w, s: _stage_layout(w, s, stages, rounds), params["blocks"], self.block_shardings)

        def stage_in_round(w_RxCxZ, round_, x_bxTxD, rng):
            return self.stage(jax.tree.map(lambda w: w[round_], w_RxCxZ), x_bxTxD, rng, positions_T)

        table_IxP = work_items(stages, micro, rounds)
        y_MxbxTxD, aux_RxP = run_stages(
            stage_in_round, w, x_MxbxTxD, table_IxP, self.state_spec, jax.random.fold_in(rng, 1)
        )
        y_BxTxD = y_MxbxTxD.swapaxes(0, 1).reshape(x_BxTxD.shape)
        ce = model.apply({"params": params}, y_BxTxD, targets_BxT, method="loss")[0]
        return (ce, *router_terms(aux_RxP))

    def loss_and_grads_1f1b(self, params, tokens_BxT1, rng):
        """``((loss, stats), grads)`` by :func:`run_1f1b`: embedding and head with the loss per
        micro-batch at the two ends of the pipe, the stages' chunks between them."""
        model, micro = self.model, self.micro
        rng = jax.random.PRNGKey(0) if rng is None else rng
        inputs_BxT, targets_BxT, positions_T = ordered(tokens_BxT1)
        inputs_MxbxT, targets_MxbxT = to_micro(inputs_BxT, micro), to_micro(targets_BxT, micro)
        positions_bxT = jnp.broadcast_to(positions_T, inputs_MxbxT.shape[1:])
        blocks, rest = params["blocks"], {k: v for k, v in params.items() if k != "blocks"}

        def first(m):
            def embed(rest):
                rngs = {"dropout": jax.random.fold_in(jax.random.fold_in(rng, 0), m)}
                return model.apply(
                    {"params": {**rest, "blocks": blocks}}, inputs_MxbxT[m], positions_bxT, method="embed", rngs=rngs
                )

            return jax.vjp(embed, rest)

        def last(m, y_bxTxD):
            def loss(rest, y_bxTxD):
                variables = {"params": {**rest, "blocks": blocks}}
                return model.apply(variables, y_bxTxD, targets_MxbxT[m], method="loss")[0] / micro

            loss_m, (g_rest, dy_bxTxD) = jax.value_and_grad(loss, argnums=(0, 1))(rest, y_bxTxD)
            return loss_m, g_rest, dy_bxTxD

        w = jax.tree.map(lambda w, s: _stage_layout(w, s, self.stages, 1)[0], blocks, self.block_shardings)
        stage_at = functools.partial(self.stage, positions_T=positions_T)
        ce, aux_1xP, g_rest, g_w = run_1f1b(
            stage_at, w, _Ends(first, last), micro, self.stages, self.state_spec, jax.random.fold_in(rng, 1)
        )
        router, stats = router_terms(aux_1xP)
        g_blocks = jax.tree.map(lambda g, w: g.reshape(w.shape), g_w, blocks)
        return (ce + router, stats), {**g_rest, "blocks": g_blocks}


def ordered(tokens_BxT1: Array) -> tuple[Array, Array, Array]:
    """``tokens_BxT1 -> (inputs_BxT, targets_BxT, positions_T)``; under context parallelism in zig-zag
    order, in which the whole loss runs (the mean does not mind)."""
    inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    order_T = attention.zigzag_order(inputs_BxT.shape[1], attention.sequence_shards())
    if order_T is None:
        return inputs_BxT, targets_BxT, jnp.arange(inputs_BxT.shape[1])
    return inputs_BxT[:, order_T], targets_BxT[:, order_T], jnp.asarray(order_T)


def to_micro(x_BxZ: Array, micro: int) -> Array:
    """``[B, ...] -> [M, B/M, ...]``: rows i*M + m form micro-batch m (each device's rows split locally)."""
    return x_BxZ.reshape(x_BxZ.shape[0] // micro, micro, *x_BxZ.shape[1:]).swapaxes(0, 1)
