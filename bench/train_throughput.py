"""Training tokens/s and MFU of the shipped configs that fit a 2-core CPU, one device.

    python bench/train_throughput.py [--steps 20] [--repeats 2]

For each config: ``trainer.build`` its step exactly as ``train.py`` would (single device), one step to
compile, then ``--steps`` timed steps on fixed random tokens of the config's vocabulary, best of
``--repeats``. MFU = tokens/s x PaLM's training FLOPs per token / the device peak of ``jaxllm.model.flops``
(2.5e11 FLOP/s for a CPU). The CPU is shared with other work, so figures are noisy lower bounds.
Prints a table, then one JSON line.
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

from jaxllm.core.config import load_config, resolve
from jaxllm.model import flops
from jaxllm.parallel import sharding
from jaxllm.train import trainer

ROOT = Path(__file__).resolve().parents[1]
# Vocabulary of each config's tokenizer on its corpus (byte: 256; tiny Shakespeare's characters: 65).
CONFIGS = {"configs/tiny.yaml": 256, "configs/shakespeare_char.yaml": 65}


def measure(path: str, vocab: int, steps: int, repeats: int) -> dict:
    cfg = load_config(str(ROOT / path), ["mesh.data=1"])
    cfg = resolve(cfg, vocab)
    model_cfg = cfg.model
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, vocab, (t.grad_accum, t.batch_size, t.seq_len + 1))
    with setup.context():
        batch = jax.device_put(jnp.asarray(tokens, jnp.int32), setup.batch_sharding)
        state = setup.init()
        state, metrics = setup.step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = setup.step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    tok_s = steps * t.grad_accum * t.batch_size * t.seq_len / min(times)
    peak = flops.peak_flops(jax.devices()[0], cfg.log.peak_flops)
    return {
        "config": path,
        "params": flops.param_counts(model_cfg)["total"],
        "tokens_per_step": t.batch_size * t.seq_len,
        "tok_s": tok_s,
        "mfu": flops.mfu(tok_s, model_cfg, t.seq_len, peak),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows = [measure(path, vocab, args.steps, args.repeats) for path, vocab in CONFIGS.items()]
    print(f"single {jax.devices()[0].device_kind} device, float32, {os.cpu_count()} cores (shared)")
    print(f"{'config':<32}{'params':>10}{'tok/step':>10}{'tok/s':>10}{'MFU':>8}")
    for r in rows:
        print(
            f"{r['config']:<32}{r['params']:>10,}{r['tokens_per_step']:>10}{r['tok_s']:>10.0f}{100 * r['mfu']:>7.2f}%"
        )
    print(json.dumps({"bench": "train_throughput", "rows": rows}))


if __name__ == "__main__":
    main()
