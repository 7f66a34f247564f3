"""Per-device peak temporary memory of the train step at long sequences: attention kernels, context
parallelism, pipeline schedules. Compile only (``.lower().compile().memory_analysis()``), on 8 faked
CPU devices: no accelerator needed and no big shape is ever run.

    python bench/long_context.py [--quick] [--max-t 65536] [--speed]

Sections (a small llama: 2 layers, d_model 256, 4 heads of 64, batch 1):
  attention  T = 1k, 4k, 16k (64k with --max-t 65536) under xla vs chunked, one device;
  context    T = 16k, mesh.context = 1, 2, 4, 8 (data = 1), xla and chunked;
  pipeline   T = 1k, P = 4, M = 4P = 16 and 8P = 32 micro-batches of one row, gpipe vs 1f1b (4 layers).
``temp`` is XLA's temporary allocation per device (activations kept for the backward pass and
scratch), the figure the kernels and schedules change; arguments (parameters, optimizer state,
batch) are listed apart. ``--speed`` also runs the T = 1k attention settings and reports tokens per
CPU-second of this process (CPU time, not wall time: other processes share the machine).
Prints a table, the fitted slopes, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from jaxllm.core.config import load_config, resolve
from jaxllm.parallel import sharding
from jaxllm.train import trainer

MODEL = [
    "model.arch=llama",
    "model.n_layer=2",
    "model.d_model=256",
    "model.n_head=4",
    "model.vocab_size=320",
    "train.batch_size=1",
    "optim.warmup_steps=1",
]


def compiled(overrides: list[str], devices: int):
    cfg = load_config(None, MODEL + overrides)
    setup = trainer.build(resolve(cfg, 256), sharding.make_mesh(cfg.mesh, jax.devices()[:devices]))
    batch = jax.ShapeDtypeStruct(
        (1, cfg.train.batch_size, cfg.train.seq_len + 1), np.int32, sharding=setup.batch_sharding
    )
    with setup.context():
        start = time.process_time()
        step = setup.step.lower(jax.eval_shape(setup.init), batch).compile()
        return setup, step, time.process_time() - start


def measure(section: str, overrides: list[str], devices: int, speed: bool = False) -> dict:
    setup, step, compile_s = compiled(overrides, devices)
    mem = step.memory_analysis()
    row = {
        "section": section,
        "settings": " ".join(o.split(".", 1)[1] for o in overrides),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "compile_cpu_s": round(compile_s, 1),
    }
    if speed:
        row["tokens_per_cpu_s"] = tokens_per_cpu_second(setup, step, overrides)
    print(
        f"{section:>9}  {row['settings']:<58} temp {row['temp_bytes'] / 2**20:>10.1f} MiB  "
        f"args {row['argument_bytes'] / 2**20:>7.1f} MiB  compile {compile_s:>5.1f} s"
        + (f"  {row['tokens_per_cpu_s']:.0f} tok/cpu-s" if speed else ""),
        flush=True,
    )
    return row


def tokens_per_cpu_second(setup, step, overrides: list[str], steps: int = 3) -> float:
    seq = int(next(o.split("=")[1] for o in overrides if o.startswith("train.seq_len")))
    with setup.context():
        state = setup.init()
        tokens = jax.device_put(np.zeros((1, 1, seq + 1), np.int32), setup.batch_sharding)
        state, _ = step(state, tokens)  # warm
        jax.block_until_ready(state)
        start = time.process_time()
        for _ in range(steps):
            state, _ = step(state, tokens)
        jax.block_until_ready(state)
        return steps * seq / (time.process_time() - start)


def slope(rows: list[dict], x_key) -> float:
    """Least-squares exponent k of temp ~ x^k over the rows."""
    x = np.log([x_key(r) for r in rows])
    y = np.log([r["temp_bytes"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T up to 4k, context at 4k: a minute")
    ap.add_argument("--max-t", type=int, default=16384)
    ap.add_argument("--speed", action="store_true", help="also run the T=1k attention settings")
    args = ap.parse_args(argv)
    lengths = [t for t in (1024, 4096, 16384, 65536) if t <= (4096 if args.quick else args.max_t)]
    context_t = 4096 if args.quick else 16384
    rows, slopes = [], {}
    for impl in ("xla", "chunked"):
        part = [
            measure("attention", [f"train.seq_len={t}", f"model.attention={impl}"], 1, args.speed and t == 1024)
            for t in lengths
        ]
        slopes[f"attention {impl}: temp ~ T^k"] = slope(part, lambda r: float(r["settings"].split()[0].split("=")[1]))
        rows += part
    for impl in ("xla", "chunked"):
        part = [
            measure(
                "context",
                [f"train.seq_len={context_t}", f"model.attention={impl}", f"mesh.context={c}", "mesh.data=1"],
                c,
            )
            for c in (1, 2, 4, 8)
        ]
        slopes[f"context {impl} T={context_t}: temp ~ c^k"] = slope(
            part, lambda r: float(r["settings"].split("context=")[1].split()[0])
        )
        rows += part
    pipe = ["train.seq_len=1024", "model.n_layer=4", "mesh.pipe=4", "mesh.data=1"]
    for m in (16, 32):
        sizes = [f"pipeline.microbatches={m}", f"train.batch_size={m}"]
        rows += [measure("pipeline", pipe + sizes + [f"pipeline.schedule={s}"], 4) for s in ("gpipe", "1f1b")]
    for name, k in slopes.items():
        print(f"slope  {name}: k = {k:.2f}")
    print(
        json.dumps(
            {
                "bench": "long_context",
                "device": jax.devices()[0].platform,
                "rows": rows,
                "slopes": {k: round(v, 3) for k, v in slopes.items()},
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
