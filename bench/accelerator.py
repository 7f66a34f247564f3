"""Measured against planned: train steps of the shipped configs on the attached accelerator, beside
what ``train.py --plan`` predicts for the same run.

    python bench/accelerator.py CASE [--steps N] [--compile-only] [--tiny] [--out FILE]
    bash bench/accelerator.sh OUT_DIR   # every case on one GPU: compiled in parallel, then timed in turn

One case per process (device memory statistics are per process). The step is built exactly as
``train.py`` builds it (``trainer.build`` on a one-device mesh), lowered for abstract inputs and
compiled once: that executable gives the compiler's memory figures (what the plan reports) and is
the one timed. ``--compile-only`` stops there: run in parallel processes with a persistent
compilation cache (``JAX_COMPILATION_CACHE_DIR``), it fills the cache, and the timed runs that follow,
one process at a time, load their executables from it instead of compiling and autotuning again.
Tokens are random ids of the model's vocabulary: speed and memory do not depend on the text.

Per case: analytic and compiled bytes per device, the allocator's peak (``memory_stats``), the
roofline's predicted step time and MFU, the measured ones (mean of ``--steps`` steps after 3 warm-up
steps), their ratios, and the loss after those steps on the one batch they repeat (the same for every
case of a config whose settings keep the numerics); printed as a table and appended as one JSON line
to ``--out``. ``--tiny`` runs the case on a tiny model (:data:`TINY`), to check it on a CPU.
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

from jaxllm.core.config import load_config
from jaxllm.core.errors import UserError
from jaxllm.model import flops
from jaxllm.plan import hardware, memory_model, report
from jaxllm.plan import planner as plan

ROOT = Path(__file__).resolve().parents[1]
ONE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.pipe=1", "mesh.expert=1"]
LONG = ["model.n_layer=4", "train.batch_size=2", "train.seq_len=8192", "train.grad_accum=1"]
MOE = ["model.n_layer=4", "train.batch_size=8", "train.grad_accum=1", "model.attention=auto"]
GPT2, LLAMA = ("configs/gpt2_124m.yaml", ["model.attention=auto"]), ("configs/llama_1b.yaml", ["model.attention=auto"])
FUSED = "model.loss_chunk=128"  # 128 positions per block of the fused loss (divides both configs' seq_len)
# name: (config, overrides, timed steps). The GPU cases, most important first; tiny* run anywhere.
CASES = {
    "gpt2_124m": (GPT2[0], GPT2[1], 20),
    "gpt2_124m_noremat": (GPT2[0], [*GPT2[1], "model.remat=none"], 20),
    "gpt2_124m_dots": (GPT2[0], [*GPT2[1], "model.remat=dots"], 20),
    "gpt2_124m_dots_no_batch": (GPT2[0], [*GPT2[1], "model.remat=dots_no_batch"], 20),
    "gpt2_124m_offload": (GPT2[0], [*GPT2[1], "model.remat=offload"], 20),
    "gpt2_124m_fused": (GPT2[0], [*GPT2[1], FUSED], 20),
    "gpt2_124m_fused_noremat": (GPT2[0], [*GPT2[1], FUSED, "model.remat=none"], 20),
    "gpt2_124m_fused_dots": (GPT2[0], [*GPT2[1], FUSED, "model.remat=dots_no_batch"], 20),
    "gpt2_124m_fp8": (GPT2[0], [*GPT2[1], FUSED, "model.remat=none", "model.matmul_dtype=fp8"], 20),
    "gpt2_124m_xla": ("configs/gpt2_124m.yaml", ["model.attention=xla"], 10),
    "llama_1b_b16": (LLAMA[0], [*LLAMA[1], "train.batch_size=16"], 10),
    "llama_1b_b16_dots_no_batch": (LLAMA[0], [*LLAMA[1], "train.batch_size=16", "model.remat=dots_no_batch"], 10),
    "llama_1b_b16_fused": (LLAMA[0], [*LLAMA[1], "train.batch_size=16", FUSED], 10),
    "llama_1b_b16_fused_dots": (LLAMA[0], [*LLAMA[1], "train.batch_size=16", FUSED, "model.remat=dots_no_batch"], 10),
    "llama_1b_b16_fp8": (LLAMA[0], [*LLAMA[1], "train.batch_size=16", FUSED, "model.matmul_dtype=fp8"], 10),
    "moe_dropless": ("configs/moe_1b_active.yaml", MOE, 10),
    "moe_dropless_dots": ("configs/moe_1b_active.yaml", [*MOE, "model.remat=dots_no_batch"], 10),
    "moe_capacity": ("configs/moe_1b_active.yaml", [*MOE, "model.moe.capacity_factor=1.25"], 10),
    "moe_dense_twin": ("configs/moe_1b_active.yaml", [*MOE, "model.moe.n_experts=0", "model.d_ff=8192"], 10),
    "long8k_cudnn": ("configs/llama_1b.yaml", [*LONG, "model.attention=cudnn"], 10),
    "long8k_xla": ("configs/llama_1b.yaml", [*LONG, "model.attention=xla"], 10),
    "long8k_chunked": ("configs/llama_1b.yaml", [*LONG, "model.attention=chunked"], 10),
    "tiny": ("configs/tiny.yaml", [], 5),
    "tiny_noremat": ("configs/tiny.yaml", ["model.remat=none"], 5),
}
# --tiny: any case shrunk to a model a CPU runs in seconds (checks the case builds, compiles and
# trains; its figures mean nothing). The case's own remat, loss and matmul options are kept.
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.n_kv_head=4",
    "model.d_ff=256",
    "data.tokenizer=byte",
    "model.vocab_size=0",
    "train.batch_size=2",
    "train.seq_len=128",
    "train.grad_accum=1",
]


def target_for(device: jax.Device) -> hardware.Target:
    """The planner's target for the attached device: its table entry, or this host's CPU."""
    if device.platform == "cpu":
        return plan.cpu_target(hardware.parse_target("cpu:1"))
    for key, kind in hardware.DEVICE_KINDS.items():
        if kind.name.lower() == device.device_kind.lower():
            return hardware.parse_target(key)
    raise SystemExit(f"{device.device_kind}: not in jaxllm.plan.hardware.DEVICE_KINDS; add it to plan for it")


def compile_case(cfg, model_cfg, device):
    """The jitted step built as training builds it, compiled for abstract inputs; (setup, executable, s)."""
    start = time.perf_counter()
    setup, lowered = plan.lower_step(cfg, [device])
    return setup, lowered.compile(), time.perf_counter() - start


def time_steps(cfg, model_cfg, setup, executable, steps: int) -> tuple[float, float]:
    """Mean seconds per step over ``steps`` steps after three warm-up steps, on one fixed batch of
    random tokens, and the loss of the last step (the run memorises that batch: two settings with the
    same numerics end at the same loss, within the compute dtype's noise)."""
    t = cfg.train
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (t.grad_accum, t.batch_size, t.seq_len + 1))
    with setup.context():
        batch = jax.device_put(jnp.asarray(tokens, jnp.int32), setup.batch_sharding)
        state = setup.init()
        for _ in range(3):
            state, metrics = executable(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = executable(state, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
    if not np.isfinite(float(metrics["loss"])):
        raise SystemExit("non-finite loss: the measured step is not a training step")
    return elapsed / steps, float(metrics["loss"])


def measure(name: str, steps: int | None, compile_only: bool, tiny: bool = False) -> dict | None:
    path, overrides, default_steps = CASES[name]
    steps = steps or default_steps
    overrides = [*overrides, *(TINY if tiny else [])]
    cfg = load_config(str(ROOT / path), [*overrides, *ONE])
    cfg = plan.resolved(cfg)
    model_cfg = cfg.model
    device = jax.devices()[0]
    target = target_for(device)
    sizes = plan.check_mesh(cfg, 1)
    predicted = plan.evaluate(cfg, memory_model.boxed_params(model_cfg, cfg.train.seq_len), target, sizes)
    setup, executable, compile_s = compile_case(cfg, model_cfg, device)
    predicted["compiled_bytes"] = plan.compiled_bytes(executable)
    if compile_only:
        return None
    step_s, loss = time_steps(cfg, model_cfg, setup, executable, steps)
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    t = cfg.train
    tok_s = t.grad_accum * t.batch_size * t.seq_len / step_s
    return {
        "case": name,
        "config": path,
        "overrides": overrides,
        "device": device.device_kind,
        "params": flops.param_counts(model_cfg)["total"],
        "tokens_per_step": t.grad_accum * t.batch_size * t.seq_len,
        "compile_s": compile_s,
        "step_s": step_s,
        "loss": loss,
        "loss_steps": 3 + steps,
        "tokens_per_sec": tok_s,
        "mfu": flops.mfu(tok_s, model_cfg, t.seq_len, flops.peak_flops(device, cfg.log.peak_flops)),
        "peak_bytes": peak,
        "predicted": predicted,
        "step_ratio": step_s / predicted["step_time_s"],
        "analytic_ratio": predicted["analytic_bytes"]["total"] / (peak or predicted["compiled_bytes"]["total"]),
        "compiled_ratio": predicted["compiled_bytes"]["total"] / peak if peak else None,
    }


def row(r: dict) -> str:
    gib = 2.0**30
    peak = f"{r['peak_bytes'] / gib:9.2f}" if r["peak_bytes"] else f"{'-':>9}"
    p = r["predicted"]
    return (
        f"{r['case']:<20}{r['step_s'] * 1e3:9.1f}{p['step_time_s'] * 1e3:9.1f}{r['step_ratio']:7.2f}"
        f"{r['tokens_per_sec']:12,.0f}{r['mfu']:7.1%}{p['mfu']:7.1%}{peak}"
        f"{p['compiled_bytes']['total'] / gib:9.2f}{p['analytic_bytes']['total'] / gib:9.2f}"
        f"{r.get('loss', float('nan')):8.4f}  {p['bound']}"
    )


HEADER = (
    f"{'case':<20}{'ms/step':>9}{'planned':>9}{'ratio':>7}{'tokens/s':>12}{'MFU':>7}{'plan':>7}"
    f"{'peak GiB':>9}{'compiled':>9}{'analytic':>9}{'loss':>8}  bound"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("--steps", type=int, help="timed steps (default: the case's own)")
    ap.add_argument("--compile-only", action="store_true", help="compile (filling the persistent cache) and stop")
    ap.add_argument("--out", help="append the case's JSON line to this file")
    ap.add_argument("--tiny", action="store_true", help="the case on a tiny model: checks it runs (on a CPU too)")
    args = ap.parse_args()
    try:
        r = measure(args.case, args.steps, args.compile_only, args.tiny)
    except UserError as e:  # a case this machine cannot run (cuDNN attention on a CPU): one line, exit 2
        raise SystemExit(f"{args.case}: {e}") from None
    if r is None:
        return
    print(HEADER)
    print(row(r))
    print(report.table(r["predicted"]))
    line = json.dumps(r)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
