"""Predicted step time of a train step on a mesh: a roofline over compute, HBM and each mesh axis.

Per device and per optimizer step (A micro-batches of b rows, T positions, L layers):

- ``compute``: training FLOPs from :mod:`jaxllm.model.flops` (6 N + attention per token; a recomputed
  forward adds a third with ``model.remat`` full or offload or a pipeline, the attention core's share
  with dots_no_batch) over the achievable peak (the kind's ``peak_flops x efficiency``: the fraction
  jaxllm's step was measured to reach there, or a published MFU where it never was), stretched by
  the bubble ``(P - 1) / (M R + P - 1)``;
- ``hbm``: each matmul weight read in the compute dtype once per pass (forward, two backward, and the
  recomputed forward), activations written and read once, the optimizer reading and writing the
  float32 state; over the HBM bandwidth;
- ``fsdp``: each weight all-gathered per pass and its gradient reduce-scattered, per micro-batch;
- ``tensor``: Megatron's two all-reduces of the ``b T D`` activations per layer and pass;
- ``data``: one all-reduce of the gradients per step;
- ``pipe``: the ``b / M``-row state sent to the next stage at every loop iteration, both ways.

Each collective moves ``(n - 1) / n`` of its buffer per device for a gather or scatter, twice that
for an all-reduce, over :func:`hardware.axis_bandwidth`. XLA overlaps the FSDP and data-parallel
collectives with compute; tensor-parallel all-reduces and pipeline sends sit between dependent
matmuls, so they add to it: ``step = max(compute + tensor + pipe, hbm, fsdp, data)``, and the
largest term names what bounds the step. No prediction's MFU exceeds the best published for its
kind (``DeviceKind.published_mfu``): where the terms would, the step is stretched to that MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.core.config import Config, ModelConfig
from jaxllm.model import flops
from jaxllm.parallel import pipeline, schedule
from jaxllm.plan import hardware
from jaxllm.plan.hardware import DeviceKind, ring_factor


@dataclass(frozen=True)
class StepTime:
    terms: dict[str, float]  # seconds per step, by term
    step_time_s: float
    tokens_per_sec: float
    mfu: float
    bound: str


def _recomputes(m: ModelConfig, pipe: int) -> bool:
    """Whether the backward pass runs the forward's matmuls again: ``model.remat`` full or offload
    (dots and dots_no_batch keep the projections' outputs), or a pipeline (each stage iteration is)."""
    return m.remat in ("full", "offload") or pipe > 1


def _recompute_flops(m: ModelConfig, seq: int, pipe: int) -> float:
    """FLOPs per token of the recomputed forward: all of it (a third of training's), the attention
    core alone under ``dots_no_batch`` (its batched products are not saved), none otherwise."""
    if _recomputes(m, pipe):
        return flops.flops_per_token(m, seq) / 3
    if m.remat == "dots_no_batch":
        return 4 * m.n_layer * m.d_model * seq  # a third of PaLM's 12 L D T
    return 0.0


def _passes(m: ModelConfig, pipe: int) -> int:
    """Times each weight is used per micro-batch: forward, two backward matmuls, recomputed forward."""
    return 4 if _recomputes(m, pipe) else 3


def terms(cfg: Config, sizes: dict[str, int], kind: DeviceKind, activation_bytes: int) -> dict[str, float]:
    """Seconds per optimizer step of each roofline term, per device (see the module docstring);
    ``cfg``'s model resolved."""
    m = cfg.model
    d, f, t, p = sizes["data"], sizes["fsdp"], sizes["tensor"], sizes["pipe"]
    n, accum, seq = d * f * t * p, cfg.train.grad_accum, cfg.train.seq_len
    c = 2 if m.dtype in ("bfloat16", "float16") else 4
    rows = cfg.train.batch_size // (d * f)
    tokens = cfg.train.batch_size * seq * accum
    model_flops = flops.flops_per_token(m, seq) * tokens
    hw_flops = model_flops + _recompute_flops(m, seq, p) * tokens
    micro, rounds = pipeline.microbatches(cfg.pipeline, p), pipeline.repeats(cfg.pipeline)
    bubble = schedule.theory_bubble(p, micro, rounds) if p > 1 else 0.0
    weights = flops.param_counts(m)["matmul"] / (t * p)  # what a device multiplies by, once gathered
    bw = hardware.axis_bandwidth(kind, sum(s > 1 for s in sizes.values()))
    state = flops.param_counts(m)["total"] * 4 * 4 / (f * t * p)  # params, grads and two moments
    layers_here = m.n_layer // p
    exposed = {
        "compute": hw_flops / n / (kind.peak_flops * kind.efficiency) / (1 - bubble),
        "tensor": accum * layers_here * _passes(m, p) * 2 * 2 * ring_factor(t) * rows * seq * m.d_model * c / bw,
        "pipe": accum * (micro * rounds + p - 1) * 2 * rows / micro * seq * m.d_model * c / bw if p > 1 else 0.0,
    }
    return {
        **exposed,
        "hbm": (accum * (_passes(m, p) * weights * c + 2 * activation_bytes) + 2 * state) / kind.hbm_bw,
        "fsdp": accum * ring_factor(f) * weights * (_passes(m, p) * c - c + 4) / bw,
        "data": 2 * ring_factor(d) * flops.param_counts(m)["total"] * 4 / (f * t * p) / bw,
    }


def step_time(cfg: Config, sizes: dict[str, int], kind: DeviceKind, activation_bytes: int) -> StepTime:
    """The roofline's step time, tokens/s, MFU and bounding term for this run on this mesh."""
    m = cfg.model
    parts = terms(cfg, sizes, kind, activation_bytes)
    exposed = parts["compute"] + parts["tensor"] + parts["pipe"]
    step = max(exposed, parts["hbm"], parts["fsdp"], parts["data"])
    bound = max(parts, key=parts.get)
    if step == exposed:
        bound = max(("compute", "tensor", "pipe"), key=parts.get)
        p = sizes["pipe"]
        if (
            p > 1
            and schedule.theory_bubble(p, pipeline.microbatches(cfg.pipeline, p), pipeline.repeats(cfg.pipeline)) > 0.25
        ):
            bound = "compute (pipeline bubble)" if bound == "compute" else bound
    tokens = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    n = sizes["data"] * sizes["fsdp"] * sizes["tensor"] * sizes["pipe"]
    if kind.published_mfu:
        floor = tokens * flops.flops_per_token(m, cfg.train.seq_len) / (n * kind.peak_flops * kind.published_mfu)
        if floor > step:
            step, bound = floor, "compute (the best published MFU)"
    tokens_per_sec = tokens / step
    return StepTime(
        parts, step, tokens_per_sec, flops.mfu(tokens_per_sec, m, cfg.train.seq_len, n * kind.peak_flops), bound
    )
