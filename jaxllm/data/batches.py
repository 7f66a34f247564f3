"""Training and validation batches read from prepared datasets (:func:`jaxllm.data.open_dataset`).

``TrainData.rows(step, ...)`` is this process's share ``[A, B / processes, T+1]`` of step ``step``'s
global batch: global row ``(step * A + micro) * B + row`` goes to a source by the mixture
(:mod:`jaxllm.data.mixture`), and to that source's next window by its permutation
(:mod:`jaxllm.data.sampling`). Everything is a pure function of ``(seed, step, process)``: a resumed
run and every host of a multi-host run read exactly the rows an uninterrupted single-process run
would, and each process reads only the windows of its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.core.errors import DataError
from jaxllm.data import sampling
from jaxllm.data.mixture import Mixture, shares


@dataclass(frozen=True)
class Source:
    name: str  # as the config names it: metrics.jsonl's key for its epochs
    dataset: Any  # a prepared dataset: windows(split, starts, length), num_tokens(split), tokenizer, eod_id
    weight: float = 1.0


def check_length(source: Source, split: str, seq_len: int) -> None:
    n = source.dataset.num_tokens(split)
    if n < seq_len + 2:
        name = "validation" if split == "val" else split
        raise DataError(
            f"the {name} split of {source.name} has {n} tokens, fewer than train.seq_len+2={seq_len + 2}; "
            "use a larger corpus, a shorter train.seq_len or a different data.val_fraction"
        )


class TrainData:
    """The run's sources, their tokenizer, and the batches of every step."""

    def __init__(self, sources: list[Source], seq_len: int, seed: int):
        for s in sources:
            check_length(s, "train", seq_len)
            check_length(s, "val", seq_len)
        self.sources, self.seq_len, self.seed = sources, seq_len, seed
        self.tokenizer, self.eod_id = sources[0].dataset.tokenizer, sources[0].dataset.eod_id
        self.mixture = Mixture(tuple(s.weight for s in sources), seed)
        self.n_windows = [sampling.num_windows(s.dataset.num_tokens("train"), seq_len) for s in sources]

    @property
    def train_tokens(self) -> int:
        return sum(s.dataset.num_tokens("train") for s in self.sources)

    def rows(self, step: int, accum: int, batch_size: int, process: int = 0, processes: int = 1) -> np.ndarray:
        """This process's rows of step ``step``: int32 ``[accum, batch_size / processes, T+1]``."""
        per = batch_size // processes
        micro_A = step * accum + np.arange(accum)
        slots_AxR = micro_A[:, None] * batch_size + process * per + np.arange(per)
        source_AxR, draw_AxR = self.mixture.assign(slots_AxR)
        out = np.empty((accum, per, self.seq_len + 1), np.int32)
        for i, src in enumerate(self.sources):
            sel = source_AxR == i
            if sel.any():
                starts = sampling.window_starts(draw_AxR[sel], self.n_windows[i], self.seq_len, self.seed, i)
                out[sel] = src.dataset.windows("train", starts, self.seq_len + 1)
        return out

    def epochs(self, steps_done: int, accum: int, batch_size: int) -> dict[str, float]:
        """Epochs of each source's train split read by the first ``steps_done`` steps."""
        draws = self.mixture.draws_before(steps_done * accum * batch_size)
        return {s.name: float(d) / n for s, d, n in zip(self.sources, draws, self.n_windows)}

    def eval_rows(
        self, index: int, n_batches: int, batch_size: int, process: int = 0, processes: int = 1
    ) -> np.ndarray:
        """Batch ``index`` of ``n_batches``: int32 ``[batch_size / processes, T+1]``.

        The ``n_batches * batch_size`` validation windows are each source's share of them (by weight),
        evenly spaced over its validation split, sources one after another."""
        counts = shares([s.weight for s in self.sources], n_batches * batch_size)
        firsts = np.cumsum(counts) - counts  # each source's first row
        per = batch_size // processes
        rows = index * batch_size + process * per + np.arange(per)
        source_R = np.searchsorted(firsts, rows, side="right") - 1
        out = np.empty((per, self.seq_len + 1), np.int32)
        for i, src in enumerate(self.sources):
            sel = source_R == i
            if sel.any():
                last = src.dataset.num_tokens("val") - self.seq_len - 1
                starts = np.linspace(0, last, counts[i]).astype(np.int64)
                out[sel] = src.dataset.windows("val", starts[rows[sel] - firsts[i]], self.seq_len + 1)
        return out

    def prompt_ids(self, n: int) -> list[int]:
        """The first ``n`` validation tokens of the first source (the default sample prompt)."""
        ds = self.sources[0].dataset
        return ds.windows("val", np.zeros(1, np.int64), min(n, ds.num_tokens("val")))[0].tolist()
