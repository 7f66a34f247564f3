"""The planner on mixture-of-experts models: the memory model holds every expert (sharded over the
``expert`` axis as the rules table says), activations count the k experts a token goes through and,
for dropless layers on CPU and GPU, the per-expert copies their grouped matmuls are expanded into."""

from __future__ import annotations

import equality
import jax
import pytest

from jaxllm.core.config import load_config
from jaxllm.plan import planner as plan

MOE_MODEL = [
    "model.arch=gpt2",
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.vocab_size=320",
    "train.seq_len=32",
    "train.batch_size=16",
    "model.moe.n_experts=8",
    "model.moe.top_k=2",
    "model.moe.d_ff=128",
]
MESHES = {
    "expert8": ["mesh.expert=8"],
    "expert2-fsdp4": ["mesh.expert=2", "mesh.fsdp=4"],
    "expert4-tensor2-shared": ["mesh.expert=4", "mesh.tensor=2", "model.arch=llama", "model.moe.shared_experts=1"],
    "data8-zero1": ["mesh.data=8", "optim.shard_state=true"],
}


@pytest.mark.parametrize(
    "name", [n if n == "expert2-fsdp4" else pytest.param(n, marks=pytest.mark.slow) for n in MESHES]
)
def test_analytic_state_bytes_equal_the_moe_train_states_shards(name):
    equality.assert_state_bytes_exact(MOE_MODEL + MESHES[name])


def test_moe_activations_follow_the_tokens_not_the_experts_where_grouped_matmuls_are_native():
    # On a TPU adding experts adds weights, not activations per token; sending each token to more experts
    # does. XLA:CPU and XLA:GPU expand a dropless layer's grouped matmul into a masked copy per expert.
    def activations(platform: str, *overrides: str) -> int:
        cfg = load_config(None, MOE_MODEL + ["mesh.expert=2", *overrides])
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, "pipe": 1, "expert": 2}
        return plan.memory_model.activation_bytes(plan.resolved(cfg), sizes, platform)

    assert (
        abs(activations("tpu", "model.moe.n_experts=16") / activations("tpu") - 1) < 0.01
    )  # only the router's probabilities grow
    assert activations("tpu", "model.moe.top_k=4") > 1.2 * activations("tpu")
    assert activations("cpu", "model.moe.n_experts=16") > 1.2 * activations("cpu")
    capacity = "model.moe.capacity_factor=1.25"
    assert abs(activations("cpu", capacity, "model.moe.n_experts=16") / activations("cpu", capacity) - 1) < 0.01


ONE_DEVICE = [
    "model.d_model=128",
    "model.vocab_size=512",
    "train.seq_len=128",
    "train.batch_size=8",
    "model.moe.d_ff=256",
    "mesh.data=1",
    "mesh.fsdp=1",
    "mesh.tensor=1",
    "mesh.pipe=1",
    "mesh.expert=1",
]
# Seen on one device: 0.88-1.03 over gpt2/llama, dropless/capacity, remat on/off, E 8 and 16 with
# XLA:CPU's default flags (README). The suite's fast-compile flags (conftest) schedule a remat dropless
# step into fewer copies (1.24-1.40), so remat is checked here on the capacity path only. Split experts
# (moe_dispatch's padded all-to-all buffers): 0.85 at expert=2 x data=4, 0.74 at expert=8.
COMPILED_CASES = {  # name -> (overrides, devices, relative tolerance)
    "gpt2-dropless-E16": (["model.moe.n_experts=16"], 1, 0.15),
    "llama-dropless": (["model.arch=llama"], 1, 0.15),
    "llama-capacity-remat": (["model.arch=llama", "model.remat=full", "model.moe.capacity_factor=1.25"], 1, 0.15),
    "dropless-expert2-data4": (["mesh.expert=2", "mesh.data=4", "train.batch_size=64"], 8, 0.20),
}


@pytest.mark.parametrize(
    "name", [n if n == "gpt2-dropless-E16" else pytest.param(n, marks=pytest.mark.slow) for n in COMPILED_CASES]
)
def test_analytic_moe_activations_near_the_compiled_cpu_step(name):
    """Activations against what XLA:CPU allocates beyond the gradients per device (the dropless layers'
    per-expert copies of their grouped matmuls are most of it, and with split experts the padded rows)."""
    overrides, devices, rtol = COMPILED_CASES[name]
    cfg = plan.resolved(load_config(None, MOE_MODEL + ONE_DEVICE + overrides))
    sizes = plan.check_mesh(cfg, devices)
    analytic = plan.memory_model.estimate(cfg, plan.memory_model.boxed_params(cfg.model, cfg.train.seq_len), sizes)
    compiled = plan.compiled_bytes(plan.lower_step(cfg, jax.devices()[:devices])[1].compile())
    assert analytic.activations == pytest.approx(compiled["temp"] - analytic.grads, rel=rtol)
