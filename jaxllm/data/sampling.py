"""Which windows a training run reads: a seeded permutation of every window, epoch after epoch.

A source's train split is cut into ``n = (tokens - 1) // T`` windows of ``T + 1`` tokens, window
``w`` starting at token ``w * T`` (consecutive windows share one token: the last target of one is
the first input of the next, so every token is a target once per epoch). The ``d``-th window a run
draws from a source is ``permutation(seed, source, epoch)(d mod n)`` with ``epoch = d // n``: no window
repeats before every window was read once, and each epoch walks a new order.

:func:`permute` is a stateless bijection of ``[0, n)``: a Feistel network over the smallest
even-bit domain ``[0, 4^h) >= n`` with cycle walking (an index mapped outside ``[0, n)`` is mapped
again until it lands inside, which keeps the map a bijection of ``[0, n)``). It is vectorised, needs
O(1) memory whatever ``n``, and is a pure function of its key, so any draw of any step can be
computed on its own: resume and every host of a multi-host run see the same windows.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # Luby-Rackoff: 4 rounds make a pseudo-random permutation; 6 leave no visible structure
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def key(*parts: int) -> np.uint64:
    """A 64-bit key from non-negative integers (seed, source, epoch, ...), each part mixed in turn."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix64(np.uint64(h + _GOLDEN) ^ np.uint64(p))
    return np.uint64(h)


def _half_bits(n: int) -> int:
    """``h`` with ``4^h >= n`` (at least 1): each Feistel half holds ``h`` bits."""
    return max(1, (max(n - 1, 1).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, k: np.uint64, h: int) -> np.ndarray:
    mask = np.uint64((1 << h) - 1)
    left, right = x >> np.uint64(h), x & mask
    with np.errstate(over="ignore"):
        for r in range(ROUNDS):
            f = mix64(right ^ mix64(k + np.uint64(r))) & mask
            left, right = right, left ^ f
    return (left << np.uint64(h)) | right


def permute(index: np.ndarray, n: int, k: np.uint64) -> np.ndarray:
    """``index`` (int64, each in ``[0, n)``) through the bijection of ``[0, n)`` keyed by ``k``."""
    x = np.asarray(index, np.uint64).copy()
    h = _half_bits(n)
    todo = np.arange(x.size)
    while todo.size:  # cycle walking: the domain is < 4n, so each index walks fewer than 4 steps on average
        x[todo] = _feistel(x[todo], k, h)
        todo = todo[x[todo] >= np.uint64(n)]
    return x.astype(np.int64)


def num_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` in a split of ``n_tokens`` tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def window_starts(draws: np.ndarray, n_windows: int, seq_len: int, seed: int, source: int) -> np.ndarray:
    """The first token of each of a source's ``draws`` (its 0-based draw counts), int64, same shape."""
    draws = np.asarray(draws, np.int64)
    epoch, within = np.divmod(draws, n_windows)
    out = np.empty_like(draws)
    for e in np.unique(epoch):  # a batch spans at most two epochs unless the split is tiny
        sel = epoch == e
        out[sel] = permute(within[sel], n_windows, key(seed, source, int(e)))
    return out * seq_len
