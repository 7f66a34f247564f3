"""How the model is spread over devices: one mesh, one table of logical-axis rules.

The model names its axes (``batch``, ``seq``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``,
``vocab``, ``layers``, and ``q_seq`` / ``kv_seq`` for the positions of queries and keys); :func:`rules`
maps each name to mesh axes (``data``, ``fsdp``, ``tensor``, ``pipe``, and ``context`` when
``mesh.context > 1``). A rule is skipped when its mesh axis is already used by an earlier name of the same array,
so ``embed -> fsdp`` shards weights (FSDP / ZeRO-3) but not activations, whose ``batch`` already
took ``fsdp``. Changing the parallel plan is editing :data:`DEFAULT_RULES` or ``mesh.rules``.

Mesh axes are ``Auto``: the model is written once, with logical constraints as hints, and XLA's
SPMD partitioner inserts the collectives. (``Explicit`` axes would make every intermediate's
sharding part of its type and force the model to spell out resharding, i.e. to know the mesh.)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.core.config import MeshConfig, ModelConfig
from jaxllm.core.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "pipe")
CONTEXT = "context"  # the context-parallel axis, in the mesh only when mesh.context > 1
EXPERT = "expert"  # the expert-parallel axis, in the mesh only when mesh.expert > 1
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("seq", None),  # the residual stream's positions (split by sequence and context parallelism)
    ("q_seq", None),  # positions of queries, MLP hidden, logits (split by context parallelism only)
    ("kv_seq", None),  # positions of keys and values: whole on every device (context parallelism gathers them)
    ("embed", "fsdp"),
    ("embed_rows", None),  # the embedding tables' width where rows are looked up: gathered first
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("expert", None),  # the experts of an MoE block (jaxllm.model.moe): their weights' leading dimension
)


def rules(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules for this mesh config: defaults, sequence parallelism, then overrides."""
    table = dict(DEFAULT_RULES)
    if cfg.sequence_parallel:
        table["seq"] = "tensor"
    if cfg.context != 1:
        table["seq"] = (CONTEXT, "tensor") if cfg.sequence_parallel else CONTEXT
        table["q_seq"] = CONTEXT
    if cfg.expert != 1:  # experts split over `expert`; outside MoE blocks it is one more data axis
        table["expert"] = EXPERT
        table["batch"] = BATCH_AXES + (EXPERT,)
    if cfg.pipe != 1:  # each pipeline stage stores its own slice of the stacked blocks
        table["layers"] = "pipe"
    for name, axes in (cfg.rules or {}).items():
        if name not in table:
            raise ConfigError(f"mesh.rules: unknown logical axis {name!r}; known: {', '.join(table)}")
        flat = [axes] if isinstance(axes, str) or axes is None else list(axes)
        bad = [a for a in flat if a is not None and a not in mesh_axes(cfg)]
        if bad:
            raise ConfigError(
                f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; mesh axes are {', '.join(mesh_axes(cfg))}"
            )
        table[name] = axes if axes is None or isinstance(axes, str) else tuple(axes)
    return tuple(table.items())


def mesh_axes(cfg: MeshConfig) -> tuple[str, ...]:
    """The mesh's axes: ``context`` and ``expert`` only when they split, so meshes without them are as
    they always were."""
    return AXES + ((CONTEXT,) if cfg.context != 1 else ()) + ((EXPERT,) if cfg.expert != 1 else ())


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with one ``-1`` resolved to the remaining devices; checks the product."""
    sizes = {a: getattr(cfg, a) for a in mesh_axes(cfg)}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 and "data" in free:  # data's default -1 yields, so `mesh.fsdp=-1` alone works
        sizes["data"] = 1
        free.remove("data")
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError("mesh sizes must be positive, with at most one -1 (= the remaining devices)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % known:
            fixed = "*".join(f"{a}={v}" for a, v in sizes.items() if v != -1)
            raise ConfigError(
                f"mesh {fixed} = {known} devices does not divide the {n_devices} visible devices "
                f"(mesh.{free[0]}=-1 takes the rest)"
            )
        sizes[free[0]] = n_devices // known
    product = math.prod(sizes.values())
    if product != n_devices:
        plan = "*".join(f"{a}={v}" for a, v in sizes.items())
        raise ConfigError(
            f"mesh {plan} = {product} devices but {n_devices} are visible; make the product {n_devices} "
            "(one axis may be -1)"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    # Like jax.make_mesh, but a torus axis may be split over mesh axes (data=2 fsdp=2 tensor=2 pipe=2 on
    # a v5p-32's 2x2x4 chips), which jax.make_mesh refuses though the mesh is valid
    grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))


def check_divisible(model: ModelConfig, mesh: Mesh, batch_size: int, process_count: int = 1) -> None:
    """Errors for sizes the mesh cannot split, raised before anything compiles."""
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    for key, value in (("n_head", model.n_head), ("n_kv_head", model.n_kv_head), ("d_ff", model.d_ff)):
        if value % t:
            raise ConfigError(f"model.{key}={value} is not divisible by mesh.tensor={t}")
    if model.vocab_size % t:
        padded = -(-model.vocab_size // t) * t
        raise ConfigError(
            f"vocabulary {model.vocab_size} is not divisible by mesh.tensor={t}; pad it with model.vocab_size={padded}"
        )
    if model.d_model % f:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by mesh.fsdp={f}")
    e = mesh.shape.get(EXPERT, 1)
    if model.moe.n_experts % e:
        raise ConfigError(f"model.moe.n_experts={model.moe.n_experts} is not divisible by mesh.expert={e}")
    ways = mesh.shape["data"] * f * e
    if batch_size % ways:
        names = "data*fsdp*expert" if e > 1 else "data*fsdp"
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the data axes {names}={ways}")
    if batch_size % process_count:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")


def check_param_divisible(boxed_tree: Any, mesh: Mesh, rule_table) -> None:
    """Every parameter dimension divides by the mesh axes its logical name maps to, under any rules.

    ``boxed_tree``: ``nn.Partitioned`` leaves, e.g. ``jax.eval_shape`` of ``model.init``. The backstop
    behind :func:`check_divisible` for ``mesh.rules`` overrides, which JAX would reject only at jit time.
    """

    def is_boxed(x) -> bool:
        return isinstance(x, nn.Partitioned)

    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=is_boxed)[0]:
        if not is_boxed(leaf):
            continue
        for dim, name, axes in zip(leaf.value.shape, leaf.names, nn.logical_to_mesh_axes(leaf.names, rule_table)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                raise ConfigError(
                    f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}: its {name!r} dimension "
                    f"{dim} is not divisible by mesh {'*'.join(axes)}={ways}; change mesh.rules or the mesh sizes"
                )


def logical_shardings(boxed_tree: Any, mesh: Mesh, rule_table) -> Any:
    """NamedShardings for a tree of ``nn.Partitioned`` (boxed) leaves, from their logical names."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """Token batches ``[accum?, batch, seq]``: batch over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES, None))


