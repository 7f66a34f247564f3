"""Per-device memory of parameters + optimizer state under each parallel plan, on 8 faked CPU devices.

    python bench/sharding_memory.py [--d-model 256] [--n-layer 4]

For each mesh it builds the train step (``trainer.build``), compiles it for abstract inputs (nothing is
allocated) and reports, per device: the bytes of the train state from its shardings (params, Adam's
two moments), the compiled step's argument bytes from XLA's memory analysis (state + token batch),
and its temporaries. A GPT-2-style model whose every sharded dimension divides by 8, so FSDP over 8
should hold 1/8 of the replicated state; only the small bias vectors over heads/MLP stay replicated.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp

from jaxllm.core.config import load_config, resolve
from jaxllm.parallel import sharding
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import trainer

PLANS = {
    "replicated (data=8)": ["mesh.data=8"],
    "ZeRO-1 (data=8)": ["mesh.data=8", "optim.shard_state=true"],
    "FSDP (fsdp=8)": ["mesh.fsdp=8"],
    "tensor=8": ["mesh.tensor=8"],
    "data=2 fsdp=2 tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp=4 tensor=2 +SP": ["mesh.fsdp=4", "mesh.tensor=2", "mesh.sequence_parallel=true"],
}


def measure(model_args: list[str], plan: list[str]) -> dict:
    cfg = load_config(None, model_args + plan)
    cfg = resolve(cfg, cfg.model.vocab_size)
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))
    t = cfg.train
    with setup.context():
        state = ckpt.abstract(jax.eval_shape(setup.init), setup.state_shardings)  # shapes + shardings only
        batch_shape = (t.grad_accum, t.batch_size, t.seq_len + 1)
        batch = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=setup.batch_sharding)
        stats = setup.step.lower(state, batch).compile().memory_analysis()
    return {
        "params": sharding.per_device_bytes(state.params),
        "opt_state": sharding.per_device_bytes(state.opt_state),
        "state": sharding.per_device_bytes(state),
        "compiled_state": stats.argument_size_in_bytes - sharding.per_device_bytes(batch),
        "compiled_temp": stats.temp_size_in_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    args = ap.parse_args()
    model_args = [
        "model.arch=gpt2",
        f"model.n_layer={args.n_layer}",
        f"model.d_model={args.d_model}",
        "model.n_head=8",
        "model.vocab_size=512",
        "train.seq_len=128",
        "train.batch_size=16",
    ]
    rows = {name: measure(model_args, plan) for name, plan in PLANS.items()}
    base = rows["replicated (data=8)"]["state"]
    mib = 2**20
    print(f"gpt2 {args.n_layer}x{args.d_model}, vocab 512, 8 faked CPU devices; per-device MiB")
    print(f"{'mesh':<24}{'params':>9}{'opt state':>11}{'state':>9}{'compiled':>10}{'temp':>9}{'x repl.':>9}")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['params'] / mib:>9.3f}{r['opt_state'] / mib:>11.3f}{r['state'] / mib:>9.3f}"
            f"{r['compiled_state'] / mib:>10.3f}{r['compiled_temp'] / mib:>9.3f}{r['state'] / base:>9.4f}"
        )
    fsdp = rows["FSDP (fsdp=8)"]
    ratio = fsdp["compiled_state"] / rows["replicated (data=8)"]["compiled_state"]
    print(f"FSDP over 8 holds {ratio:.4f} of the replicated state per device (ideal 0.125; target within 5%)")
    summary = {
        "bench": "sharding_memory",
        "model": f"gpt2 {args.n_layer}x{args.d_model}",
        "per_device_state_bytes": {name: r["compiled_state"] for name, r in rows.items()},
        "fsdp8_over_replicated": round(ratio, 5),
        "fsdp8_within_5pct_of_one_eighth": abs(ratio / 0.125 - 1) <= 0.05,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
