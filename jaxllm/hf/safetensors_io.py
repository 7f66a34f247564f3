"""safetensors files read a block at a time and written a tensor at a time, one file or several with
a ``model.safetensors.index.json`` (the layout ``transformers`` writes above ``max_shard_size``).

A file is an 8-byte little-endian header length, a JSON header (``name: {dtype, shape, data_offsets}``)
and the tensors' bytes, row-major. Reading parses the header and reads only the rows a block needs
(``np.fromfile`` at an offset): the ``safetensors`` package's ``get_slice`` cannot return bfloat16 to
numpy (its numpy backend has no such dtype) and its flax backend puts every slice on a device.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import atomic_write, read_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class Entry:
    """One stored tensor: its file, dtype code, shape and absolute byte offset."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int


def _unreadable(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path} is not a readable safetensors file ({' '.join(why.split())[:200]})")


def header(path: Path) -> dict[str, Entry]:
    """The tensors a safetensors file holds, by name; reads only its header, and checks every entry
    against the file (a known dtype, a span of exactly its shape's bytes, inside the data, no two
    spans overlapping) so that no lying header is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise _unreadable(path, f"header length {n} in a file of {size} bytes")
            tree = json.loads(f.read(n))
        tree.pop("__metadata__", None)
        spans = {k: _span(k, v) for k, v in tree.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _unreadable(path, str(e) or type(e).__name__) from None
    _check_layout(path, spans, size - 8 - n)
    return {k: Entry(path, tree[k]["dtype"], tuple(tree[k]["shape"]), 8 + n + begin) for k, (begin, _) in spans.items()}


def _span(name: str, v: dict) -> tuple[int, int]:
    """The ``[begin, end)`` bytes of one header entry, which must be its shape's bytes in its dtype."""
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}; readable: {', '.join(DTYPES)}")
    ints = [*shape, *offsets]
    if len(offsets) != 2 or not all(type(x) is int and x >= 0 for x in ints):
        raise ValueError(f"tensor {name!r} needs a shape and two data_offsets of integers >= 0")
    begin, end = offsets
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != expected:
        raise ValueError(f"tensor {name!r}: {dtype} {list(shape)} is {expected} bytes but its span is {end - begin}")
    return begin, end


def _check_layout(path: Path, spans: dict[str, tuple[int, int]], data_bytes: int) -> None:
    """Every span inside the file's ``data_bytes``, and no two sharing a byte (a truncated file fails here)."""
    ordered = sorted(spans.items(), key=lambda kv: kv[1])
    for name, (_, end) in ordered:
        if end > data_bytes:
            raise _unreadable(path, f"tensor {name!r} ends at byte {end} of data, past the {data_bytes} the file holds")
    for (a, (_, end_a)), (b, (begin_b, _)) in itertools.pairwise(ordered):
        if begin_b < end_a:
            raise _unreadable(path, f"tensors {a!r} and {b!r} overlap")


def _files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    if pickled:
        raise ConfigError(
            f"{directory} holds only pickled weights ({pickled[0]}); jaxllm never unpickles (it can run code). "
            "Convert them to safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ConfigError(f"{directory} has a config.json but no *.safetensors weights")


def catalog(directory: Path) -> dict[str, Entry]:
    """Every tensor of a checkpoint directory, through its index when it has one, else all its files."""
    index = directory / INDEX
    if not index.is_file():
        return {k: e for f in _files(directory) for k, e in header(f).items()}
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index} has no 'weight_map' of tensor names to file names")
    entries = {}
    for name in sorted(set(weight_map.values())):
        if not (directory / name).is_file():
            raise ConfigError(f"{index} names {name}, which is not in {directory}")
        entries.update(header(directory / name))
    for k, name in weight_map.items():
        if k not in entries or entries[k].path.name != name:
            raise ConfigError(f"{index} puts tensor {k!r} in {name}, which does not hold it")
    return entries


def read_block(e: Entry, block: tuple[slice, ...]) -> np.ndarray:
    """``e[block]`` in its stored dtype, reading only the rows of its first axis the block spans."""
    dtype = np.dtype(DTYPES[e.dtype])
    if not e.shape:
        return np.fromfile(e.path, dtype, count=1, offset=e.start).reshape(())
    start, stop, _ = block[0].indices(e.shape[0])
    row = math.prod(e.shape[1:])
    data = np.fromfile(e.path, dtype, count=(stop - start) * row, offset=e.start + start * row * dtype.itemsize)
    return data.reshape((stop - start, *e.shape[1:]))[(slice(None), *block[1:])]


def _plan(shapes: dict[str, tuple[int, ...]], itemsize: int, cap: int) -> list[list[str]]:
    """Tensor names in files of at most ``cap`` bytes each (a tensor larger than the cap gets its own)."""
    files, size = [[]], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if files[-1] and size + n > cap:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files


def _header_bytes(names: list[str], shapes: dict, code: str, itemsize: int) -> bytes:
    tree, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = math.prod(shapes[name]) * itemsize
        tree[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(tree, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format recommends
    return len(raw).to_bytes(8, "little") + raw


def write(
    directory: Path,
    shapes: dict[str, tuple[int, ...]],
    tensor: Callable[[str], np.ndarray],
    dtype=np.float32,
    max_shard_bytes: int = 5 * 10**9,
    writer: bool = True,
) -> list[str]:
    """Writes the tensors named in ``shapes`` (``tensor(name)`` computes each, in that order, one at a
    time) into ``directory``, in files of at most ``max_shard_bytes`` and an index when there are
    several; only a ``writer`` writes. Files appear whole (written under a temporary name, then
    renamed). Returns the file names."""
    dtype = np.dtype(dtype)
    groups = _plan(shapes, dtype.itemsize, max_shard_bytes)
    names = (
        [SINGLE]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    for name, group in zip(names, groups):
        if not writer:  # the tensors are still computed: gathering one is a collective of every process
            for k in group:
                tensor(k)
            continue
        tmp = directory / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_header_bytes(group, shapes, CODES[dtype], dtype.itemsize))
            for k in group:
                f.write(np.ascontiguousarray(tensor(k), dtype).tobytes())
        tmp.replace(directory / name)
    if writer:
        _write_index(directory, names, groups, shapes, dtype.itemsize)
    return names


def _write_index(directory: Path, names: list[str], groups: list[list[str]], shapes: dict, itemsize: int) -> None:
    index = directory / INDEX
    if len(names) == 1:
        index.unlink(missing_ok=True)  # a stale index would send transformers to files that are gone
        return
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    weight_map = {k: name for name, group in zip(names, groups) for k in group}
    atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def stale(directory: Path, keep: Iterable[str]) -> list[Path]:
    """Weight files in ``directory`` that a new write did not produce (left by an earlier export)."""
    keep = set(keep)
    return [p for p in directory.glob("*.safetensors") if p.name not in keep]
