"""``model.remat``'s policies: each keeps what it says (the compiled step's scratch memory falls from
none to dots to dots_no_batch to full), none changes the step (one device, and 8 faked devices under
data, fsdp, tensor and pipe), and offload is refused in one line where the device has no host memory."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equality import one_step, rel

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.model import remat
from jaxllm.model.transformer import Transformer
from jaxllm.train.train_step import make_loss_fn

POLICIES = ("full", "dots", "dots_no_batch", "offload")
TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "train.seq_len=16", "optim.clip_norm=0"]
ONE = ["mesh.data=1", "mesh.fsdp=1"]


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def reference():
    return one_step([*TINY, *ONE], jax.devices()[:1], vocab=64, seq=16, batch=8)


def assert_same_step(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert rel(flat(got["grads"]), flat(want["grads"])) <= 1e-5


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_the_one_device_step(reference, policy):
    got = one_step([*TINY, *ONE, f"model.remat={policy}"], jax.devices()[:1], 64, 16, 8, reference["initial"])
    assert_same_step(got, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "mesh"),
    [
        ("dots_no_batch", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
        ("offload", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
        ("dots", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.pipe=2"]),
    ],
)
def test_policies_on_eight_devices_give_the_one_device_step(reference, policy, mesh):
    got = one_step([*TINY, *mesh, f"model.remat={policy}"], jax.devices()[:8], 64, 16, 8, reference["initial"])
    assert_same_step(got, reference)


def scratch_bytes(policy: str) -> int:
    """Temp bytes of one device's compiled gradient of a 64-position step under ``policy``."""
    cfg = resolve_model(ModelConfig(n_layer=2, d_model=32, n_head=4, remat=policy), 64, 64)
    model, tokens = Transformer(cfg), jnp.zeros((4, 65), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"]))
    grad = jax.jit(jax.grad(lambda p: make_loss_fn(model)(p, tokens, jax.random.PRNGKey(0))[0]))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_policies_keep_less_from_none_to_full():
    kept = [scratch_bytes(p) for p in ("none", "dots", "dots_no_batch", "full")]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 4


class _NoHost:
    platform = "fake"

    def addressable_memories(self):
        return [type("Memory", (), {"kind": "device"})()]


def test_offload_is_refused_without_host_memory():
    with pytest.raises(ConfigError, match="model.remat=offload needs pinned_host"):
        remat.check_offload(_NoHost())


def test_unknown_policy_is_refused_at_validation():
    from jaxllm.core.config import load_config, validate

    with pytest.raises(ConfigError, match="model.remat"):
        validate(load_config(None, ["model.remat=true"]))
