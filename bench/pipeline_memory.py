"""Per-device parameter memory and compile time of the pipelined train step, for pipe = 1, 2, 4.

    python bench/pipeline_memory.py [section.key=value ...]

Runs on 4 faked CPU devices (no accelerator needed): for each P the mesh is ``pipe=P`` over the
first P devices, M = 2P micro-batches. Each stage should hold 1/P of the block (layer) parameters;
the embedding and final norm stay whole on every stage. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 4)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxllm.core.config import load_config, resolve
from jaxllm.parallel import pipeline, schedule, sharding
from jaxllm.train import trainer

MODEL = [
    "model.n_layer=8",
    "model.d_model=256",
    "model.n_head=8",
    "model.vocab_size=320",
    "train.seq_len=64",
    "train.batch_size=16",
]


def measure(stages: int, overrides: list[str]) -> dict:
    """Parameter bytes on one device (blocks, the rest) and the train step's compile seconds."""
    extra = [f"mesh.pipe={stages}", f"pipeline.microbatches={2 * stages}"]
    cfg = load_config(None, MODEL + extra + overrides)
    cfg = resolve(cfg, cfg.model.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:stages])
    setup = trainer.build(cfg, mesh)
    shape = (1, cfg.train.batch_size, cfg.train.seq_len + 1)
    batch = jax.ShapeDtypeStruct(shape, "int32", sharding=setup.batch_sharding)
    with setup.context():
        params = setup.init().params
        start = time.perf_counter()
        setup.step.lower(jax.eval_shape(setup.init), batch).compile()
        compile_s = time.perf_counter() - start
    blocks = sharding.per_device_bytes(params["blocks"])
    rest = sharding.per_device_bytes({k: v for k, v in params.items() if k != "blocks"})
    m = pipeline.microbatches(cfg.pipeline, stages) if stages > 1 else 1  # pipe=1 does not split the batch
    return {
        "pipe": stages,
        "microbatches": m,
        "block_bytes_per_device": blocks,
        "other_bytes_per_device": rest,
        "total_bytes_per_device": blocks + rest,
        "bubble": schedule.bubble_fraction(stages, m, 1) if stages > 1 else 0.0,
        "compile_s": round(compile_s, 2),
    }


def main(argv: list[str]) -> None:
    rows = [measure(p, argv) for p in (1, 2, 4)]
    base = rows[0]["block_bytes_per_device"]
    header = ("pipe", "M", "block bytes/dev", "x of pipe=1", "other bytes/dev", "bubble", "compile s")
    print("{:>4} {:>3} {:>16} {:>11} {:>16} {:>7} {:>9}".format(*header))
    for r in rows:
        r["block_fraction"] = round(r["block_bytes_per_device"] / base, 4)
        print(
            f"{r['pipe']:>4} {r['microbatches']:>3} {r['block_bytes_per_device']:>16,} {r['block_fraction']:>11.4f} "
            f"{r['other_bytes_per_device']:>16,} {r['bubble']:>7.3f} {r['compile_s']:>9.2f}"
        )
    print(json.dumps({"bench": "pipeline_memory", "device": jax.devices()[0].platform, "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
