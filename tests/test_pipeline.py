"""Pipeline parallelism: a pipelined model computes exactly what the one-device model computes.

Every parallel layout runs the same tiny 4-layer model on the same batches through the trainer's
own jitted step; its loss, every gradient and the parameters after three optimizer steps must match
the one-device run (float32, relative difference <= 1e-5 per parameter leaf), computed once for the
module. The model is the llama flavour: gpt2's key bias has a true gradient of 0 (the softmax
ignores a shift shared by a query's whole row), so its rounding noise has no relative meaning.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest
from conftest import TINY

import train
from jaxllm.core.config import Config, PipelineConfig, load_config, resolve
from jaxllm.parallel import pipeline, schedule, sharding
from jaxllm.train import trainer

VOCAB, SEQ, BATCH = 64, 16, 16
BASE = [
    "model.arch=llama",
    "model.n_layer=4",
    "model.d_model=32",
    "model.n_head=4",
    "model.n_kv_head=2",
    f"model.vocab_size={VOCAB}",
    f"train.seq_len={SEQ}",
    f"train.batch_size={BATCH}",
    "train.steps=3",
    "optim.warmup_steps=1",
    "optim.clip_norm=0",  # Adam's first moment after one step is then exactly (1 - b1) * gradient
]
RTOL = 1e-5

LAYOUTS = {  # name -> (mesh and pipeline overrides, P); the rest of the 8 devices go to data
    "pipe2": (["mesh.pipe=2", "mesh.data=-1"], 2),
    "pipe4": (["mesh.pipe=4", "mesh.data=-1"], 4),
    "pipe2_data2_tensor2": (["mesh.pipe=2", "mesh.data=2", "mesh.tensor=2"], 2),
    "pipe2_fsdp4": (["mesh.pipe=2", "mesh.fsdp=4"], 2),
    "circular_pipe2_repeats2": (
        ["mesh.pipe=2", "mesh.data=-1", "pipeline.schedule=circular", "pipeline.repeats=2"],
        2,
    ),
    "1f1b_pipe2": (["mesh.pipe=2", "mesh.data=-1", "pipeline.schedule=1f1b"], 2),
    "1f1b_pipe4_tensor2": (["mesh.pipe=4", "mesh.tensor=2", "mesh.data=1", "pipeline.schedule=1f1b"], 4),
}
# M = P and M = 2P (M microbatches) for each schedule on its plain two-stage layout, where M against P
# changes the schedule's tables; one M for each layout that composes pipe with other axes.
M_PER_P = {
    "pipe2": (1, 2),
    "pipe4": (1,),
    "pipe2_data2_tensor2": (1,),
    "pipe2_fsdp4": (2,),
    "circular_pipe2_repeats2": (1, 2),
    "1f1b_pipe2": (1, 2),
    "1f1b_pipe4_tensor2": (2,),
}
FAST_CASE = ("pipe2_data2_tensor2", 1)  # the fast lane's one pipelined case: pipe composed with data and tensor
CASES = [
    pytest.param(
        name, m_per_p, id=f"{name}-M{m_per_p}P", marks=[] if (name, m_per_p) == FAST_CASE else [pytest.mark.slow]
    )
    for name in LAYOUTS
    for m_per_p in M_PER_P[name]
]


def make_setup(overrides: list[str], devices: list) -> tuple[Config, trainer.Setup]:
    cfg = resolve(load_config(None, BASE + overrides), VOCAB)
    return cfg, trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))


def batches(accum: int = 1) -> np.ndarray:
    """Three steps of the same tokens, ``[3, A, B/A, T+1]``: accumulation micro-batch a holds rows i*A + a
    of the batch, as pipeline micro-batch a does."""
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, BATCH // accum, accum, SEQ + 1), dtype=np.int32)
    return tokens.swapaxes(1, 2)


def three_steps(cfg: Config, setup: trainer.Setup, state: trainer.TrainState) -> dict:
    """The first step's loss, gradients and router statistics (``moe_*``, for an MoE model), and the
    parameters after three steps from ``state``.

    The gradients are read back from Adam's first moment after step one, ``mu = (1 - b1) g`` (no
    clipping), so the one compiled function under test, the trainer's step, yields all three. The
    initial state (host arrays) is placed with the set-up's shardings rather than initialised again:
    a compile saved per layout."""
    with setup.context():
        state = jax.device_put(state, setup.state_shardings)
        out = {}
        for tokens in batches(cfg.train.grad_accum):
            state, metrics = setup.step(state, jax.device_put(tokens, setup.batch_sharding))
            if not out:
                mu = jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu"))  # on the host
                out = {
                    "loss": float(metrics["loss"]),
                    "grads": jax.tree.map(lambda m: m / (1 - cfg.optim.b1), mu),
                    "moe": {k: v for k, v in metrics.items() if k.startswith("moe_")},
                }
        return jax.device_get({**out, "params": state.params})


def relative_differences(got: dict, want: dict) -> dict[str, float]:
    """``|got - want| / |want|`` per leaf (Frobenius norms), keyed by the leaf's path."""
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    return {
        jax.tree_util.keystr(path): float(np.linalg.norm(flat_got[path] - w) / np.linalg.norm(w))
        for path, w in jax.tree_util.tree_leaves_with_path(want)
    }


