"""How fast can the Shakespeare step be on this machine? Step time against the matmul ceiling.

    python bench/step_roofline.py [--steps 30] [--repeats 3]

Builds configs/shakespeare_char.yaml's training step exactly as ``train.py`` does, in three plans
timed in the same process (best of ``--repeats`` runs of ``--steps`` steps): one multi-threaded CPU
device with the layer loop scanned (``model.scan_unroll=1``), the same unrolled, and the config's
own plan (``dist.cpu_devices`` devices, one per core, data-parallel, unrolled). The step's FLOPs are
PaLM's count (6N + 12LHQT per token: exactly the step's matmuls; XLA's cost analysis misses the
matmuls it hands to its ynnpack fusions). It then times each matmul shape of the step alone, on one
device and split by rows over the config's devices (forward ``x @ W`` and both backward products),
and takes the fastest rate: at that rate for every FLOP, 2000 steps take the printed floor, before
start-up, compilation, evaluation and elementwise work. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.core import runtime
from jaxllm.core.config import load_config, resolve
from jaxllm.model import flops
from jaxllm.parallel import sharding
from jaxllm.train import trainer
from jaxllm.train.loop import two_in_flight

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare_char.yaml"
VOCAB = 65  # tiny Shakespeare's characters
STEPS = 2000  # nanoGPT's README CPU run


def best_time(fn, steps: int, repeats: int) -> float:
    """Best seconds per call of ``fn`` (whose result is blocked on), after one warm-up call; two calls
    in flight at most, as the training loop runs its steps (``jaxllm.train.loop.two_in_flight``)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = two_in_flight(out, fn())
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
    return min(times)


def step_time(devices: list, overrides: list[str], steps: int, repeats: int) -> float:
    """Seconds per training step of the config on ``devices`` (mesh.data = all of them)."""
    cfg = load_config(str(CONFIG), [f"mesh.data={len(devices)}", *overrides])
    cfg = resolve(cfg, VOCAB)
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))
    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, VOCAB, (t.grad_accum, t.batch_size, t.seq_len + 1))
    with setup.context():
        batch = jax.device_put(jnp.asarray(tokens, jnp.int32), setup.batch_sharding)
        box = [setup.init()]

        def one():
            box[0], metrics = setup.step(box[0], batch)
            return metrics

        return best_time(one, steps, repeats)


def matmul_rates(tokens: int, d: int, d_ff: int, devices: list, repeats: int) -> dict[str, float]:
    """GFLOP/s of each [m, k] @ [k, n] product of a block (forward and both backward products),
    on one device and with the rows split over ``devices``."""
    mesh = jax.make_mesh((len(devices),), ("rows",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
    rates = {}
    for k, n in ((d, 3 * d), (d, d), (d, d_ff), (d_ff, d)):
        for name, (m_, k_, n_) in {"fwd": (tokens, k, n), "dx": (tokens, n, k), "dW": (k, tokens, n)}.items():
            a = np.random.default_rng(0).standard_normal((m_, k_)).astype(np.float32)
            b = np.random.default_rng(1).standard_normal((k_, n_)).astype(np.float32)
            for where, (sa, sb) in {
                "1 device": (None, None),
                f"{len(devices)} devices": (NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())),
            }.items():
                xa = jax.device_put(a, sa if sa else devices[0])
                xb = jax.device_put(b, sb if sb else devices[0])
                f = jax.jit(jnp.matmul)
                seconds = best_time(lambda f=f, xa=xa, xb=xb: f(xa, xb), 50, repeats)
                rates[f"{name} {m_}x{k_}x{n_}, {where}"] = 2 * m_ * k_ * n_ / seconds / 1e9
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(str(CONFIG), [])
    runtime.init_process(cfg)  # before JAX starts
    devices = jax.devices()
    cfg = resolve(cfg, VOCAB)
    model_cfg = cfg.model
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    step_flops = flops.flops_per_token(model_cfg, cfg.train.seq_len) * tokens_per_step
    plans = {
        "1 device, scanned": step_time(devices[:1], ["model.scan_unroll=1"], args.steps, args.repeats),
        "1 device, unrolled": step_time(devices[:1], [], args.steps, args.repeats),
        f"{len(devices)} devices, unrolled": step_time(devices, [], args.steps, args.repeats),
    }
    rates = matmul_rates(tokens_per_step, model_cfg.d_model, model_cfg.d_ff, devices, args.repeats)
    best_rate = max(rates.values())
    floor_s = step_flops / (best_rate * 1e9)
    print(
        f"{os.cpu_count()} cores, {len(devices)} CPU devices; {step_flops / 1e9:.2f} GFLOP per step "
        "(PaLM: 6N + 12LHQT per token)"
    )
    for name, rate in rates.items():
        print(f"  matmul {name:<34}{rate:8.1f} GFLOP/s")
    print(f"{'':28}{'ms/step':>9}{'GFLOP/s':>9}{'2000 steps, s':>15}")
    for name, seconds in (*plans.items(), ("best-matmul floor", floor_s)):
        print(f"{name:<28}{1000 * seconds:9.2f}{step_flops / seconds / 1e9:9.1f}{STEPS * seconds:15.1f}")
    print(
        json.dumps(
            {
                "bench": "step_roofline",
                "step_gflop": step_flops / 1e9,
                "ms_per_step": {k: 1000 * v for k, v in plans.items()},
                "best_matmul_gflops": best_rate,
                "floor_ms": 1000 * floor_s,
                "floor_2000_steps_s": STEPS * floor_s,
            }
        )
    )


if __name__ == "__main__":
    main()
