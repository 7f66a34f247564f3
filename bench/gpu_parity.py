"""The same train step on the attached accelerator and on this host's CPU: do loss and gradients agree?

    python bench/gpu_parity.py

One step of ``configs/tiny.yaml`` from the same initial state and batch, built by ``trainer.build``
on a one-device mesh of each backend. GPT-2 in float32 runs twice: under the backends' default matmul
precision (GPUs may multiply float32 in TF32) and under ``highest``. Then the LLaMA flavour in
bfloat16 on the accelerator, ``model.attention=cudnn`` against ``xla`` (GPU only).
Reports the relative difference of the loss, of the gradient norm and the largest of the per-layer
gradient norms; prints a table, then one JSON line. Without an accelerator there is nothing to compare.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import load_config
from jaxllm.parallel import sharding
from jaxllm.plan import planner as plan
from jaxllm.train import trainer

ROOT = Path(__file__).resolve().parents[1]
ONE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.pipe=1", "dist.cpu_devices=0"]


def build(overrides: list[str], device: jax.Device):
    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [*overrides, *ONE])
    cfg = plan.resolved(cfg)
    model_cfg = cfg.model
    return cfg, model_cfg, trainer.build(cfg, sharding.make_mesh(cfg.mesh, [device]))


def run_step(setup, state, tokens) -> dict:
    """One train step from a copy of ``state`` on ``setup``'s device; its metrics as numpy."""
    with setup.context():
        state = jax.device_put(state, setup.state_shardings)
        batch = jax.device_put(jnp.asarray(tokens), setup.batch_sharding)
        _, metrics = setup.step(state, batch)
        return {
            k: np.asarray(jax.device_get(metrics[k]), np.float64) for k in ("loss", "grad_norm", "layer_grad_norms")
        }


def rel(a: dict, b: dict) -> dict:
    def r(x, y):
        return float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12)))

    return {
        "loss": r(a["loss"], b["loss"]),
        "grad_norm": r(a["grad_norm"], b["grad_norm"]),
        "layer_grad_norms": r(a["layer_grad_norms"], b["layer_grad_norms"]),
    }


def compare(name: str, overrides_a, device_a, overrides_b, device_b, precision: str | None) -> dict:
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with ctx:
        cfg, model_cfg, setup_a = build(overrides_a, device_a)
        _, _, setup_b = build(overrides_b, device_b)
        t = cfg.train
        tokens = np.random.default_rng(0).integers(
            0, model_cfg.vocab_size, (t.grad_accum, t.batch_size, t.seq_len + 1), np.int32
        )
        with setup_a.context():
            state = jax.device_get(setup_a.init())
        a, b = run_step(setup_a, state, tokens), run_step(setup_b, state, tokens)
    return {"case": name, "loss": float(a["loss"]), **{f"rel_{k}": v for k, v in rel(a, b).items()}}


def main() -> None:
    accel = [d for d in jax.devices() if d.platform != "cpu"]
    if not accel:
        raise SystemExit("no accelerator attached: nothing to compare with the CPU")
    gpu, cpu = accel[0], jax.devices("cpu")[0]
    rows = []
    f32 = ["model.arch=gpt2", "model.dtype=float32"]
    rows.append(compare("gpt2 f32 default", f32, gpu, f32, cpu, None))
    rows.append(compare("gpt2 f32 highest", f32, gpu, f32, cpu, "highest"))
    if gpu.platform == "gpu":
        bf16 = ["model.arch=llama", "model.dtype=bfloat16"]
        rows.append(
            compare(
                "llama bf16 cudnn/xla", [*bf16, "model.attention=cudnn"], gpu, [*bf16, "model.attention=xla"], gpu, None
            )
        )
    print(f"{gpu.device_kind} against the host CPU (relative differences)")
    print(f"{'case':<24}{'loss':>9}{'loss':>11}{'grad norm':>11}{'per layer':>11}")
    for r in rows:
        print(
            f"{r['case']:<24}{r['loss']:9.4f}{r['rel_loss']:11.2e}{r['rel_grad_norm']:11.2e}{r['rel_layer_grad_norms']:11.2e}"
        )
    print(json.dumps({"bench": "gpu_parity", "device": gpu.device_kind, "rows": rows}))


if __name__ == "__main__":
    main()
