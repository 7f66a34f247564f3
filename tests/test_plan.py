"""The planner (`train.py CONFIG --plan TARGET`): analytic memory against the compiler's, deviceless TPU
compiles, the run directory left alone, and one-line exits for bad input."""

from __future__ import annotations

import dataclasses
import json

import equality
import jax
import pytest

import train
from jaxllm.core.config import load_config
from jaxllm.model import flops
from jaxllm.plan import hardware
from jaxllm.plan import planner as plan

# bench/sharding_memory.py's model and five parallel plans (and its sequence-parallel one), plus a pipeline
SHARDING_MODEL = [
    "model.arch=gpt2",
    "model.n_layer=4",
    "model.d_model=256",
    "model.n_head=8",
    "model.vocab_size=512",
    "train.seq_len=128",
    "train.batch_size=16",
]
PLANS = {
    "replicated": ["mesh.data=8"],
    "zero1": ["mesh.data=8", "optim.shard_state=true"],
    "fsdp": ["mesh.fsdp=8"],
    "tensor": ["mesh.tensor=8"],
    "data-fsdp-tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp-tensor-sp": ["mesh.fsdp=4", "mesh.tensor=2", "mesh.sequence_parallel=true"],
    "pipeline": ["mesh.data=2", "mesh.pipe=4", "pipeline.microbatches=8"],
    "pipeline-fsdp-remat": ["mesh.fsdp=4", "mesh.pipe=2", "model.remat=full"],
    # every remat policy; the fused loss where the head dominates (an 8192-word vocabulary), whole or split over tensor
    "remat-dots": ["mesh.data=8", "model.remat=dots"],
    "remat-dots-no-batch": ["mesh.data=8", "model.remat=dots_no_batch"],
    "remat-offload": ["mesh.data=8", "model.remat=offload"],
    "fused-loss": ["mesh.data=8", "model.remat=full", "model.vocab_size=8192", "model.loss_chunk=16"],
    "fused-loss-tensor": ["mesh.tensor=8", "model.remat=full", "model.vocab_size=8192", "model.loss_chunk=16"],
}
TINY_TPU = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "train.seq_len=32",
    "train.batch_size=16",
    "model.dtype=bfloat16",
]
needs_libtpu = pytest.mark.skipif(not plan.libtpu_installed(), reason="libtpu not installed (pip install -e '.[tpu]')")


def run_plan(overrides: list[str], target: str) -> dict:
    return plan.run(load_config(None, overrides), hardware.parse_target(target), do_search=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", PLANS)
def test_analytic_memory_within_10pct_of_cpu_compiler(name):
    result = run_plan(SHARDING_MODEL + PLANS[name], "cpu:8")
    analytic, compiled = result["analytic_bytes"]["total"], result["compiled_bytes"]["total"]
    assert abs(analytic / compiled - 1) <= 0.10, (name, analytic, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "fsdp-tensor-sp"])
def test_analytic_state_bytes_equal_the_train_states_shards(name):
    """Parameters and optimizer state come from the real shardings (ZeRO-1 included), without a mesh."""
    equality.assert_state_bytes_exact(SHARDING_MODEL + PLANS[name])


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize(("arch", "target"), [("gpt2", "v5p-32"), ("llama", "v5e-16")])  # each arch, each TPU kind
def test_reduced_model_compiles_for_tpu_slice_on_every_axis(arch, target):
    """Also: nothing is stored in JAX's persistent cache (the suite's), which a slice's compile-only client
    could never load back (JAX counts each stored program as a cache miss)."""
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.pipe=2", "pipeline.microbatches=2"]
    events = []
    listener = lambda event, **_: events.append(event)
    jax.monitoring.register_event_listener(listener)
    try:
        result = run_plan(TINY_TPU + [f"model.arch={arch}"] + mesh, target)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert "/jax/compilation_cache/compile_requests_use_cache" in events
    assert "/jax/compilation_cache/cache_misses" not in events
    assert result["devices"] == 16 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "pipe": 2}
    compiled = result["compiled_bytes"]
    state = result["analytic_bytes"]["params"] + result["analytic_bytes"]["optimizer"]
    assert compiled["argument"] >= state  # the donated state is an argument of the step
    assert compiled["alias"] > 0 and compiled["temp"] > 0
    # held against the chip's memory: XLA:TPU's peak, below the temp block plus arguments it reports
    assert (
        compiled["total"]
        == compiled["peak"]
        < compiled["argument"] + compiled["output"] - compiled["alias"] + compiled["temp"]
    )
    assert result["fits"] and result["device_kind"].startswith("TPU v5")


@needs_libtpu
def test_tpu_slice_names_count_chips_as_cloud_does():
    assert len(plan.tpu_devices(hardware.parse_target("v5p-8"))) == 4  # TensorCores: 2 per chip
    assert len(plan.tpu_devices(hardware.parse_target("v5e-16"))) == 16  # chips


def test_gpu_target_without_gpus_is_analytic_only_and_says_so():
    result = run_plan(SHARDING_MODEL + ["mesh.fsdp=8"], "h100x8")
    assert result["compiled_bytes"] is None and "analytic only" in result["note"]
    assert result["device_memory_bytes"] == 80e9 and result["fits"]