def process_block(sharding_: NamedSharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """Which rows of ``axis`` this process must supply, as ``(index, count)``: the block
    ``[index * n / count, (index + 1) * n / count)`` of ``n = global_shape[axis]``.

    Read from the sharding rather than assumed to be ``(process_index, process_count)``: when the
    batch is replicated across processes (``tensor`` or ``pipe`` spanning hosts) several processes
    need the same rows, and the mesh's device order decides which process holds which block.
    """
    n = global_shape[axis]
    spans = {
        (i[axis].start or 0, n if i[axis].stop is None else i[axis].stop)
        for i in sharding_.addressable_devices_indices_map(global_shape).values()
    }
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != hi - lo or n % (hi - lo) or lo % (hi - lo):
        raise ConfigError(
            f"this process's devices hold rows {sorted(spans)} of the batch, not one block; "
            "order the mesh so each host's devices are adjacent on the data axes"
        )
    return lo // (hi - lo), n // (hi - lo)


def _zero1(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """Adds the data axes to the first dimension that can take them (ZeRO-1 optimizer state)."""
    mesh, spec = sharding.mesh, list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    used = {a for s in spec if s for a in ((s,) if isinstance(s, str) else s)}
    extra = tuple(a for a in BATCH_AXES if a not in used and mesh.shape[a] > 1)
    if not extra:
        return sharding
    for i, (dim, s) in enumerate(zip(shape, spec)):
        current = () if s is None else ((s,) if isinstance(s, str) else tuple(s))
        ways = math.prod(mesh.shape[a] for a in current + extra)
        if dim % ways == 0:
            spec[i] = current + extra
            return NamedSharding(mesh, P(*spec))
    return sharding


def fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    """Whether ``sharding`` can lay out an array of ``shape``: no more dimensions than it has, each
    divisible by the mesh axes that split it."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    axes = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
    return len(spec) == len(shape) and all(
        d % math.prod(sharding.mesh.shape[n] for n in names) == 0 for d, names in zip(shape, axes)
    )


def opt_state_shardings(abstract_opt_state, param_shardings, mesh: Mesh, zero1: bool):
    """Shardings of the optimizer state (a tree of shape structs): a leaf whose key path ends in a
    parameter's (Adam's ``mu``/``nu`` of it, under any ``chain``, ``masked`` or ``multi_transform``) like
    that parameter, or ZeRO-1 split when ``zero1``; the rest (step counts, a leaf the parameter's
    sharding does not fit) replicated.

    Matched by key path, not by tree structure as ``optax.tree_map_params`` matches: a masked
    optimizer's frozen leaves hold no state (optax's ``MaskedNode``), so its moments are not
    parameter-shaped trees, and fine-tuning's partitioned optimizers (:func:`jaxllm.sft.peft.masked`)
    would be out of reach."""
    by_key = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    repl = replicated(mesh)

    def pick(path, leaf):
        found = (by_key.get(jax.tree_util.keystr(path[i:])) for i in range(len(path)))  # longest suffix first
        s = next((s for s in found if s is not None), None)
        if s is None or not fits(s, leaf.shape):
            return repl
        return _zero1(s, leaf.shape) if zero1 else s

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def per_device_bytes(tree) -> int:
    """Bytes each device holds of a tree of sharded arrays (the largest shard per leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * x.dtype.itemsize
    return total
