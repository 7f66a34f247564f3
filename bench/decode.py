"""Decode tokens/s with and without the key/value cache, for the default model's shape.

    python bench/decode.py [--new 128 512] [--batch 1 8] [--repeats 2] [--uncached-steps 32] [--context N]

The model is ``configs/tiny.yaml``'s (gpt2 4x128, vocab 256) with a context of prompt + new tokens
(or ``--context`` positions: the cache then holds only the slots the generation can reach, rounded
up to 64, while the uncached path reruns the whole context) and random weights (speed does not
depend on their values). Both paths generate greedily from a
16-token prompt per row. Cached: prefill + ``lax.while_loop`` over the cache
(``jaxllm.model.decode.Decoder``), timed over all new tokens. Uncached: every token reruns the model over
the fixed buffer of the whole context (``decode_full_forward``), so each of its tokens costs the same
and timing its first ``--uncached-steps`` tokens gives its rate at any length. Compile time is
excluded (a warm-up call first); the best of ``--repeats`` runs is kept, as the CPU is shared.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import load_config, resolve_model
from jaxllm.model import decode as gen
from jaxllm.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16


def best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n_new: int, batch: int, repeats: int, uncached_steps: int, context: int = 0) -> dict:
    base = load_config(str(ROOT / "configs" / "tiny.yaml"))
    context = context or PROMPT + n_new
    cfg = resolve_model(dataclasses.replace(base.model, max_seq_len=context), 256, base.train.seq_len)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, PROMPT), jnp.int32))["params"])
    prompts = np.random.default_rng(0).integers(0, 256, (batch, PROMPT)).tolist()

    decoder = gen.Decoder(cfg)
    cached_s = best_seconds(lambda: decoder.run(params, prompts, n_new, temperature=0.0)[0], repeats)

    steps = min(uncached_steps, n_new)
    buf = np.zeros((batch, context), np.int32)
    buf[:, :PROMPT] = prompts
    apply_fn = _apply(model)
    uncached_s = best_seconds(
        lambda: gen.decode_full_forward(
            params,
            jnp.asarray(buf),
            PROMPT,
            jax.random.PRNGKey(0),
            apply_fn=apply_fn,
            n_new=steps,
            temperature=0.0,
            top_k=0,
            top_p=1.0,
        ),
        repeats,
    )
    cached_tps, uncached_tps = batch * n_new / cached_s, batch * steps / uncached_s
    return {
        "new_tokens": n_new,
        "batch": batch,
        "context": context,
        "cache_slots": gen.cache_slots(cfg, PROMPT, n_new),
        "cached_tok_s": cached_tps,
        "uncached_tok_s": uncached_tps,
        "speedup": cached_tps / uncached_tps,
    }


def _apply(model: Transformer):
    def apply(params, tokens_BxS):
        return model.apply({"params": params}, tokens_BxS)

    return apply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--uncached-steps", type=int, default=32)
    ap.add_argument("--context", type=int, default=0, help="the model's context; 0 = prompt + new tokens")
    args = ap.parse_args()
    rows = [measure(n, b, args.repeats, args.uncached_steps, args.context) for n in args.new for b in args.batch]
    print(f"gpt2 4x128 (configs/tiny.yaml), {PROMPT}-token prompts, greedy, {jax.devices()[0].device_kind}")
    print(
        f"{'new tokens':>10}{'batch':>7}{'context':>9}{'slots':>7}"
        f"{'cached tok/s':>14}{'no-cache tok/s':>16}{'speed-up':>10}"
    )
    for r in rows:
        print(
            f"{r['new_tokens']:>10}{r['batch']:>7}{r['context']:>9}{r['cache_slots']:>7}{r['cached_tok_s']:>14.0f}"
            f"{r['uncached_tok_s']:>16.1f}{r['speedup']:>9.1f}x"
        )
    print(json.dumps({"bench": "decode", "rows": rows}))


if __name__ == "__main__":
    main()