@pytest.fixture(scope="module")
def reference() -> dict:
    """The one-device run, not pipelined, and the initial state every run starts from."""
    cfg, setup = make_setup([], jax.devices()[:1])
    with setup.context():
        initial = jax.device_get(setup.init())
    return {**three_steps(cfg, setup, initial), "initial": initial}


_setups: dict[tuple[str, int], tuple[Config, trainer.Setup]] = {}
_runs: dict[tuple[str, int], dict] = {}


def pipelined_setup(name: str, m_per_p: int) -> tuple[Config, trainer.Setup]:
    """The 8-device set-up of a layout with M = m_per_p * P (built once per module)."""
    if (name, m_per_p) not in _setups:
        overrides, stages = LAYOUTS[name]
        _setups[name, m_per_p] = make_setup(overrides + [f"pipeline.microbatches={m_per_p * stages}"], jax.devices())
    return _setups[name, m_per_p]


def pipelined_run(name: str, m_per_p: int, initial: trainer.TrainState) -> dict:
    if (name, m_per_p) not in _runs:
        _runs[name, m_per_p] = three_steps(*pipelined_setup(name, m_per_p), initial)
    return _runs[name, m_per_p]


@pytest.mark.parametrize("name,m_per_p", CASES)
@pytest.mark.slow
def test_pipelined_loss_and_gradients_equal_single_device(reference, name, m_per_p):
    run = pipelined_run(name, m_per_p, reference["initial"])
    assert abs(run["loss"] - reference["loss"]) <= RTOL * abs(reference["loss"])
    diffs = relative_differences(run["grads"], reference["grads"])
    assert max(diffs.values()) <= RTOL, {k: v for k, v in diffs.items() if v > RTOL}


@pytest.mark.parametrize("name,m_per_p", CASES)
def test_pipelined_three_steps_equal_single_device(reference, name, m_per_p):
    diffs = relative_differences(pipelined_run(name, m_per_p, reference["initial"])["params"], reference["params"])
    assert max(diffs.values()) <= RTOL, {k: v for k, v in diffs.items() if v > RTOL}


MOE = {  # mixture-of-experts blocks, every layer dropless, or every second layer with a capacity
    "dropless": [
        "model.moe.n_experts=4",
        "model.moe.top_k=2",
        "model.moe.aux_loss=0.1",
        "model.moe.router_z_loss=0.01",
    ],
    "capacity": [
        "model.moe.n_experts=4",
        "model.moe.top_k=2",
        "model.moe.aux_loss=0.1",
        "model.moe.router_z_loss=0.01",
        "model.moe.capacity_factor=1.0",
        "model.moe.every=2",
    ],
}
MOE_CASES = {  # name -> (MoE blocks, mesh and pipeline overrides, M): each schedule (GPipe with capacity
    # layers: its loop is circular's with one repeat), and pipe with expert
    "circular_pipe2_repeats2": ("dropless", LAYOUTS["circular_pipe2_repeats2"][0], 2),
    "1f1b_pipe2_expert2": ("dropless", ["mesh.pipe=2", "mesh.expert=2", "mesh.data=-1", "pipeline.schedule=1f1b"], 2),
    "capacity_gpipe_pipe2": ("capacity", LAYOUTS["pipe2"][0], 4),
}
_moe_references: dict[tuple[str, int], dict] = {}


