"""XLA's float32 matmul rate on this host, beside the nominal CPU peak that CPU MFU figures divide by.

    python bench/cpu_matmul.py [--size 2048] [--repeats 10]

Times a jitted ``[n, n] x [n, n]`` float32 matmul on every CPU core (one JAX device), the best of
``--repeats`` runs after a warm-up, and prints one JSON line: FLOP/s measured, the nominal figure
(``jaxllm.model.flops.PEAK_FLOPS["cpu"]``) and their ratio. On a shared machine the rate is a lower
bound.
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

from jaxllm.model import flops


def best_seconds(n: int, repeats: int) -> float:
    a_NxN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b_NxN = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a_NxN, b_NxN).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a_NxN, b_NxN).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    seconds = best_seconds(args.size, args.repeats)
    rate = 2 * args.size**3 / seconds
    nominal = flops.PEAK_FLOPS["cpu"]
    print(
        json.dumps(
            {
                "bench": "cpu_matmul",
                "size": args.size,
                "best_s": round(seconds, 4),
                "flops_per_s": float(f"{rate:.3g}"),
                "nominal": nominal,
                "ratio": round(rate / nominal, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
