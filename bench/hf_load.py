"""Loading a Hugging Face checkpoint: whole-model (every tensor read into host memory, then placed)
vs streaming (:mod:`jaxllm.hf.stream`: each device block read and placed a stored tensor at a time).

    python bench/hf_load.py [--layers 16] [--dir DIR] [--shard-gb 1] [--dtype bfloat16]

The checkpoint is a random LLaMA of Llama-3.2-1B's shape (hidden 2048, MLP 8192, 32 heads, 8 key/value
heads, vocabulary 128256, tied embeddings; 16 layers = 1.24 B parameters) in bfloat16, written once
to ``DIR`` as transformers would (files of at most ``--shard-gb`` GB and an index), one tensor at a
time. Each mode then runs in a fresh subprocess, loading into parameters of ``--dtype`` on the first
device, and reports its CPU time (user + system: the machine is shared, wall time is not the
loader's), wall time, and peak resident memory (``getrusage`` maxrss) above the process's baseline
after imports. On a CPU backend the "device" is host memory too, so both modes include the loaded
parameters themselves; the difference between them is what the loader holds on the side. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import ml_dtypes
import numpy as np

from jaxllm.core.config import ModelConfig
from jaxllm.hf import convert as hf
from jaxllm.hf import layout as hf_layout
from jaxllm.hf import safetensors_io as st
from jaxllm.hf import stream as hf_stream


def llama_1b(layers: int) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        n_layer=layers,
        d_model=2048,
        n_head=32,
        n_kv_head=8,
        d_ff=8192,
        vocab_size=128256,
        max_seq_len=2048,
        tie_embeddings=True,
        rope_theta=500000.0,
    )


def write_checkpoint(m: ModelConfig, directory: Path, shard_gb: float) -> None:
    """A random bfloat16 checkpoint of ``m``, generated and written a tensor at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes, _ = hf_stream.stored_tensors(m, _shapes_only(m))
    rng = np.random.default_rng(0)

    def tensor(name: str) -> np.ndarray:  # uniform, not normal: cheaper, and a load does not care
        return (rng.random(shapes[name], np.float32) * 0.04 - 0.02).astype(ml_dtypes.bfloat16)

    st.write(directory, shapes, tensor, ml_dtypes.bfloat16, int(shard_gb * 1e9))
    (directory / hf.CONFIG).write_text(json.dumps({**hf.hf_config(m), "torch_dtype": "bfloat16"}, indent=2))


def _shapes_only(m: ModelConfig):
    """The params tree with shape-only leaves (``stored_tensors`` needs only shapes to list tensors)."""
    import flax.linen as nn

    return nn.unbox(hf_stream.abstract_params(m))


def load_whole(directory: Path, dtype) -> object:
    """The pre-streaming way: every tensor read whole into host memory, params assembled there, then
    placed on the device."""
    m = hf.read_config(directory)
    entries = st.catalog(directory)
    weights = {k: st.read_block(e, tuple(slice(0, n) for n in e.shape)) for k, e in entries.items()}
    table = hf_layout.sources(m)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_shapes_only(m))
    arrays = []
    for path, leaf in leaves:
        src = table[jax.tree_util.keystr(path)]
        inner = leaf.shape[1:] if hf_layout.is_stacked(jax.tree_util.keystr(path)) else leaf.shape
        full = tuple(slice(0, n) for n in inner)
        if hf_layout.is_stacked(jax.tree_util.keystr(path)):
            value = np.stack([src.to_param(weights[src.tensor(i)], inner, full) for i in range(leaf.shape[0])])
        else:
            value = src.to_param(weights[src.tensor(None)], inner, full)
        arrays.append(value.astype(dtype))
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, arrays))


def run_mode(mode: str, directory: Path, dtype: str) -> dict:
    """Loads once in this process; peak RSS above the baseline taken after imports."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if mode == "whole":
        params = load_whole(directory, np.dtype(dtype))
    else:
        _, params = hf.read(directory, dtype=np.dtype(dtype))
    jax.block_until_ready(params)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        "mode": mode,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round((peak - base) / 2**20, 2),
        "params_gib": round(n_bytes / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="16 = Llama-3.2-1B's depth")
    parser.add_argument("--dir", default="/tmp/jaxllm-bench-hf-llama", help="where the checkpoint is written")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16", help="the loaded parameters' dtype")
    parser.add_argument("--mode", choices=["write", "whole", "stream"], help=argparse.SUPPRESS)  # in this process
    args = parser.parse_args()
    directory = Path(args.dir) / f"layers{args.layers}"
    if args.mode == "write":
        write_checkpoint(llama_1b(args.layers), directory, args.shard_gb)
        return
    if args.mode:
        print(json.dumps(run_mode(args.mode, directory, args.dtype)))
        return

    def child(mode: str) -> str:
        # each in a fresh process: ru_maxrss is a high-water mark that a child inherits from its parent
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--layers",
            str(args.layers),
            "--dir",
            args.dir,
            "--dtype",
            args.dtype,
            "--shard-gb",
            str(args.shard_gb),
        ]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    if not (directory / hf.CONFIG).is_file():
        child("write")
    n_params = sum(int(np.prod(e.shape)) for e in st.catalog(directory).values())
    rows = [json.loads(child(mode).splitlines()[-1]) for mode in ("stream", "whole")]
    print(f"random LLaMA, {n_params / 1e9:.2f} B parameters, bfloat16 checkpoint, loaded as {args.dtype}")
    print(f"{'mode':8} {'cpu s':>7} {'wall s':>7} {'peak RSS GiB':>13} {'params GiB':>11}")
    for r in rows:
        print(f"{r['mode']:8} {r['cpu_s']:7.1f} {r['wall_s']:7.1f} {r['peak_rss_gib']:13.2f} {r['params_gib']:11.2f}")
    print(json.dumps({"params": n_params, "dtype": args.dtype, "modes": rows}))


if __name__ == "__main__":
    main()
