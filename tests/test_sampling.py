"""Sampling: a stateless permutation of windows, epoch by epoch; batches as pure functions of
(seed, step, process); a mixture's draws following its weights; the prefetch thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from jaxllm.core.errors import ConfigError
from jaxllm.data import mixture, sampling
from jaxllm.data.batches import Source, TrainData
from jaxllm.data.prefetch import Prefetcher


class ArrayDataset:
    """A prepared dataset held in memory: each split a token stream (the reader's API, no files);
    ``read`` records the starts of every window read."""

    def __init__(self, train: np.ndarray, val: np.ndarray, eod_id: int = 0):
        self.splits = {"train": np.asarray(train), "val": np.asarray(val)}
        self.eod_id, self.tokenizer = eod_id, None
        self.read: list[int] = []

    def num_tokens(self, split: str) -> int:
        return len(self.splits[split])

    def windows(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        self.read += list(np.asarray(starts))
        return self.splits[split][np.asarray(starts)[:, None] + np.arange(length)].astype(np.int32)


def positional(n_train: int, n_val: int = 200, offset: int = 0) -> ArrayDataset:
    """Token value = its position (plus ``offset``): a row shows where it starts and whence it comes."""
    return ArrayDataset(np.arange(n_train) + offset, np.arange(n_val) + offset)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection_of_its_range(n):
    out = sampling.permute(np.arange(n), n, sampling.key(3, 1, 0))
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_permutations_differ_by_key_and_look_shuffled():
    n = 10_000
    a = sampling.permute(np.arange(n), n, sampling.key(0, 0, 0))
    b = sampling.permute(np.arange(n), n, sampling.key(0, 0, 1))
    assert np.mean(a == b) < 0.01
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no trace of the identity's order


def test_no_window_repeats_before_every_window_was_read_and_epochs_reshuffle():
    n_windows, seq_len = 1000, 8
    starts = sampling.window_starts(np.arange(3 * n_windows), n_windows, seq_len, seed=5, source=0)
    epochs = starts.reshape(3, n_windows) // seq_len
    for e in range(3):
        np.testing.assert_array_equal(np.sort(epochs[e]), np.arange(n_windows))
    assert not np.array_equal(epochs[0], epochs[1])


def test_batches_are_a_pure_function_of_seed_and_step():
    data = TrainData([Source("a", positional(10_000))], seq_len=8, seed=3)
    a, b = data.rows(7, accum=2, batch_size=4), data.rows(7, accum=2, batch_size=4)
    assert a.shape == (2, 4, 9) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.rows(8, accum=2, batch_size=4))
    assert not np.array_equal(a, TrainData([Source("a", positional(10_000))], 8, seed=4).rows(7, 2, 4))
    np.testing.assert_array_equal(a[..., 1:], a[..., :-1] + 1)  # contiguous windows
    assert np.all(a[..., 0] % 8 == 0)  # at window starts


def test_process_slices_concatenate_to_the_global_batch():
    data = TrainData([Source("a", positional(5_000)), Source("b", positional(5_000, offset=10**6))], 8, 0)
    full = data.rows(5, 2, 8)
    parts = [data.rows(5, 2, 8, process=p, processes=4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)


def test_each_process_reads_only_the_windows_of_its_own_rows():
    datasets = [positional(5_000) for _ in range(2)]
    data = TrainData([Source("a", datasets[0]), Source("b", datasets[1])], 8, 0)
    reads = []
    for p in range(4):
        for ds in datasets:
            ds.read.clear()
        rows = data.rows(5, 2, 8, process=p, processes=4)
        reads.append(sorted(datasets[0].read + datasets[1].read))
        assert len(reads[-1]) == rows.shape[0] * rows.shape[1]  # 2 micro-batches x 2 rows, nothing more
    for ds in datasets:
        ds.read.clear()
    data.rows(5, 2, 8)
    assert sorted(s for r in reads for s in r) == sorted(
        datasets[0].read + datasets[1].read
    )  # together: the global batch


def test_one_epoch_of_steps_reads_every_window_once_and_says_so():
    seq_len, batch = 4, 8
    data = TrainData([Source("only", positional(4 * 64 + 1))], seq_len, seed=1)  # 64 windows: 8 steps
    starts = np.concatenate([data.rows(s, 1, batch)[0, :, 0] for s in range(8)])
    np.testing.assert_array_equal(np.sort(starts), np.arange(64) * seq_len)
    assert data.epochs(8, 1, batch) == {"only": 1.0}
    assert data.epochs(12, 1, batch) == {"only": 1.5}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0.7:/a,0:/b", "must be a positive number"),
        ("0.7:/a,-1:/b", "must be a positive number"),
        ("0.7:/a,inf:/b", "must be a positive number"),
        ("/a,/b", "must read WEIGHT:SOURCE"),
        ("0.5:", "must read WEIGHT:SOURCE"),
    ],
)
def test_a_bad_mixture_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        mixture.parse(spec)


def test_mixture_spec_keeps_urls_and_commas_of_sources_whole():
    assert mixture.parse("0.7:gs://bucket/web, 3:/data/code") == [(0.7, "gs://bucket/web"), (3.0, "/data/code")]
    assert mixture.parse("1e-1:synthetic:markov:vocab=4,seed=2,.5:/x") == [
        (0.1, "synthetic:markov:vocab=4,seed=2"),
        (0.5, "/x"),
    ]


def test_mixture_draws_follow_the_weights_within_binomial_tolerance():
    weights = (0.7, 0.2, 0.1)
    mix = mixture.Mixture(weights, seed=0, block=4096)
    n = 3000  # a stretch across a block boundary, not from its start
    source, _ = mix.assign(np.arange(2000, 2000 + n))
    for i, w in enumerate(weights):
        sigma = np.sqrt(n * w * (1 - w))
        assert abs(np.sum(source == i) - n * w) < 3 * sigma, i
    assert 0 < np.sum(source[:100] == 2) < 40  # sources interleave: no long runs of one source


def test_each_source_draws_its_rows_in_order_without_gaps():
    mix = mixture.Mixture((3.0, 1.0), seed=2, block=256)
    source, draw = mix.assign(np.arange(1000))
    for i in range(2):
        np.testing.assert_array_equal(draw[source == i], np.arange(np.sum(source == i)))
    np.testing.assert_array_equal(mix.draws_before(1000), [np.sum(source == 0), np.sum(source == 1)])


def test_every_mixed_source_walks_its_own_permutation():
    seq_len = 4
    data = TrainData([Source("a", positional(4 * 50 + 1), 0.5), Source("b", positional(4 * 50 + 1), 0.5)], seq_len, 0)
    rows = np.concatenate([data.rows(s, 1, 10)[0] for s in range(20)])  # 200 rows: two epochs of each
    source, _ = data.mixture.assign(np.arange(200))
    firsts = []
    for i in range(2):
        first_epoch = rows[source == i, 0][:50]  # the source's first 50 rows, in the run's order
        np.testing.assert_array_equal(np.sort(first_epoch), np.arange(50) * seq_len)
        firsts.append(first_epoch)
    assert not np.array_equal(*firsts)
    epochs = data.epochs(20, 1, 10)
    assert epochs == {"a": np.sum(source == 0) / 50, "b": np.sum(source == 1) / 50}


def test_validation_rows_are_evenly_spaced_and_split_across_processes():
    data = TrainData([Source("a", positional(1000, n_val=1000))], seq_len=16, seed=0)
    rows = np.concatenate([data.eval_rows(i, 3, 4) for i in range(3)])
    assert rows.shape == (12, 17)
    starts = rows[:, 0]
    assert starts[0] == 0 and starts[-1] == 1000 - 17
    assert np.ptp(np.diff(starts)) <= 1
    halves = [data.eval_rows(1, 3, 4, process=p, processes=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), rows[4:8])


def test_validation_of_a_mixture_takes_each_sources_share():
    data = TrainData([Source("a", positional(1000), 3.0), Source("b", positional(1000, offset=10**6), 1.0)], 16, 0)
    rows = np.concatenate([data.eval_rows(i, 2, 8) for i in range(2)])
    assert np.sum(rows[:, 0] >= 10**6) == 4  # a quarter of 16


def test_prefetcher_returns_each_steps_batch_and_restarts_out_of_order():
    made = []

    def make(step):
        made.append(step)
        return step * 10

    with Prefetcher(make, depth=2) as p:
        assert [p.get(s) for s in (3, 4, 5)] == [30, 40, 50]
        assert p.get(1) == 10 and p.get(2) == 20  # a jump back: restarted there
    assert made[:3] == [3, 4, 5]


def test_prefetcher_builds_ahead_while_the_consumer_works():
    built = threading.Event()

    def make(step):
        if step == 1:
            built.set()
        return step

    with Prefetcher(make, depth=2) as p:
        assert p.get(0) == 0
        assert built.wait(5)  # step 1 was built before anyone asked for it


def test_prefetcher_raises_the_builders_error():
    def make(step):
        if step == 2:
            raise ValueError("bad shard")
        return step

    with Prefetcher(make, depth=2) as p:
        assert p.get(0) == 0 and p.get(1) == 1
        with pytest.raises(ValueError, match="bad shard"):
            p.get(2)


def test_prefetcher_stops_at_its_last_step():
    made = []
    with Prefetcher(lambda s: made.append(s) or s, depth=4, stop=3) as p:
        assert [p.get(s) for s in range(3)] == [0, 1, 2]
        assert p.get(3) == 3  # past the stop: built when asked
    assert sorted(made) == [0, 1, 2, 3]
