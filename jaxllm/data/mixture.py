"""A weighted mixture of sources: which source every row of every batch comes from.

``data.mixture`` reads ``WEIGHT:SOURCE,WEIGHT:SOURCE,...`` (for example
``0.7:gs://bucket/web,0.3:/data/code``); weights are positive and need not sum to 1. A comma
separates entries only where a weight and its colon follow, so a source may contain commas.

Rows are numbered globally, ``slot = (step * A + micro) * B + row``. Slots come in blocks of
:data:`BLOCK`: each block holds every source's share of the block rounded to whole rows (largest
remainders, so the shares sum to the block), in an order that a seeded permutation of the block's
slots decides afresh for every block. A source's ``d``-th row is therefore known in O(1) from the
slot alone (``blocks before * share + rank within the block``), which keeps a batch a pure function of
``(seed, step, process)``, and over any stretch of rows every source's count stays within one block's
rounding of its weight: tighter than drawing each row independently (binomial).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from jaxllm.core.errors import ConfigError
from jaxllm.data import sampling

BLOCK = 1 << 16  # slots per block: weights are honoured to 1/65536
# entries split at a comma that a weight and its colon follow: a source may hold commas (synthetic:...)
_ENTRY = re.compile(r",(?=\s*(?:[-+]?[\d.]+(?:[eE][-+]?\d+)?|[-+]?inf|nan)\s*:)", re.IGNORECASE)


def parse(spec: str) -> list[tuple[float, str]]:
    """``"0.7:/data/web,0.3:gs://b/code"`` -> ``[(0.7, "/data/web"), (0.3, "gs://b/code")]``."""
    entries = []
    for item in (s.strip() for s in _ENTRY.split(spec)):
        weight, sep, source = item.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not sep or not source.strip() or math.isnan(w):
            raise ConfigError(f"data.mixture entry {item!r} must read WEIGHT:SOURCE, e.g. 0.7:/data/web")
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"data.mixture weight of {source.strip()!r} must be a positive number, got {weight}")
        entries.append((w, source.strip()))
    return entries


def shares(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Each source's rows per block: ``block * w / sum(w)`` rounded by largest remainder (int64)."""
    w = np.asarray(weights, np.float64)
    exact = block * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    rest = block - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


@dataclass(frozen=True)
class Mixture:
    """Slots -> (source, that source's draw count); one source is the identity."""

    weights: tuple[float, ...]
    seed: int
    block: int = BLOCK

    @functools.cached_property
    def share(self) -> np.ndarray:
        return shares(list(self.weights), self.block)

    def assign(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(source, draw)`` of each slot (int64 arrays shaped like ``slots``)."""
        slots = np.asarray(slots, np.int64)
        if len(self.weights) == 1:
            return np.zeros_like(slots), slots
        b, j = np.divmod(slots, self.block)
        source, draw = np.empty_like(slots), np.empty_like(slots)
        for blk in np.unique(b):
            sel = b == blk
            src_K, rank_K = _block(self.share.tobytes(), self.seed, int(blk), self.block)
            source[sel] = src_K[j[sel]]
            draw[sel] = blk * self.share[source[sel]] + rank_K[j[sel]]
        return source, draw

    def draws_before(self, slot: int) -> np.ndarray:
        """How many rows each source supplied to slots ``0 .. slot-1`` (int64 ``[sources]``)."""
        if len(self.weights) == 1:
            return np.array([slot], np.int64)
        b, j = divmod(int(slot), self.block)
        src_K, _ = _block(self.share.tobytes(), self.seed, b, self.block)
        partial = np.bincount(src_K[:j], minlength=len(self.weights))
        return b * self.share + partial


@functools.lru_cache(maxsize=4)
def _block(share_bytes: bytes, seed: int, blk: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``blk``'s source of every slot and each slot's rank among its source's slots in the block."""
    share = np.frombuffer(share_bytes, np.int64)
    bounds = np.cumsum(share)
    position_K = sampling.permute(np.arange(block), block, sampling.key(seed, 0x6D6978, blk))  # "mix"
    src_K = np.searchsorted(bounds, position_K, side="right")
    order = np.argsort(src_K, kind="stable")
    rank_K = np.empty(block, np.int64)
    rank_K[order] = np.arange(block) - (bounds - share)[src_K[order]]
    return src_K, rank_K
