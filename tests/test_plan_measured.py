"""The planner against what an accelerator measured, and the kernel it plans for.

``bench/results/h200_2026-11-30.jsonl`` holds what ``bench/accelerator.sh`` measured on one H200
(a JSON line per case: its config and overrides, the allocator's peak bytes, the mean step time).
The analytic memory model and the roofline are checked against those measurements here, on any
machine. Calibration points are named: the H200's loss bytes come from ``gpt2_124m``, Hopper's
efficiency from ``llama_1b_b16`` and XLA:GPU's copies of a dropless MoE layer's grouped matmuls
(``memory_model.grouped_matmul_bytes``) from ``moe_dropless``; every other case is held out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxllm.core.config import load_config
from jaxllm.plan import hardware, memory_model
from jaxllm.plan import planner as plan

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "bench/results/h200_2026-11-30.jsonl"
ONE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.pipe=1", "mesh.expert=1"]
needs_libtpu = pytest.mark.skipif(not plan.libtpu_installed(), reason="libtpu not installed (pip install -e '.[tpu]')")


def measured(case: str) -> dict:
    """The newest measurement of ``case`` with an explicit attention kernel or ``auto``."""
    rows = [json.loads(line) for line in MEASURED.read_text().splitlines()]
    return [r for r in rows if r["case"] == case and any("attention" in o for o in r["overrides"])][-1]


# The records of 2026-11-30 write remat as a boolean: true is the policy ``full``, false is ``none``.
REMAT_NAMES = {"model.remat=true": "model.remat=full", "model.remat=false": "model.remat=none"}


def predicted(row: dict) -> dict:
    overrides = [REMAT_NAMES.get(o, o) for o in row["overrides"]]
    cfg = plan.resolved(load_config(str(ROOT / row["config"]), [*overrides, *ONE]))
    boxed = memory_model.boxed_params(cfg.model, cfg.train.seq_len)
    return plan.evaluate(cfg, boxed, hardware.parse_target("h200"), plan.check_mesh(cfg, 1))


# Fused (cuDNN) or chunked attention; XLA's attention on a GPU is outside the model (it keeps fewer
# float32 score copies than XLA:CPU: gpt2_124m_xla is +1%, long8k_xla -14%).
@pytest.mark.parametrize(
    "case",
    [
        "gpt2_124m",
        "gpt2_124m_noremat",
        "llama_1b_b16",
        "moe_dense_twin",
        "moe_dropless",
        "moe_capacity",
        "long8k_cudnn",
        "long8k_chunked",
    ],
)
def test_analytic_memory_within_10pct_of_the_h200s_peak(case):
    row = measured(case)
    assert predicted(row)["analytic_bytes"]["total"] == pytest.approx(row["peak_bytes"], rel=0.10)


@pytest.mark.parametrize("case", ["moe_dense_twin", "long8k_cudnn"])
def test_roofline_predicts_held_out_h200_step_times_within_25pct(case):
    row = measured(case)
    assert predicted(row)["step_time_s"] == pytest.approx(row["step_s"], rel=0.25)


def test_the_attention_kernel_changes_the_planned_activations():
    row = measured("long8k_cudnn")
    fused = predicted(row)["analytic_bytes"]["activations"]
    chunked = predicted({**row, "overrides": [*row["overrides"], "model.attention=chunked"]})["analytic_bytes"][
        "activations"
    ]
    xla = predicted({**row, "overrides": [*row["overrides"], "model.attention=xla"]})["analytic_bytes"]["activations"]
    assert fused < chunked < xla / 5  # the 8k x 8k float32 scores dominate XLA's attention


def test_planning_a_gpu_kernel_on_a_cpu_host_needs_no_gpu():
    row = measured("gpt2_124m")  # model.attention=auto: cudnn on the H200
    assert predicted(row)["fits"]


@pytest.mark.slow
@needs_libtpu
def test_auto_attention_lowers_to_splash_for_a_tpu_slice_under_data_parallelism():
    cfg = load_config(
        None,
        [
            "model.n_layer=1",
            "model.d_model=256",
            "model.n_head=2",
            "train.seq_len=512",
            "train.batch_size=8",
            "model.dtype=bfloat16",
            "model.attention=auto",
            "mesh.data=4",
        ],
    )
    _, lowered = plan.lower_step(plan.resolved(cfg), plan.tpu_devices(hardware.parse_target("v5p-8")))
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, per device under a shard_map
