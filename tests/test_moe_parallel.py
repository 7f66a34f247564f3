"""Expert parallelism (``mesh.expert``) by equality with one device: the trainer's own jitted step, loss
and every gradient within rel 1e-5 (float32), as in test_context_parallel; the MoE layer's router statistics
too; its step exchanges tokens by all-to-all; with split experts, capacity is each device's own.
"""

from __future__ import annotations

import re

import equality
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equality import rel
from test_moe import BATCH, MOE, RTOL, SEQ, VOCAB, resolved

from jaxllm.core.config import load_config, resolve
from jaxllm.model import moe
from jaxllm.parallel import sharding
from jaxllm.plan import planner

BASE = MOE + [
    "model.arch=llama",
    f"model.vocab_size={VOCAB}",
    f"train.seq_len={SEQ}",
    f"train.batch_size={BATCH}",
    "optim.warmup_steps=1",
    "optim.clip_norm=0",
]
LAYOUTS = {
    "expert2": ["mesh.expert=2", "mesh.data=-1"],
    "expert4": ["mesh.expert=4", "mesh.data=-1"],
    "expert8": ["mesh.expert=8", "model.moe.n_experts=8", "mesh.data=1"],
    "expert2_fsdp2": ["mesh.expert=2", "mesh.fsdp=2", "mesh.data=-1"],
    "expert2_tensor2": ["mesh.expert=2", "mesh.tensor=2", "mesh.data=-1"],
    "expert2_data4": ["mesh.expert=2", "mesh.data=4"],
}


def one_step(overrides: list[str], devices: list, initial=None) -> dict:
    """Loss and gradients of one trainer step; the initial state (host arrays) if none is given."""
    return equality.one_step(BASE + overrides, devices, VOCAB, SEQ, BATCH, initial)


@pytest.fixture(scope="module")
def references() -> dict:
    return {n: one_step(["model.moe.n_experts=8"] if n == 8 else [], jax.devices()[:1]) for n in (4, 8)}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_expert_parallel_step_equals_single_device(references, name):
    reference = references[8 if "model.moe.n_experts=8" in LAYOUTS[name] else 4]
    run = one_step(LAYOUTS[name], jax.devices(), reference["initial"])
    assert abs(run["loss"] - reference["loss"]) <= RTOL * abs(reference["loss"])
    got = dict(jax.tree_util.tree_leaves_with_path(run["grads"]))
    for path, want in jax.tree_util.tree_leaves_with_path(reference["grads"]):
        assert rel(got[path], want) <= RTOL, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_expert_parallel_step_exchanges_tokens_by_all_to_all_and_gathers_no_expert_weights():
    cfg = resolve(load_config(None, BASE + LAYOUTS["expert8"]), VOCAB)
    model_cfg = cfg.model
    text = planner.lower_step(cfg, jax.devices())[1].compile().as_text()
    assert "all-to-all(" in text
    gathered = [
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for line in text.splitlines()
        if " all-gather(" in line
        for dims in re.findall(r"\w+\[([\d,]*)\]", line.split(" all-gather(")[0])
    ]
    one_expert = model_cfg.d_model * moe.expert_width(model_cfg)  # a device's shard of a kernel: 8 experts, 8 devices
    assert max(gathered, default=0) < one_expert


def layer_grad(layer):
    """``(params, x_BxTxD) -> (grads, (out, sown statistics))`` of ``sum(sin(layer(x)))``."""

    def loss(p, x_BxTxD):
        out, sown = layer.apply({"params": p}, x_BxTxD, mutable=[moe.COLLECTION])
        return jnp.sum(jnp.sin(out)), (out, sown[moe.COLLECTION])

    return jax.grad(loss, has_aux=True)


def under_mesh(fn, mesh_overrides: list[str], *args):
    """``fn(*args)`` jitted under the mesh and logical-axis rules of ``mesh_overrides``."""
    mesh_cfg = load_config(None, mesh_overrides).mesh
    with jax.set_mesh(sharding.make_mesh(mesh_cfg)), nn.logical_axis_rules(sharding.rules(mesh_cfg)):
        return jax.jit(fn)(*args)


def layer_and_input(overrides: list[str]):
    layer = moe.MoEMLP(resolved(["model.moe.n_experts=8", *overrides]), 0.02)
    x_BxTxD = jax.random.normal(jax.random.PRNGKey(1), (BATCH, SEQ, 32))
    return layer, nn.unbox(layer.init(jax.random.PRNGKey(0), x_BxTxD)["params"]), x_BxTxD


def assert_trees_close(got, want):
    """Every leaf of ``got`` within ``RTOL`` of ``want``'s at the same path."""
    want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        assert rel(g, want[path]) <= RTOL, jax.tree_util.keystr(path)


@pytest.mark.parametrize(
    ("mesh", "overrides"),
    [
        (LAYOUTS["expert2_data4"], ["model.arch=llama"]),
        (["mesh.data=8"], ["model.arch=gpt2"]),  # no expert axis: each device sorts its own assignments
    ],
    ids=["expert2_data4", "data8"],
)
def test_layer_under_a_mesh_and_its_router_statistics_equal_one_device(mesh, overrides):
    layer, params, x_BxTxD = layer_and_input(overrides)
    want_grads, (want, want_stats) = jax.jit(layer_grad(layer))(params, x_BxTxD)
    grads, (got, stats) = under_mesh(layer_grad(layer), mesh, params, x_BxTxD)
    assert rel(got, want) <= RTOL
    assert_trees_close({k: stats[k] for k in ("load", "balance", "z", "loss")}, want_stats)
    assert float(stats["dropped"][0]) == float(want_stats["dropped"][0]) == 0.0
    assert_trees_close(grads, want_grads)


def test_capacity_with_split_experts_is_each_devices_own():
    # expert=2 x data=4: 8 devices, one row of 16 tokens each. Each device keeps its first
    # C_l = ceil(1.0 * 16 * 2 / 8) = 4 assignments per expert, so the layer equals the layer run on each
    # row alone (and its gradient the sum of theirs), the dropped fraction their mean.
    layer, params, x_BxTxD = layer_and_input(["model.arch=gpt2", "model.moe.capacity_factor=1.0"])
    grads, (got, stats) = under_mesh(layer_grad(layer), LAYOUTS["expert2_data4"], params, x_BxTxD)
    row_grads, (rows, row_stats) = jax.jit(jax.vmap(layer_grad(layer), (None, 0)))(params, x_BxTxD[:, None])
    assert float(jnp.mean(row_stats["dropped"][0])) > 0.1
    assert float(stats["dropped"][0]) == pytest.approx(float(jnp.mean(row_stats["dropped"][0])), rel=1e-6)
    assert rel(got, rows[:, 0]) <= RTOL
    assert_trees_close(grads, jax.tree.map(lambda g: jnp.sum(g, axis=0), row_grads))
