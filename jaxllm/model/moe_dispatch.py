"""Where an MoE layer's experts run: in place, or per device with the tokens exchanged (expert parallelism).

    tokens split over the batch axes, experts over the expert axes (the rules' ``batch`` and ``expert``)
    -> shard_map over those axes: each device routes its own G_l tokens
    -> rows grouped by the expert shard that holds their expert -> all_to_all over the expert axes
    -> the device's E_l = E / n experts on what it received -> the reverse all_to_all -> back per token

:func:`layout` reads the traced abstract mesh and the logical-axis rules (as splash attention does),
so the model names no mesh axis. Without a mesh, or where no axis splits the tokens or the experts, the
layer runs as on one device. Dropless layers run under the ``shard_map`` whenever the batch is split,
so each device sorts its own G_l * k assignments rather than the global batch's; capacity layers only
when the experts are split, and then each device fills its own capacity (see :func:`layout`).

Dropless needs a static buffer: each device sends every expert shard a ``[G_l * k, D]`` buffer, the
worst case of all its assignments going there, with the true counts beside it (``ragged_all_to_all``,
which sends only the rows, has no CPU lowering in jax 0.10.2). Shape letters beyond moe.py's: n expert
shards, E_l = E / n experts per shard, M = G_l * k assignments of one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

Array = jax.Array


class Layout(NamedTuple):
    """The manual axes of the dispatch: ``tokens`` split the batch rows, ``expert`` (a subset) the experts."""

    tokens: tuple[str, ...]
    expert: tuple[str, ...]
    ways: int  # n: expert shards
    stages: tuple[str, ...]  # the stacked layers' axes: a pipeline runs its stages as a vmap over them


class Exchange(NamedTuple):
    """Wraps an expert MLP that runs on the local experts so that it serves every expert: rows are sent
    to the shard holding their expert and the outputs come back (identity when ``ways`` is 1)."""

    axes: tuple[str, ...] = ()
    ways: int = 1

    def grouped(self, ffn: Callable) -> Callable:
        return ffn if self.ways == 1 else functools.partial(_grouped, ffn=ffn, axes=self.axes, n=self.ways)

    def batched(self, ffn: Callable) -> Callable:
        return ffn if self.ways == 1 else functools.partial(_batched, ffn=ffn, axes=self.axes, n=self.ways)


def _axes(logical: str, mesh) -> tuple[str, ...]:
    """The mesh axes a logical name maps to under the active rules that are Auto here and split (> 1)."""
    spec = nn.logical_to_mesh_axes((logical,))[0]
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    auto = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto}
    return tuple(a for a in names if a in auto and mesh.shape[a] > 1)


def layout(n_rows: int, n_experts: int, dropless: bool) -> Layout | None:
    """How the traced mesh splits this layer's ``n_rows`` batch rows and experts; None: run in place.

    Tokens are split over the batch axes plus any expert axis the batch does not use, so no two devices
    of an expert group send the same tokens. Capacity layers without split experts stay in place: their
    drop order is then global, as on one device; with split experts each device keeps its first
    C_l = ceil(capacity_factor * G_l * k / E) assignments per expert, so drops depend on the split."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.shape:
        return None
    expert = _axes("expert", mesh)
    tokens = _axes("batch", mesh)
    tokens += tuple(a for a in expert if a not in tokens)
    ways, row_ways = (math.prod(mesh.shape[a] for a in axes) for axes in (expert, tokens))
    if n_experts % ways or n_rows % row_ways or row_ways == 1 or (ways == 1 and not dropless):
        return None  # `init` traces one row; the rules' divisibility checks catch real batches
    return Layout(tokens, expert, ways, tuple(a for a in _axes("layers", mesh) if a not in tokens))


