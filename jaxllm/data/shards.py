"""A prepared dataset on disk or behind an fsspec URL, and :func:`open_dataset`, its reader.

    DIR/index.json           written last: its presence means the dataset is complete
    DIR/tokenizer.json       the tokenizer (jaxllm's Tokenizer.save format)
    DIR/<split>-<part>-<k>.bin   little-endian token ids (uint16, or uint32 past 65536 ids), every
                                 document followed by the end-of-document id
    DIR/<split>-<part>-<k>.idx   uint64 end offset of each document in the shard
    DIR/parts/               the plan and each finished part's shards (resume, parallel tasks)

A split's stream is the concatenation of its shards in the index's order. Opening checks every
shard's size against the index and that it ends with the end-of-document id; ``verify=True``
also checks every byte against the index's sha256 sums.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from jaxllm.core.errors import DataError
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.shard_writer import END_DTYPE

FORMAT = "jaxllm.tokens.v1"
SPLITS = ("train", "val")
INDEX = "index.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class _Store:
    """Bytes of a dataset's files: local paths (memory-mapped) or an fsspec filesystem (ranged reads)."""

    def __init__(self, location: str):
        self.location = location
        local = location.removeprefix("file://")
        self.fs = None
        if "://" in local:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(location)
            except (ImportError, ValueError) as e:
                raise DataError(f"cannot open {location}: {' '.join(str(e).split())[:200]}") from None
        else:
            self.root = local.rstrip("/") or "/"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _call(self, what: str, fn, *args, raise_missing: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            if raise_missing:
                raise
            raise DataError(f"{self.location}: {what} not found") from None
        except Exception as e:  # noqa: BLE001  (each fsspec filesystem raises its own network errors)
            raise DataError(f"{self.location}: cannot read {what} ({' '.join(str(e).split())[:160]})") from None

    def read(self, name: str, missing_ok: bool = False) -> bytes | None:
        """The file's bytes; None for a missing file with ``missing_ok``."""
        try:
            if self.fs is None:
                return Path(self.path(name)).read_bytes()
            return self._call(name, self.fs.cat_file, self.path(name), raise_missing=True)
        except (FileNotFoundError, NotADirectoryError):
            if missing_ok:
                return None
            raise DataError(f"{self.location}: {name} not found") from None
        except OSError as e:
            raise DataError(f"{self.location}: cannot read {name} ({e.strerror or e})") from None

    def sizes(self) -> dict[str, int]:
        """Every file's size, by name (one listing)."""
        if self.fs is None:
            root = Path(self.root)
            if not root.is_dir():
                raise DataError(f"{self.location}: no such folder")
            return {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
        listing = self._call("the folder", self.fs.ls, self.root, detail=True)
        return {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in listing}

    def ranges(self, name: str, starts: np.ndarray, stops: np.ndarray) -> list[bytes]:
        """Byte ranges ``[start, stop)`` of one file, remotely in one batched request."""
        n = len(starts)
        return self._call(name, self.fs.cat_ranges, [self.path(name)] * n, starts.tolist(), stops.tolist())


class Split:
    """One split's shards: their token and document counts, cumulated."""

    def __init__(self, shards: list[dict]):
        self.names = [s["name"] for s in shards]
        self.sha = [(s["sha256"], s["idx_sha256"]) for s in shards]
        self.sizes = np.array([s["tokens"] for s in shards], np.int64)
        self.token_bounds = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.doc_counts = np.array([s["documents"] for s in shards], np.int64)
        self.doc_bounds = np.concatenate([[0], np.cumsum(self.doc_counts)]).astype(np.int64)


class Dataset:
    """A prepared dataset (see the module docstring); built by :func:`open_dataset`."""

    def __init__(self, store: _Store, index: dict, index_bytes: bytes, tok: tokenizers.Tokenizer):
        self.store, self.index, self.tokenizer = store, index, tok
        self.eod_id: int = index["eod_id"]
        self.fingerprint = hashlib.sha256(index_bytes).hexdigest()
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        self.splits = {name: Split(index["splits"][name]["shards"]) for name in SPLITS}
        self._maps: dict[str, np.ndarray] = {}
        self._ends: dict[str, np.ndarray] = {}

    def num_documents(self, split: str) -> int:
        return int(self._split(split).doc_bounds[-1])

    def num_tokens(self, split: str) -> int:
        """Tokens of the split's stream, end-of-document ids included."""
        return int(self._split(split).token_bounds[-1])

    def document(self, split: str, i: int) -> np.ndarray:
        """Document ``i``'s ids (int32), without its end id."""
        sp = self._split(split)
        if not 0 <= i < sp.doc_bounds[-1]:
            raise IndexError(f"the {split} split has {sp.doc_bounds[-1]} documents; there is no document {i}")
        k = int(np.searchsorted(sp.doc_bounds, i, side="right")) - 1
        ends = self._doc_ends(sp.names[k])
        j = i - int(sp.doc_bounds[k])
        start = int(ends[j - 1]) if j else 0
        return self._slice(sp.names[k], start, int(ends[j]) - 1).astype(np.int32)

    def windows(self, split: str, starts_N: np.ndarray, length: int) -> np.ndarray:
        """``tokens[s : s + length]`` of the split's stream for every start: int32 ``[N, length]``.

        Reads only those tokens (memory-mapped locally, ranged reads remotely), one gather per shard."""
        sp = self._split(split)
        starts_N = np.asarray(starts_N, np.int64)
        if starts_N.size and (starts_N.min() < 0 or starts_N.max() + length > sp.token_bounds[-1]):
            raise IndexError(f"a window of {length} tokens from {starts_N.max()} passes the {split} split's end")
        out_NxL = np.empty((len(starts_N), length), np.int32)
        shard_N = np.searchsorted(sp.token_bounds, starts_N, side="right") - 1
        local_N = starts_N - sp.token_bounds[shard_N]
        inside_N = local_N + length <= sp.sizes[shard_N] if len(sp.sizes) else np.zeros(0, bool)
        for k in np.unique(shard_N[inside_N]):
            rows = np.flatnonzero(inside_N & (shard_N == k))
            out_NxL[rows] = self._gather(sp.names[k], local_N[rows], length)
        for r in np.flatnonzero(~inside_N):  # windows across a shard boundary
            out_NxL[r] = self._across(sp, int(starts_N[r]), length)
        return out_NxL

    def _split(self, split: str) -> Split:
        if split not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.splits[split]

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.memmap(self.store.path(f"{name}.bin"), self.dtype, mode="r")
        return self._maps[name]

    def _doc_ends(self, name: str) -> np.ndarray:
        if name not in self._ends:
            self._ends[name] = np.frombuffer(self.store.read(f"{name}.idx"), END_DTYPE)
        return self._ends[name]

    def _slice(self, name: str, start: int, stop: int) -> np.ndarray:
        if self.store.fs is None:
            return np.asarray(self._map(name)[start:stop])
        size = self.dtype.itemsize
        (raw,) = self.store.ranges(f"{name}.bin", np.array([start * size]), np.array([stop * size]))
        return np.frombuffer(raw, self.dtype)

    def _gather(self, name: str, starts: np.ndarray, length: int) -> np.ndarray:
        if self.store.fs is None:
            return np.lib.stride_tricks.sliding_window_view(self._map(name), length)[starts]
        size = self.dtype.itemsize
        raw = self.store.ranges(f"{name}.bin", starts * size, (starts + length) * size)
        return np.frombuffer(b"".join(raw), self.dtype).reshape(len(starts), length)

    def _across(self, sp: Split, start: int, length: int) -> np.ndarray:
        pieces, pos, stop = [], start, start + length
        while pos < stop:
            k = int(np.searchsorted(sp.token_bounds, pos, side="right")) - 1
            end = min(stop, int(sp.token_bounds[k + 1]))
            pieces.append(self._slice(sp.names[k], pos - int(sp.token_bounds[k]), end - int(sp.token_bounds[k])))
            pos = end
        return np.concatenate(pieces)


def _parse_index(raw: bytes, where: str) -> dict:
    try:
        index = json.loads(raw)
        ok = index["format"] == FORMAT and all(
            isinstance(s["name"], str) and s["tokens"] > 0 and s["documents"] > 0
            for split in SPLITS
            for s in index["splits"][split]["shards"]
        )
        ok = ok and isinstance(index["eod_id"], int) and index["dtype"] in ("uint16", "uint32")
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{where}/{INDEX} is not a jaxllm prepared-dataset index (damaged or another format)")
    return index


def _load_tokenizer(store: _Store, index: dict) -> tokenizers.Tokenizer:
    raw = store.read(tokenizers.FILENAME)
    if hashlib.sha256(raw).hexdigest() != index["tokenizer"]["sha256"]:
        raise DataError(f"{store.location}/{tokenizers.FILENAME} is not the tokenizer the index names; prepare again")
    if store.fs is None:
        return tokenizers.load(store.root)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, tokenizers.FILENAME).write_bytes(raw)
        for name in (tokenizers.CONFIG, tokenizers.SIDE):
            extra = store.read(name, missing_ok=True)
            if extra is not None:
                Path(tmp, name).write_bytes(extra)
        return tokenizers.load(tmp)


def _check_sizes(store: _Store, index: dict, itemsize: int) -> None:
    """Every shard the index names is there with the size it names."""
    sizes = store.sizes()
    for split in SPLITS:
        for s in index["splits"][split]["shards"]:
            for suffix, want in ((".bin", s["tokens"] * itemsize), (".idx", s["documents"] * END_DTYPE.itemsize)):
                have = sizes.get(s["name"] + suffix)
                if have != want:
                    state = "is missing" if have is None else f"is {have} bytes, the index says {want}"
                    raise DataError(
                        f"{store.location}: shard {s['name']}{suffix} {state}: the dataset is damaged; prepare it again"
                    )


def _check_content(ds: Dataset, verify: bool) -> None:
    """Each shard ends with the end-of-document id; with ``verify``, every byte matches its sha256."""
    for split, sp in ds.splits.items():
        for k, name in enumerate(sp.names):
            if verify:
                for suffix, want in zip((".bin", ".idx"), sp.sha[k]):
                    if hashlib.sha256(ds.store.read(name + suffix)).hexdigest() != want:
                        raise DataError(f"{ds.store.location}: shard {name}{suffix} was changed after preparation")
                ends = ds._doc_ends(name)
                if ends[-1] != sp.sizes[k] or (np.diff(ends.astype(np.int64)) <= 0).any():
                    raise DataError(f"{ds.store.location}: shard {name}.idx does not match {name}.bin")
            last = int(sp.sizes[k])
            if int(ds._slice(name, last - 1, last)[0]) != ds.eod_id:
                raise DataError(
                    f"{ds.store.location}: shard {split}/{name}.bin does not end a document; it was changed"
                )


def open_dataset(location: str | Path, verify: bool = False) -> Dataset:
    """The prepared dataset at ``location`` (a folder or an fsspec URL: file://, gs://, s3://, memory://).

    A DataError (one line) if it is incomplete, damaged or does not match its index; ``verify``
    also reads every shard and checks its sha256 (minutes for a large dataset)."""
    store = _Store(str(location))
    raw = store.read(INDEX, missing_ok=True)
    if raw is None:
        if store.read("parts/plan.json", missing_ok=True) is not None:
            raise DataError(f"{location} is an unfinished preparation (no {INDEX}): run its prepare command again")
        raise DataError(
            f"{location} is not a prepared dataset (no {INDEX}); make one with python -m jaxllm.data.prepare"
        )
    index = _parse_index(raw, str(location))
    tok = _load_tokenizer(store, index)
    if tok.eod_id != index["eod_id"] or token_dtype(tok.vocab_size) != index["dtype"]:
        raise DataError(f"{location}/{tokenizers.FILENAME} does not match {INDEX}; prepare the dataset again")
    _check_sizes(store, index, np.dtype(index["dtype"]).itemsize)
    ds = Dataset(store, index, raw, tok)
    for split in SPLITS:
        want = index["splits"][split]
        if (want["tokens"], want["documents"]) != (ds.num_tokens(split), ds.num_documents(split)):
            raise DataError(f"{location}/{INDEX}: the {split} totals do not match its shards; prepare again")
    _check_content(ds, verify)
    return ds


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxllm.data.shards DIR [--verify]``: what a prepared dataset holds."""
    from jaxllm.core.errors import ArgumentParser

    parser = ArgumentParser(prog="python -m jaxllm.data.shards", description=main.__doc__)
    parser.add_argument("location", help="a prepared dataset: a folder or an fsspec URL")
    parser.add_argument("--verify", action="store_true", help="read every shard and check its sha256")
    args = parser.parse_args(argv)
    ds = open_dataset(args.location, verify=args.verify)
    for split in SPLITS:
        print(f"{split}: {ds.num_documents(split):,} documents, {ds.num_tokens(split):,} tokens")
    print(f"tokenizer: {ds.index['tokenizer']['spec']} ({ds.tokenizer.vocab_size} ids, end id {ds.eod_id})")
    print(f"fingerprint: {ds.fingerprint}" + (" (verified)" if args.verify else ""))
    return 0


if __name__ == "__main__":
    from jaxllm.core.errors import exit_on_user_error

    raise SystemExit(exit_on_user_error(main)())