def moe_reference(moe: str, micro: int, initial: trainer.TrainState | None = None) -> dict:
    """One device accumulating the M micro-batches the pipeline splits the batch into; with ``initial``
    ``None``, also the initial state (built once per MoE model and M)."""
    if (moe, micro) not in _moe_references:
        cfg, setup = make_setup(
            MOE[moe] + [f"train.grad_accum={micro}", f"train.batch_size={BATCH // micro}"], jax.devices()[:1]
        )
        with setup.context():
            initial = jax.device_get(setup.init())
        _moe_references[moe, micro] = {**three_steps(cfg, setup, initial), "initial": initial}
    return _moe_references[moe, micro]


@pytest.mark.parametrize("name", MOE_CASES)
@pytest.mark.slow
def test_pipelined_moe_equals_single_device_accumulating_the_same_microbatches(name):
    """The router losses (balance and z, weighted) and the capacity are per micro-batch, as under
    ``train.grad_accum``; bubble slots add no router loss, load or gradient."""
    moe, overrides, micro = MOE_CASES[name]
    want = moe_reference(moe, micro)
    cfg, setup = make_setup(MOE[moe] + overrides + [f"pipeline.microbatches={micro}"], jax.devices())
    got = three_steps(cfg, setup, want["initial"])
    assert abs(got["loss"] - want["loss"]) <= RTOL * abs(want["loss"])
    assert set(got["moe"]) == {"moe_load", "moe_dropped", "moe_balance", "moe_z"} == set(want["moe"])
    for key, value in want["moe"].items():  # the per-layer telemetry, layers in order
        np.testing.assert_allclose(got["moe"][key], value, rtol=RTOL, atol=1e-7, err_msg=key)
    for part in ("grads", "params"):
        diffs = relative_differences(got[part], want[part])
        assert max(diffs.values()) <= RTOL, {k: v for k, v in diffs.items() if v > RTOL}


def test_block_parameters_are_split_over_pipe_stages():
    _, setup = pipelined_setup("pipe4", 1)
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec[0], setup.state_shardings.params["blocks"]))
    assert set(specs) == {"pipe"}


SCHEDULES = [(2, 2, 1), (2, 4, 1), (4, 4, 1), (4, 8, 1), (2, 2, 2), (4, 6, 3), (8, 8, 4)]  # (P, M, R)


@pytest.mark.parametrize("stages,micro,rounds", SCHEDULES)
def test_logged_bubble_fraction_matches_theory(stages, micro, rounds):
    cfg = PipelineConfig(microbatches=micro, schedule="circular" if rounds > 1 else "gpipe", repeats=rounds)
    line = pipeline.describe(cfg, stages)
    measured = float(re.search(r"bubble ([0-9.]+)", line).group(1))
    assert measured == pytest.approx((stages - 1) / (micro * rounds + stages - 1), abs=1e-4)


def test_every_work_item_visits_every_stage_once_in_order():
    table_IxP = schedule.work_items(4, 6, 3)
    for stage in range(4):
        busy = table_IxP[:, stage][table_IxP[:, stage] >= 0]
        assert busy.tolist() == list(range(18))


