"""Tokenizing chunks of documents in worker processes, results in order, a bounded number in flight.

Each worker owns one core: Hugging Face ``tokenizers`` runs ``encode_batch`` on Rust (rayon)
threads unless ``TOKENIZERS_PARALLELISM=false``, which the workers set before the tokenizer is
loaded (so ``workers=N`` means N cores). One worker encodes in the calling process, so that
``workers=1`` keeps to one core too. Workers start by ``spawn``: a process that already runs JAX's
threads is never forked.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from jaxllm.data import tokenizer as tokenizers

Encoded = tuple[np.ndarray, np.ndarray, int]  # ids with end ids, lengths with end ids, UTF-8 bytes
ONE_CORE = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}

_worker: ChunkEncoder | None = None


class ChunkEncoder:
    """``encode(texts) -> (ids, lengths, nbytes)``: every text's ids followed by the end-of-document
    id, concatenated (``dtype``), each document's length with its end id, and the texts' UTF-8 bytes."""

    def __init__(self, tok: tokenizers.Tokenizer, dtype: str):
        self.tok, self.dtype, self.eod = tok, np.dtype(dtype), tok.eod_id
        self._table: np.ndarray | None = None

    def encode(self, texts: list[str]) -> Encoded:
        tok = self.tok
        if isinstance(tok, tokenizers.ByteTokenizer):
            raw = [t.encode("utf-8") for t in texts]
            flat = np.frombuffer(b"".join(raw), np.uint8)
            return self._with_ends(flat, np.array([len(r) for r in raw], np.int64), len(flat))
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        if isinstance(tok, tokenizers.CharTokenizer):
            return self._with_ends(self._chars("".join(texts)), np.array([len(t) for t in texts], np.int64), nbytes)
        if isinstance(tok, tokenizers.HFTokenizer):
            batch = getattr(tok.tok, "encode_batch_fast", tok.tok.encode_batch)
            ids = [e.ids for e in batch(texts, add_special_tokens=False)]
        else:
            ids = [tok.encode_ordinary(t) for t in texts]
        lengths = np.array([len(i) for i in ids], np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, count=int(lengths.sum()))
        return self._with_ends(flat, lengths, nbytes)

    def _chars(self, text: str) -> np.ndarray:
        if self._table is None:
            self._table = np.full(0x110000, -1, np.int64)  # one slot per Unicode code point
            self._table[[ord(c) for c in self.tok.chars]] = np.arange(len(self.tok.chars))
        ids = self._table[np.frombuffer(text.encode("utf-32-le"), np.uint32)]
        if (ids < 0).any():
            self.tok.encode_ordinary(text)  # raises, naming the character
        return ids

    def _with_ends(self, flat: np.ndarray, lengths: np.ndarray, nbytes: int) -> Encoded:
        ends = np.cumsum(lengths + 1) - 1  # where each document's end id goes
        out = np.empty(len(flat) + len(lengths), self.dtype)
        body = np.ones(len(out), bool)
        body[ends] = False
        out[ends] = self.eod
        out[body] = flat
        return out, lengths + 1, nbytes


def _start_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group: the parent decides
    os.environ.update(ONE_CORE)  # before the tokenizers library starts any thread
    _worker = ChunkEncoder(tokenizers.load(tokenizer_dir), dtype)


def _encode_in_worker(texts: list[str]) -> Encoded:
    assert _worker is not None
    return _worker.encode(texts)


class Pool:
    """``map(chunks)`` encodes chunks of texts on ``workers`` cores and yields their results in order,
    with at most two chunks per worker in flight (memory stays bounded however long the stream)."""

    def __init__(self, tokenizer_dir: str, dtype: str, workers: int):
        self.workers = workers
        self._saved = {k: os.environ.get(k) for k in ONE_CORE}
        if workers == 1:
            os.environ.update(ONE_CORE)
            self._local = ChunkEncoder(tokenizers.load(tokenizer_dir), dtype)
            self._pool = None
        else:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(workers, initializer=_start_worker, initargs=(tokenizer_dir, dtype))

    def map(self, chunks: Iterable[tuple[object, list[str]]]) -> Iterator[tuple[object, Encoded]]:
        """``(tag, texts)`` -> ``(tag, encoded texts)``, in order."""
        if self._pool is None:
            yield from ((tag, self._local.encode(texts)) for tag, texts in chunks)
            return
        pending: deque = deque()
        for tag, texts in chunks:
            pending.append((tag, self._pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * self.workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
