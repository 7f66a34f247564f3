"""Writing one part's token shards: ``<split>-<part>-<k>.bin`` (ids) and ``.idx`` (document ends).

A shard is written under a temporary name and renamed into place when it is full (at the first
document end past ``shard_tokens``) or when the part ends, so a shard that has its name is whole;
documents never straddle shards. Each shard's sha256 is computed as it is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from jaxllm.core.errors import UserError

END_DTYPE = np.dtype("<u8")  # .idx: each document's end offset (exclusive, end id included) in the shard


def shard_name(split: str, part: int, k: int) -> str:
    return f"{split}-{part:05d}-{k:04d}"


class SplitWriter:
    """One split's shards of one part; :attr:`shards` lists the finished ones (name, tokens,
    documents, sha256 of the .bin and of the .idx)."""

    def __init__(self, root: Path, split: str, part: int, dtype: str, shard_tokens: int):
        self.root, self.split, self.part = root, split, part
        self.dtype, self.shard_tokens = np.dtype(dtype).newbyteorder("<"), shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents: ``ids`` concatenated (end ids included), ``lengths`` per document."""
        ends = np.cumsum(lengths)
        done_docs, done_ids = 0, 0
        while done_docs < len(lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            # documents up to and including the first that reaches the shard's size
            last = int(np.searchsorted(ends[done_docs:] - done_ids, room, side="left")) + done_docs
            last = min(last, len(lengths) - 1)
            stop = int(ends[last])
            self._write(ids[done_ids:stop], ends[done_docs : last + 1] - done_ids)
            done_docs, done_ids = last + 1, stop
            if self._tokens >= self.shard_tokens:
                self.close_shard()

    def _open(self) -> None:
        self._name = shard_name(self.split, self.part, len(self.shards))
        self._tmp = self.root / f".{self._name}.bin.tmp"
        try:
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close_shard or abort)
        except OSError as e:
            raise UserError(f"cannot write {self._tmp}: {e.strerror}") from None
        self._sha, self._tokens, self._ends = hashlib.sha256(), 0, []

    def _write(self, ids: np.ndarray, ends_in_chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self._ends.append(ends_in_chunk + self._tokens)
        self._tokens += len(ids)

    def close_shard(self) -> None:
        """Renames the open shard into place (nothing if none is open)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        ends = np.concatenate(self._ends).astype(END_DTYPE).tobytes()
        idx_tmp = self.root / f".{self._name}.idx.tmp"
        idx_tmp.write_bytes(ends)
        os.replace(idx_tmp, self.root / f"{self._name}.idx")
        os.replace(self._tmp, self.root / f"{self._name}.bin")
        self.shards.append(
            {
                "name": self._name,
                "tokens": self._tokens,
                "documents": len(ends) // END_DTYPE.itemsize,
                "sha256": self._sha.hexdigest(),
                "idx_sha256": hashlib.sha256(ends).hexdigest(),
            }
        )

    def abort(self) -> None:
        """Removes the shard being written (an error or an interruption stopped the part)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