@pytest.mark.parametrize("stages,micro", [(2, 2), (2, 8), (4, 4), (4, 16)])
def test_1f1b_runs_each_microbatch_through_every_stage_and_keeps_fewer_than_2p_alive(stages, micro):
    forward_IxP, backward_IxP = schedule.one_f_one_b(stages, micro)
    for p in range(stages):
        assert forward_IxP[:, p][forward_IxP[:, p] >= 0].tolist() == list(range(micro))
        assert backward_IxP[:, p][backward_IxP[:, p] >= 0].tolist() == list(range(micro))
        t_f = [int(np.flatnonzero(forward_IxP[:, p] == m)[0]) for m in range(micro)]
        t_b = [int(np.flatnonzero(backward_IxP[:, p] == m)[0]) for m in range(micro)]
        if p + 1 < stages:  # the forward reaches stage p+1 one iteration later, the gradient comes back one later
            assert [int(np.flatnonzero(forward_IxP[:, p + 1] == m)[0]) for m in range(micro)] == [t + 1 for t in t_f]
            assert [int(np.flatnonzero(backward_IxP[:, p + 1] == m)[0]) for m in range(micro)] == [t - 1 for t in t_b]
        alive = [sum(f <= t <= b for f, b in zip(t_f, t_b)) for t in range(forward_IxP.shape[0])]
        assert max(alive) == min(2 * (stages - p) - 1, micro)  # independent of M once M >= 2P


def test_1f1b_bubble_is_counted_from_its_tables():
    line = pipeline.describe(PipelineConfig(microbatches=8, schedule="1f1b"), 4)
    assert "14 iterations" in line
    assert float(re.search(r"bubble ([0-9.]+)", line).group(1)) == pytest.approx(6 / 14, abs=1e-4)


def test_trainer_step_runs_the_1f1b_loop_for_gradients(monkeypatch):
    calls = []
    run = pipeline.run_1f1b
    monkeypatch.setattr(pipeline, "run_1f1b", lambda *args: calls.append(args) or run(*args))
    _, setup = make_setup(LAYOUTS["1f1b_pipe2"][0] + ["pipeline.microbatches=4"], jax.devices())
    with setup.context():
        state = jax.eval_shape(setup.init)
        jax.eval_shape(setup.step, state, jax.ShapeDtypeStruct((1, BATCH, SEQ + 1), np.int32))
    assert len(calls) == 1


def test_trainer_step_runs_the_pipelined_forward_when_pipe_is_split(monkeypatch):
    calls = []
    no_router = (np.zeros((1, 2), np.float32), {})  # a dense model's chunks: no router loss, no statistics
    monkeypatch.setattr(pipeline, "run_stages", lambda *args: calls.append(args) or (args[2], no_router))
    _, setup = pipelined_setup("pipe2", 1)
    with setup.context():
        state = jax.eval_shape(setup.init)
        jax.eval_shape(setup.step, state, jax.ShapeDtypeStruct((1, BATCH, SEQ + 1), np.int32))
    assert len(calls) == 1


def _refusal(corpus, tmp_path, capsys, *overrides: str) -> str:
    """train.py's one line for ``overrides`` (its ``main`` in-process, on this process's 8 devices)."""
    run_dir = tmp_path / "run"
    args = TINY + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}", *overrides]
    assert train.main(args) == 2
    assert not run_dir.exists()  # refused before anything was written (or compiled)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_layers_not_divisible_by_stages_times_repeats_exits_2(corpus, tmp_path, capsys):
    circular = ("pipeline.schedule=circular", "pipeline.repeats=2")
    line = _refusal(corpus, tmp_path, capsys, "mesh.pipe=2", "model.n_layer=2", *circular)
    assert "model.n_layer=2 is not divisible by mesh.pipe*pipeline.repeats=4" in line


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_fewer_microbatches_than_stages_exits_2(corpus, tmp_path, capsys, schedule):
    line = _refusal(
        corpus,
        tmp_path,
        capsys,
        "mesh.pipe=4",
        "model.n_layer=4",
        "pipeline.microbatches=2",
        f"pipeline.schedule={schedule}",
    )
    assert "pipeline.microbatches=2 is smaller than mesh.pipe=4" in line


def test_batch_not_divisible_by_microbatches_times_data_axes_exits_2(corpus, tmp_path, capsys):
    mesh = ("mesh.pipe=2", "mesh.data=4")
    line = _refusal(corpus, tmp_path, capsys, *mesh, "pipeline.microbatches=2", "train.batch_size=12")
    assert "train.batch_size=12 is not divisible by pipeline.microbatches*data*fsdp=8" in line