def dispatch(experts: Callable, lay: Layout | None, per_token: tuple[Array, ...], params: dict) -> tuple[tuple, Array]:
    """``(outputs, dropped)``: ``experts(per_token_G, params, exchange) -> (outputs_G, dropped)`` on every
    token, under ``lay`` when given. ``per_token``: arrays ``[B, T, ...]``, which ``experts`` sees as
    ``[G, ...]`` and returns as ``[G, ...]`` (given back as ``[B, T, ...]``); ``params``: the expert
    weights, leading dimension E (E_l under ``lay``)."""

    def local(per_token, params, exchange):
        B, T = per_token[0].shape[:2]
        outputs, dropped = experts(tuple(a.reshape(B * T, *a.shape[2:]) for a in per_token), params, exchange)
        return tuple(a.reshape(B, T, *a.shape[1:]) for a in outputs), dropped

    if lay is None:
        return local(per_token, params, Exchange())

    def sharded(per_token, params):
        outputs, dropped = local(per_token, params, Exchange(lay.expert, lay.ways))
        return outputs, jax.lax.pmean(dropped, lay.tokens)  # every device holds as many assignments

    rows, by_expert = P(lay.tokens), jax.tree.map(lambda _: P(lay.expert), params)
    # manual over the stage axes too: under a pipeline's vmap (spmd_axis_name) they split every argument
    return jax.shard_map(
        sharded, in_specs=(rows, by_expert), out_specs=(rows, P()), axis_names=set(lay.tokens + lay.stages)
    )(per_token, params)


def _grouped(x_MxD: Array, group_sizes_E: Array, expert_M: Array, *, ffn: Callable, axes, n: int) -> Array:
    """Dropless exchange. ``x_MxD``: this device's assignments sorted by expert, ``group_sizes_E`` their
    counts; ``ffn(x, group_sizes_El, local_expert)`` runs the local experts. Returns ``y_MxD``, same order."""
    M, D = x_MxD.shape
    sizes_nxEl = group_sizes_E.reshape(n, -1)
    E_l = sizes_nxEl.shape[1]
    count_n = jnp.sum(sizes_nxEl, axis=1)
    shard_M = expert_M // E_l
    slot_M = jnp.arange(M) - (jnp.cumsum(count_n) - count_n)[shard_M]
    send_nxMxD = jnp.zeros((n, M, D), x_MxD.dtype).at[shard_M, slot_M].set(x_MxD)
    recv_nxMxD = jax.lax.all_to_all(send_nxMxD, axes, 0, 0, tiled=True)  # row s: what shard s sent here
    recv_sizes_nxEl = jax.lax.all_to_all(sizes_nxEl, axes, 0, 0, tiled=True)
    # each source's rows come sorted by expert; padding rows get E_l and sort last, outside every group
    ends_nxEl = jnp.cumsum(recv_sizes_nxEl, axis=1)
    steps_nxM1 = jnp.zeros((n, M + 1), jnp.int32).at[jnp.arange(n)[:, None], ends_nxEl].add(1)
    local_nM = jnp.cumsum(steps_nxM1[:, :M], axis=1).reshape(-1)  # how many of a source's groups end at or before a row
    order_nM = jnp.argsort(local_nM, stable=True)
    y_nMxD = ffn(
        recv_nxMxD.reshape(n * M, D)[order_nM],
        jnp.sum(recv_sizes_nxEl, axis=0),
        jnp.minimum(local_nM[order_nM], E_l - 1),
    )
    back_nxMxD = jnp.zeros_like(y_nMxD).at[order_nM].set(y_nMxD).reshape(n, M, -1)
    return jax.lax.all_to_all(back_nxMxD, axes, 0, 0, tiled=True)[shard_M, slot_M]


def _batched(x_ExCxD: Array, *, ffn: Callable, axes, n: int) -> Array:
    """Capacity exchange: expert e's C slots go to the shard holding e, which runs its E_l experts on the
    n * C slots it received (``ffn(x_ElxnCxD)``); the outputs come back in place."""
    E, C, D = x_ExCxD.shape
    recv_nxElxCxD = jax.lax.all_to_all(x_ExCxD.reshape(n, E // n, C, D), axes, 0, 0, tiled=True)
    y_ElxnCxD = ffn(jnp.swapaxes(recv_nxElxCxD, 0, 1).reshape(E // n, n * C, D))
    y_nxElxCxD = jnp.swapaxes(y_ElxnCxD.reshape(E // n, n, C, -1), 0, 1)
    return jax.lax.all_to_all(y_nxElxCxD, axes, 0, 0, tiled=True).reshape(E, C, -1)
