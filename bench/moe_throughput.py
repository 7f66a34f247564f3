"""Training tokens/s of a mixture of experts, dropless vs capacity, against the dense model of equal
active weights, on one device of whatever backend JAX finds.

    python bench/moe_throughput.py [--steps 10] [--repeats 2] [--config configs/moe_tiny.yaml] [--expert N]

Three variants of the config, each the trainer's own jitted step (``trainer.build``, one device) on
fixed random tokens: ``dropless`` (``capacity_factor=0``: sorted assignments, ``jax.lax.ragged_dot``),
``capacity`` (``capacity_factor=--capacity-factor``: ``[E, C, D]`` buffers, a batched matmul) and
``dense`` (``n_experts=0`` and ``d_ff = top_k x`` the expert width: the same weights per token, less
the router). One step compiles, then ``--steps`` timed steps, best of ``--repeats``. Reported: tokens
per wall second, and tokens per CPU second of this process (the fair figure on a shared CPU; on an
accelerator the wall figure is the one to read), and MFU on active weights. Prints a table, then one
JSON line. Set ``JAX_PLATFORMS=cpu`` to measure the CPU where an accelerator is present.

``--expert N`` adds both MoE paths under expert parallelism, ``mesh.expert=N`` on N devices (N faked
devices on a CPU, all on the same cores: their tokens per CPU second against one device's show what
the exchange costs, padded dropless buffers included); MFU is then per device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import load_config, resolve
from jaxllm.model import flops, moe
from jaxllm.parallel import sharding
from jaxllm.train import trainer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256  # the byte tokenizer's


def variants(config: str, capacity_factor: float) -> dict[str, list[str]]:
    cfg = load_config(str(ROOT / config), [])
    m = resolve(cfg, VOCAB).model
    return {
        "dropless": ["model.moe.capacity_factor=0"],
        "capacity": [f"model.moe.capacity_factor={capacity_factor}"],
        "dense": ["model.moe.n_experts=0", f"model.d_ff={m.moe.top_k * moe.expert_width(m)}"],
    }


def measure(config: str, overrides: list[str], steps: int, repeats: int) -> dict:
    cfg = load_config(str(ROOT / config), ["mesh.data=1", "mesh.expert=1", "mesh.fsdp=1", *overrides])
    cfg = resolve(cfg, VOCAB)
    model_cfg = cfg.model
    n_devices = cfg.mesh.expert
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices]))
    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, VOCAB, (t.grad_accum, t.batch_size, t.seq_len + 1))
    with setup.context():
        batch = jax.device_put(jnp.asarray(tokens, jnp.int32), setup.batch_sharding)
        state, metrics = setup.step(setup.init(), batch)  # compiles
        jax.block_until_ready(metrics)
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                state, metrics = setup.step(state, batch)
            jax.block_until_ready(metrics)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    n_tokens = steps * t.grad_accum * t.batch_size * t.seq_len
    tok_s = n_tokens / min(walls)
    peak = flops.peak_flops(jax.devices()[0], cfg.log.peak_flops)
    counts = flops.param_counts(model_cfg)
    return {
        "tok_s": tok_s,
        "tok_per_cpu_s": n_tokens / min(cpus),
        "mfu": flops.mfu(tok_s / n_devices, model_cfg, t.seq_len, peak),
        "params": counts["total"],
        "active": counts["active"],
        "dropped": float(np.mean(metrics.get("moe_dropped", 0.0))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", default="configs/moe_tiny.yaml")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--expert", type=int, default=1, help="also run both MoE paths with mesh.expert=N on N devices")
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", max(args.expert, 1))  # the CPU backend's devices, if it is the one used
    runs = variants(args.config, args.capacity_factor)
    if args.expert > 1:
        runs |= {
            f"{name}_expert{args.expert}": runs[name] + [f"mesh.expert={args.expert}"]
            for name in ("dropless", "capacity")
        }
    rows = {name: measure(args.config, o, args.steps, args.repeats) for name, o in runs.items()}
    where = f"one {jax.devices()[0].device_kind} device" + (
        f" ({args.expert} for _expert{args.expert})" if args.expert > 1 else ""
    )
    print(f"{args.config}, {where}, {args.steps} steps, best of {args.repeats}")
    print(f"{'path':<18}{'params':>10}{'active':>10}{'tok/s':>10}{'tok/CPU-s':>11}{'MFU':>8}{'dropped':>9}")
    for name, r in rows.items():
        print(
            f"{name:<18}{r['params']:>10,}{r['active']:>10,}{r['tok_s']:>10.0f}{r['tok_per_cpu_s']:>11.0f}"
            f"{100 * r['mfu']:>7.2f}%{100 * r['dropped']:>8.1f}%"
        )
    print(
        json.dumps(
            {
                "bench": "moe_throughput",
                "config": args.config,
                "device": jax.devices()[0].device_kind,
                "steps": args.steps,
                "capacity_factor": args.capacity_factor,
                "expert": args.expert,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