@pytest.mark.slow
def test_plan_out_has_the_documented_keys_and_leaves_run_dir_alone(tmp_path, tiny_cfg):
    run_dir, out = tmp_path / "run", tmp_path / "plan.json"
    code = train.main(
        [
            "model.n_layer=2",
            "model.d_model=32",
            "train.seq_len=16",
            "train.batch_size=8",
            f"run.dir={run_dir}",
            "--plan",
            "cpu:8",
            "--plan-out",
            str(out),
        ]
    )
    assert code == 0 and not run_dir.exists()
    result = json.loads(out.read_text())
    for key in (
        "target",
        "device_kind",
        "devices",
        "mesh",
        "analytic_bytes",
        "compiled_bytes",
        "device_memory_bytes",
        "fits",
        "step_time_s",
        "tokens_per_sec",
        "mfu",
        "bound",
    ):
        assert key in result
    assert set(result["analytic_bytes"]) == {"params", "grads", "optimizer", "activations", "total"}
    assert set(result["compiled_bytes"]) == {"argument", "output", "alias", "temp", "peak", "total"}


@pytest.mark.slow
def test_plan_leaves_an_existing_run_dir_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: {n_layer: 9}\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    code = train.main(
        [
            "model.n_layer=2",
            "model.d_model=32",
            "train.seq_len=16",
            "train.batch_size=8",
            f"run.dir={run_dir}",
            "--plan",
            "cpu:8",
        ]
    )
    assert code == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()} == before


@pytest.mark.slow
def test_search_ranks_fitting_meshes_by_step_time_and_compiles_the_top(tmp_path, capsys):
    out = tmp_path / "search.json"
    code = train.main(
        [
            "model.n_layer=2",
            "model.d_model=32",
            "train.seq_len=16",
            "train.batch_size=8",
            "--plan",
            "cpu:8",
            "--search",
            "--plan-out",
            str(out),
        ]
    )
    assert code == 0
    ranked = json.loads(out.read_text())["candidates"]
    times = [r["step_time_s"] for r in ranked if r["fits"]]
    assert times == sorted(times) and len(ranked) > 8
    assert all(r["compiled_bytes"] is not None for r in ranked[: plan.SEARCH_COMPILES])
    assert "best: mesh.data=" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--plan", "v9-8"], "unknown target"),
        (["--plan", "v5p-6"], "sizes"),
        (["--plan", "h100x0"], "positive"),
        (["mesh.data=3", "--plan", "v5p-8"], "mesh"),
        (["model.n_head=2", "train.batch_size=1", "--plan", "v5p-8", "--search"], "no mesh"),
        (["--search"], "--plan"),
    ],
)
def test_bad_plan_input_exits_2_in_one_line(args, needle, capsys):
    assert train.main(["model.n_layer=2", "model.d_model=32", "train.seq_len=16", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_tpu_target_without_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(plan, "libtpu_installed", lambda: False)
    assert train.main(["model.n_layer=2", "model.d_model=32", "train.seq_len=16", "--plan", "v5e-8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and "tpu" in err


def test_peak_flops_table_tells_l4_from_l40s_and_v5e_from_v5p():
    class Device:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    assert flops.peak_flops(Device("NVIDIA L40S")) == hardware.DEVICE_KINDS["l40s"].peak_flops
    assert flops.peak_flops(Device("NVIDIA L4")) == hardware.DEVICE_KINDS["l4"].peak_flops
    assert flops.peak_flops(Device("TPU v5 lite")) == hardware.DEVICE_KINDS["v5e"].peak_flops
    assert flops.peak_flops(Device("TPU v5")) == hardware.DEVICE_KINDS["v5p"].peak_flops


def test_roofline_bound_moves_from_compute_to_tensor_collectives_on_slow_links():
    """Same mesh, same FLOPs: only the interconnect slows down, and the tensor all-reduces take over."""
    cfg = load_config(
        None, SHARDING_MODEL + ["mesh.tensor=8", "model.d_model=8192", "model.n_head=64", "model.dtype=bfloat16"]
    )
    cfg = plan.resolved(cfg)
    sizes = {"data": 1, "fsdp": 1, "tensor": 8, "pipe": 1}
    h100 = hardware.DEVICE_KINDS["h100"]
    slow_links = dataclasses.replace(h100, link_bw=h100.link_bw / 100)
    assert plan.roofline.step_time(cfg, sizes, h100, 0).bound == "compute"
    assert plan.roofline.step_time(cfg, sizes, slow_links, 0).bound == "tensor"


@pytest.mark.slow
def test_a_run_that_does_not_fit_gets_changes_that_make_it_fit():
    cfg = load_config("configs/llama_1b.yaml", ["mesh.data=8", "mesh.fsdp=1", "model.remat=none"])
    result = plan.run(cfg, hardware.parse_target("a100-40gbx8"), do_search=False)
    assert not result["fits"]
    assert {"changes": ["model.remat=full"], "fits": True} == {k: result["fixes"][0][k] for k in ("changes", "fits")}


@pytest.mark.parametrize("kind", [k for k, v in hardware.DEVICE_KINDS.items() if v.published_mfu])
def test_no_plan_predicts_an_mfu_above_the_best_published_for_its_kind(kind):
    """Even a plan whose roofline terms would be faster (no remat, no collectives, every matmul at
    peak): its step is stretched to the best MFU published for the kind, whose source it names."""
    cfg = plan.resolved(load_config("configs/llama_1b.yaml", ["mesh.fsdp=1", "model.remat=none"]))
    device = dataclasses.replace(hardware.DEVICE_KINDS[kind], efficiency=1.0)
    speed = plan.roofline.step_time(cfg, {"data": 1, "fsdp": 1, "tensor": 1, "pipe": 1}, device, 0)
    assert speed.mfu == pytest.approx(device.published_mfu) and speed.bound == "compute (the best published MFU)"
    assert hardware.DEVICE_KINDS[kind].efficiency_source
