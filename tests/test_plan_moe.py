"""The planner on mixture-of-experts models: the memory model holds every expert (sharded over the
``expert`` axis as the rules table says), activations count the k experts a token goes through."""

from __future__ import annotations

import equality
import pytest

from jaxllm.core.config import load_config
from jaxllm.plan import planner as plan

MOE_MODEL = [
    "model.arch=gpt2", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.vocab_size=256",
    "train.seq_len=32", "train.batch_size=16", "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.d_ff=128",
]
MESHES = {
    "expert8": ["mesh.expert=8"],
    "expert2-fsdp4": ["mesh.expert=2", "mesh.fsdp=4"],
    "expert4-tensor2-shared": ["mesh.expert=4", "mesh.tensor=2", "model.arch=llama", "model.moe.shared_experts=1"],
    "data8-zero1": ["mesh.data=8", "optim.shard_state=true"],
}


@pytest.mark.parametrize("name", [n if n == "expert2-fsdp4" else pytest.param(n, marks=pytest.mark.slow) for n in MESHES])
def test_analytic_state_bytes_equal_the_moe_train_states_shards(name):
    equality.assert_state_bytes_exact(MOE_MODEL + MESHES[name])


def test_moe_activations_follow_the_tokens_not_the_experts():
    # Adding experts adds weights, not activations per token; sending each token to more experts does.
    def activations(*overrides: str) -> int:
        cfg = load_config(None, MOE_MODEL + ["mesh.expert=2", *overrides])
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, "pipe": 1, "expert": 2}
        return plan.memory_model.activation_bytes(cfg, plan.resolve(cfg), sizes)

    assert abs(activations("model.moe.n_experts=16") / activations() - 1) < 0.01  # only the router's probabilities grow
    assert activations("model.moe.top_k=4") > 1.2 * activations()
