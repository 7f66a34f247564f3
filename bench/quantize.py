"""Weight-only int8 / int4 against float32 on a trained run: bytes, validation perplexity, decode speed.

    python train.py run.dir=/tmp/inf_base          # the default model
    python bench/quantize.py --run /tmp/inf_base [--group-size 32 64]

Perplexity is exp(mean next-token cross-entropy) over the run's own evaluation windows
(``eval.batches`` x ``train.batch_size`` windows of ``train.seq_len`` tokens of the validation split).
Bytes: all parameters at their storage width (int4 = half a byte; the CPU backend itself keeps one byte
per int4 element), and the matmul weights alone. Decode: cached greedy decoding, batch 1, a 16-token
prompt to the end of the context, best of 3 (the CPU is shared). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
from jaxllm.data import corpus as data_lib
from jaxllm.model import quantize as quant
from jaxllm.model.transformer import cross_entropy


def perplexity(lm: jaxllm.LoadedModel, val: np.ndarray) -> float:
    c, t = lm.config, lm.config.train
    loss = jax.jit(lambda p, b: cross_entropy(lm.module.apply({"params": p}, b[:, :-1]), b[:, 1:])[0])
    losses = [
        float(loss(lm.params, jnp.asarray(data_lib.eval_batch(val, i, c.eval.batches, t.batch_size, t.seq_len))))
        for i in range(c.eval.batches)
    ]
    return math.exp(float(np.mean(losses)))


def decode_tok_s(lm: jaxllm.LoadedModel) -> float:
    prompt = [list(range(32, 48))]
    n_new = lm.config.model.max_seq_len - len(prompt[0])
    lm.decoder.run(lm.params, prompt, n_new, temperature=0.0)[0].block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        lm.decoder.run(lm.params, prompt, n_new, temperature=0.0)[0].block_until_ready()
        times.append(time.perf_counter() - start)
    return n_new / min(times)


def kernel_bytes(params) -> int:
    """Bytes of the matmul weights alone (float kernels or their quantized form)."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
    return sum(quant.storage_bytes(x) for path, x in leaves if getattr(path[-1], "key", None) == "kernel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="/tmp/inf_base")
    ap.add_argument("--group-size", type=int, nargs="+", default=[32, 64])
    args = ap.parse_args()
    variants = [("float32", None, 0), ("int8", "int8", 0)] + [(f"int4 g{g}", "int4", g) for g in args.group_size]
    d = None
    rows = []
    for name, mode, group in variants:
        lm = jaxllm.load(args.run, quantize=mode, group_size=group or 64)
        if d is None:
            d = lm.config.data
            val = data_lib.prepare(d.source, d.tokenizer, d.val_fraction, d.bpe_vocab_size, d.cache_dir).val
        rows.append(
            {
                "variant": name,
                "bytes": quant.storage_bytes(lm.params),
                "matmul_bytes": kernel_bytes(lm.params),
                "ppl": perplexity(lm, val),
                "decode_tok_s": decode_tok_s(lm),
            }
        )
    base = rows[0]
    for r in rows:
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1
    m = lm.config.model
    print(f"{args.run}: {m.arch} {m.n_layer}x{m.d_model}, vocab {m.vocab_size}, {jax.devices()[0].device_kind}")
    print(f"{'variant':<10}{'bytes':>10}{'matmul bytes':>14}{'val ppl':>9}{'change':>9}{'decode tok/s':>14}")
    for r in rows:
        print(
            f"{r['variant']:<10}{r['bytes']:>10,}{r['matmul_bytes']:>14,}{r['ppl']:>9.4f}{100 * r['ppl_change']:>8.2f}%"
            f"{r['decode_tok_s']:>14.0f}"
        )
    print(json.dumps({"bench": "quantize", "run": args.run, "rows": rows}))


if __name__ == "__main__":
    main()
