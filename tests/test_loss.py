"""The fused loss (``model.loss_chunk``): the same loss and gradients as the whole logits' (float32,
rel 1e-5) as a function, as one device's step (tied and untied heads) and on 8 faked devices (data,
fsdp, tensor with the vocabulary split, pipe); and its compiled gradient holds no [B, T, V] float32
buffer where the whole loss's does."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equality import one_step, rel

from jaxllm.core.config import load_config, resolve, validate
from jaxllm.core.errors import ConfigError
from jaxllm.model.loss import chunked_cross_entropy, cross_entropy
from jaxllm.parallel import sharding
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import trainer

TINY = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "train.seq_len=16", "optim.clip_norm=0"]
ONE = ["mesh.data=1", "mesh.fsdp=1"]


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def whole(x, w, t, m):
    return cross_entropy(jnp.einsum("btd,dv->btv", x, w), t, m)[0]


def test_chunked_loss_and_gradients_equal_the_whole_logits():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, w = jax.random.normal(k[0], (3, 16, 8)), jax.random.normal(k[1], (8, 40))
    t, m = jax.random.randint(k[2], (3, 16), 0, 40), (jax.random.uniform(k[3], (3, 16)) > 0.3).astype(jnp.float32)
    want, grads_want = jax.value_and_grad(whole, argnums=(0, 1))(x, w, t, m)
    fused = lambda x, w: chunked_cross_entropy(x, w, t, m, 4, jnp.float32)[0]
    got, grads_got = jax.value_and_grad(fused, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert rel(flat(grads_got), flat(grads_want)) <= 1e-6


@pytest.fixture(scope="module")
def reference():
    return {
        tied: one_step([*TINY, *ONE, f"model.tie_embeddings={tied}"], jax.devices()[:1], 64, 16, 8)
        for tied in ("true", "false")
    }


def assert_same_step(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert rel(flat(got["grads"]), flat(want["grads"])) <= 1e-5


@pytest.mark.parametrize("tied", ["true", "false"])
def test_fused_step_equals_the_whole_logits_step(reference, tied):
    args = [*TINY, *ONE, f"model.tie_embeddings={tied}", "model.loss_chunk=4"]
    assert_same_step(one_step(args, jax.devices()[:1], 64, 16, 8, reference[tied]["initial"]), reference[tied])


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [
        ["mesh.data=8"],
        ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.pipe=2"],
    ],
)
def test_fused_step_on_eight_devices_equals_one_device(reference, mesh):
    args = [*TINY, *mesh, "model.loss_chunk=4"]
    assert_same_step(one_step(args, jax.devices()[:8], 64, 16, 8, reference["true"]["initial"]), reference["true"])


def largest_f32_buffer(chunk: int, b: int = 2, t: int = 64, v: int = 512) -> int:
    """Elements of the largest float32 array in the optimised HLO of the loss's gradient."""
    x, w = jnp.zeros((b, t, 16)), jnp.zeros((16, v))
    tg = jnp.zeros((b, t), jnp.int32)
    if chunk:
        f = lambda x, w: chunked_cross_entropy(x, w, tg, None, chunk, jnp.float32)[0]
    else:
        f = lambda x, w: whole(x, w, tg, None)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    return max(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"f32\[([\d,]+)\]", hlo))


def test_fused_gradient_holds_no_whole_logits():
    assert largest_f32_buffer(0) >= 2 * 64 * 512  # the whole loss does hold them: the check can fail
    assert largest_f32_buffer(8) < 2 * 64 * 512


def loop_all_reduces(overrides: list[str]) -> list[str]:
    """The all-reduces inside the while loops of the compiled train step on 8 devices (their shapes),
    the vocabulary large enough (1024 words) that the head's gradient is the largest."""
    cfg = resolve(load_config(None, [*TINY, *overrides]), 1024)
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:8]))
    with setup.context():
        state = ckpt.abstract(jax.eval_shape(setup.init), setup.state_shardings)
        batch = jax.ShapeDtypeStruct((1, 8, 17), jnp.int32, sharding=setup.batch_sharding)
        hlo = setup.step.lower(state, batch).compile().as_text()
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    computations = {c.split(" ", 1)[0].lstrip("%"): c for c in re.split(r"\n(?=\S)", hlo)}
    return [op for name in bodies for op in re.findall(r"= (\S+) all-reduce\(", computations.get(name, ""))]


@pytest.mark.slow
def test_fused_loss_reduces_the_head_gradient_once_not_per_block():
    """Under data parallelism the [D, V] gradient is summed over devices after the blocks' loop: no
    loop sums anything larger than a scalar over devices."""
    assert {op.split("{")[0] for op in loop_all_reduces(["mesh.data=8", "model.loss_chunk=4"])} <= {"f32[]"}


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
    with pytest.raises(ConfigError, match="model.loss_chunk=5 does not divide train.seq_len=16"):
        validate(load_config(None, ["train.seq_len=16", "model.loss_chunk=5"]))
