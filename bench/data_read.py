"""Reading training batches from a prepared dataset, and whether the loop ever waits for them.

    python bench/data_read.py [--mb 64] [--batches 200] [--dir DIR]

1. Prepares (once, kept in ``--dir``) a byte-tokenized dataset of ``--mb`` MB of generated text, in
   files of 1 MB (one document each).
2. **Read**: ``TrainData.rows`` for ``--batches`` global batches of 512 windows of 1024 tokens (+1 for
   the targets), one process, as the trainer's prefetch thread builds them: tokens/s (target: at
   least 33M, 10x what a host of 8 H200s consumes for GPT-2 124M). Beside it, the reader's own
   ``windows()`` on the same starts, and the index permutation alone.
3. **Hidden**: the training loop (``jaxllm.train.loop.run``, the trainer's ``batch_at`` through its
   ``Prefetcher``) with a step that computes nothing and waits a fixed time standing in for the
   accelerator, once with ``data.prefetch=0`` and once with 2: seconds per step, and the seconds the
   loop waited for batches (``data_wait_s`` of metrics.jsonl). Prefetching hides the data time when
   a step takes ``step`` and not ``step + data``.

Prints a Markdown table (what bench/results/data-read_*.md records).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH, SEQ = 512, 1024


def make_dataset(folder: Path, mb: int) -> Path:
    """``folder/prepared``: ``mb`` files of 1 MB of lowercase words, prepared with byte tokens."""
    from jaxllm.data.prepare import prepare

    out = folder / "prepared"
    if (out / "index.json").is_file():
        return out
    text_dir = folder / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      \n", np.uint8)
    for i in range(mb):
        (text_dir / f"{i:04d}.txt").write_bytes(alphabet[rng.integers(0, len(alphabet), 1 << 20)].tobytes())
    prepare([str(text_dir)], str(out), tokenizer="byte", val_fraction=0.01, workers=0, progress=False)
    return out


def timed(fn, n: int) -> float:
    """Seconds per call of ``fn(i)`` over ``n`` calls, after one warm-up call."""
    fn(0)
    started = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - started) / n


def read_rates(data, n: int) -> dict:
    from jaxllm.data import sampling

    ds, windows = data.sources[0].dataset, data.n_windows[0]

    def starts(i):
        return sampling.window_starts(np.arange(i * BATCH, (i + 1) * BATCH), windows, SEQ, 0, 0)

    fixed = starts(1)
    return {
        "TrainData.rows (permutation + read)": timed(lambda i: data.rows(i + 1, 1, BATCH), n),
        "dataset.windows alone": timed(lambda i: ds.windows("train", fixed, SEQ + 1), n),
        "permutation alone": timed(starts, n),
    }


def loop_run(data, step_s: float, prefetch: int, steps: int, workdir: Path) -> dict:
    """The training loop over the trainer's batches with a step that waits ``step_s`` seconds."""
    import jax

    from jaxllm.core.config import load_config
    from jaxllm.data.prefetch import Prefetcher
    from jaxllm.parallel import sharding
    from jaxllm.train import loop, trainer
    from jaxllm.train.metrics_log import MetricsLog

    cfg = load_config(None, [f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"data.prefetch={prefetch}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    metrics = {"loss": np.float32(1), "lr": np.float32(0), "grad_norm": np.float32(0), "layer_grad_norms": []}

    def step(state, batch):
        time.sleep(step_s)  # the accelerator's time; the step reads nothing of the batch
        return state, metrics

    log_path = workdir / f"metrics_{prefetch}.jsonl"
    log_path.unlink(missing_ok=True)
    batches = Prefetcher(functools.partial(trainer.batch_at, data, cfg, batch_sh), prefetch, stop=steps)
    log = MetricsLog(log_path, 0, True, None)
    parts = loop.Parts(
        step=step,
        batch_at=batches.get,
        save=lambda s, state: None,
        checkpoint_dir=workdir,
        log=log,
        mfu=lambda tps: 0.0,
        tokens_per_step=BATCH * SEQ,
        context=contextlib.nullcontext,
        progress=False,
        data_stats=functools.partial(trainer.data_stats, data, cfg, batches),
    )
    started = time.perf_counter()
    loop.run(parts, loop.Cadence(steps, steps, 10**9, 10**9), None, 0, None)
    elapsed = time.perf_counter() - started
    batches.close()
    log.close()
    record = [json.loads(line) for line in log_path.read_text().splitlines()][-1]
    return {"s_per_step": elapsed / steps, "wait_per_step": record["data_wait_s"] / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--steps", type=int, default=100, help="loop steps of each hidden-data run")
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "jaxllm-data-read"))
    args = p.parse_args()

    from jaxllm.data.batches import Source, TrainData
    from jaxllm.data.shards import open_dataset

    folder = Path(args.dir)
    started = time.perf_counter()
    path = make_dataset(folder, args.mb)
    ds = open_dataset(str(path))
    data = TrainData([Source(str(path), ds)], SEQ, seed=0)
    print(
        f"dataset: {ds.num_tokens('train') / 1e6:.1f}M train tokens in {path} ({time.perf_counter() - started:.1f} s)"
    )
    print(f"\nglobal batch {BATCH} x {SEQ} tokens, one process\n\n| read | ms / batch | M tokens/s |\n|---|---|---|")
    rates = read_rates(data, args.batches)
    for name, s in rates.items():
        print(f"| {name} | {s * 1e3:.2f} | {BATCH * SEQ / s / 1e6:.1f} |")

    data_s = rates["TrainData.rows (permutation + read)"]
    step_s = max(0.02, 3 * data_s)
    print(f"\nloop with a step that waits {step_s * 1e3:.0f} ms (data {data_s * 1e3:.1f} ms per batch + transfer)\n")
    print("| data.prefetch | ms / step | ms / step waiting for data |\n|---|---|---|")
    for prefetch in (0, 2):
        r = loop_run(data, step_s, prefetch, args.steps, folder)
        print(f"| {prefetch} | {r['s_per_step'] * 1e3:.1f} | {r['wait_per_step'] * 1e3:.2f} |")


if __name__ == "__main__":
    main()
