"""Hugging Face weights straight into sharded parameters, and back out, a tensor at a time.

Import: each parameter is built with ``jax.make_array_from_callback`` under its sharding; the
callback reads from the safetensors files only the block its device holds (:mod:`jaxllm.hf.safetensors_io`)
and maps it through the layout (:mod:`jaxllm.hf.layout`). A stacked parameter ``[L, ...]`` is filled
one layer at a time on the devices (a donated in-place update), so the host never holds more than
one stored tensor, whatever the model's size. Everything is checked (names, shapes, dtypes) from the
files' headers before a byte of weights is read.

Export: each stored tensor is gathered from its parameter's shards alone (all processes take part
in a multi-host gather), and written by process 0.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxllm.core.config import ModelConfig
from jaxllm.core.errors import ConfigError
from jaxllm.hf import layout
from jaxllm.hf import safetensors_io as st
from jaxllm.model.transformer import Transformer


def abstract_params(m: ModelConfig) -> Any:
    """The model's parameters as ``jax.ShapeDtypeStruct`` leaves (boxed with their logical names)."""
    dummy = jnp.zeros((1, m.max_seq_len), jnp.int32)
    return jax.eval_shape(lambda: Transformer(m).init(jax.random.PRNGKey(0), dummy)["params"])


def _check(directory: Path, key: str, src: layout.Source, shape: tuple, entries: dict, m: ModelConfig) -> None:
    """The stored tensor ``src`` names exists for every layer (and expert), with a float dtype and the
    shape config.json implies."""
    expected = src.stored_shape(shape[layout.leading(key, src) :])
    for _, name in layout.pieces(key, src, shape):
        if name not in entries:
            raise ConfigError(f"{directory}: tensor {name!r} is missing for a {m.arch} model")
        e = entries[name]
        if e.dtype not in st.DTYPES:
            raise ConfigError(
                f"{e.path}: tensor {name!r} is {e.dtype}; jaxllm's parameters take floating-point "
                f"weights ({', '.join(st.DTYPES)})"
            )
        if e.shape != expected:
            raise ConfigError(
                f"{directory}: tensor {name!r} is {e.shape} but config.json describes {expected}; "
                "the weights' shapes disagree with config.json"
            )


def _bounding(blocks: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*blocks))


def _reader(src: layout.Source, e: st.Entry, shape: tuple, sharding, lead: int):
    """A ``make_array_from_callback`` callback for ``src`` (of ``shape``; the array has ``lead`` more,
    leading, axes of size 1: a layer, an expert) under ``sharding``. Reads once the bounding box of the
    blocks this process's devices hold (the whole tensor on one host, a part of it on many) and hands
    each device a view of it (the layout only transposes and splits axes: no copies)."""
    indices = [i[lead:] for i in sharding.addressable_devices_indices_map((1,) * lead + shape).values()]
    box = _bounding([src.stored_block(shape, index) for index in indices])
    stored = st.read_block(e, box)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = index[lead:]
        block = src.stored_block(shape, index)
        within = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(block, box))
        return src.to_param(stored[within], shape, index)[(None,) * lead]

    return read


def _layer_sharding(sharding, lead: int):
    """``sharding`` for one piece ``[1, (1,) ...]`` of a stacked parameter: its ``lead`` axes whole."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*(None,) * lead, *tuple(sharding.spec)[lead:]))


@functools.cache
def _zeros(shape: tuple, dtype, sharding):
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.cache
def _cast(dtype, sharding):
    return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


@functools.cache
def _set_layer(sharding):
    def update(stacked_LxS, piece_1xS, start):  # the piece arrives in the checkpoint's dtype: cast on the devices
        return jax.lax.dynamic_update_slice(stacked_LxS, piece_1xS.astype(stacked_LxS.dtype), start)

    return jax.jit(update, out_shardings=sharding, donate_argnums=0)


def _load(key: str, src: layout.Source, shape: tuple, sharding, entries: dict, dtype) -> jax.Array:
    """One parameter, in ``dtype``, read a stored tensor at a time in the checkpoint's dtype."""
    lead = layout.leading(key, src)
    if not lead:
        stored = jax.make_array_from_callback(shape, sharding, _reader(src, entries[src.tensor()], shape, sharding, 0))
        # a copy even when the dtypes agree: on the CPU backend `stored` may alias the read buffer,
        # shared by every device that holds the same block
        param = _cast(np.dtype(dtype), sharding)(stored)
        stored.delete()
        return param
    inner, one = shape[lead:], _layer_sharding(sharding, lead)
    stacked = _zeros(shape, np.dtype(dtype), sharding)()
    for idx, name in layout.pieces(key, src, shape):
        piece = jax.make_array_from_callback((1,) * lead + inner, one, _reader(src, entries[name], inner, one, lead))
        start = tuple(np.int32(i) for i in idx) + (np.int32(0),) * len(inner)
        stacked = _set_layer(sharding)(stacked, piece, start)
        # the CPU backend keeps the read buffer as the piece's own: free it before the next read
        piece.delete()
    return stacked


def load_params(directory: Path, m: ModelConfig, shardings: Any = None, dtype=np.float32, entries=None) -> Any:
    """The model's parameters from a Hugging Face directory's safetensors (``entries``: its
    :func:`safetensors_io.catalog`, if already read), each placed under its leaf of ``shardings`` (a
    tree like the params; default: all on the first device), in ``dtype``."""
    directory = Path(directory)
    boxed = abstract_params(m)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))
    if shardings is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), nn.unbox(boxed))
    table = layout.sources(m)
    entries = st.catalog(directory) if entries is None else entries
    keys = [jax.tree_util.keystr(path) for path, _ in leaves]
    missing = [k for k in keys if k not in table]
    if missing:
        raise ConfigError(f"parameter {missing[0]} of this {m.arch} model has no Hugging Face tensor")
    for k, (_, leaf) in zip(keys, leaves):
        _check(directory, k, table[k], leaf.shape, entries, m)
    arrays = [
        _load(k, table[k], leaf.shape, s, entries, dtype)
        for k, (_, leaf), s in zip(keys, leaves, jax.tree.leaves(shardings))
    ]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _host(x) -> np.ndarray:
    """``x`` whole on this host: a gather of every process's shards when no process holds them all."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def stored_tensors(m: ModelConfig, params: Any) -> tuple[dict[str, tuple], Any]:
    """``(shapes, tensor)``: each Hugging Face tensor's shape, and ``tensor(name)`` that gathers and
    lays out that one tensor from ``params`` (a fused GPT-2 ``c_attn`` from its three parameters).
    Leaves need only a ``shape`` for the shapes (``jax.ShapeDtypeStruct`` will do)."""
    table = layout.sources(m)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    parts: dict[str, list] = {}
    for key, src in table.items():
        for idx, name in layout.pieces(key, src, flat[key].shape):
            parts.setdefault(name, []).append((src.part[0], key, idx))

    def inner_shape(key: str) -> tuple:
        return flat[key].shape[layout.leading(key, table[key]) :]

    shapes = {name: table[p[0][1]].stored_shape(inner_shape(p[0][1])) for name, p in parts.items()}

    def tensor(name: str) -> np.ndarray:
        pieces = []
        for _, key, idx in sorted(parts[name]):
            value = _host(flat[key][idx])
            pieces.append(table[key].to_stored(value, inner_shape(key)))
        return layout.fuse(pieces)

    return shapes, tensor
