"""The transformer: causal, both flavours and both ablations, GPT-2 init, counts that match."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.model import flops
from jaxllm.model.transformer import Transformer, cross_entropy, residual_std

FLAVOURS = {
    "gpt2": {"arch": "gpt2"},
    "llama": {"arch": "llama", "n_kv_head": 2},
}


def model_of(arch="gpt2", **kw) -> Transformer:
    return Transformer(
        resolve_model(ModelConfig(**{"n_layer": 2, "d_model": 32, "n_head": 4, **FLAVOURS[arch], **kw}), 64, 16)
    )


def make(arch="gpt2", **kw) -> tuple[Transformer, dict]:
    """The model and its initial parameters, built once per module for each (arch, kw)."""
    return _made(arch, tuple(sorted(kw.items())))


@functools.cache
def _made(arch: str, kw: tuple) -> tuple[Transformer, dict]:
    model = model_of(arch, **dict(kw))
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 16), jnp.int32))["params"]))
    return model, init(jax.random.PRNGKey(0))


def logits_of(model: Transformer, params, tokens_BxT):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens_BxT)


def tokens(seed=0, shape=(2, 16)):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 64)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_changing_token_t_changes_no_logit_before_t(arch):
    model, params = make(arch)
    x = tokens()
    t = 9
    y = x.at[:, t].set((x[:, t] + 1) % 64)
    a, b = logits_of(model, params, x), logits_of(model, params, y)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", [{}, {"residual": False}, {"norm_position": "post"}, {"tie_embeddings": False}])
@pytest.mark.slow
def test_flavours_and_ablations_give_finite_distinct_logits(arch, variant):
    model, params = make(arch, **variant)
    logits = logits_of(model, params, tokens())
    assert logits.shape == (2, 16, 64)
    assert np.isfinite(np.asarray(logits)).all()
    if variant:
        base_model, base_params = make(arch)
        assert not np.allclose(logits_of(base_model, base_params, tokens()), logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_parameter_counts_match_the_hand_count(arch):
    for variant in ({}, {"norm_position": "post"}, {"tie_embeddings": False}):
        cfg = resolve_model(
            ModelConfig(**{"n_layer": 2, "d_model": 32, "n_head": 4, **FLAVOURS[arch], **variant}), 64, 16
        )
        model = Transformer(cfg)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
        real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
        assert real == flops.param_counts(model.cfg)["total"], variant


def test_hand_counts_of_known_models():
    # GPT-2 small: 124,439,808 parameters with the 50257-token vocabulary (Hugging Face's count).
    gpt2 = resolve_model(ModelConfig(arch="gpt2", n_layer=12, d_model=768, n_head=12, vocab_size=50257), 50257, 1024)
    assert flops.param_counts(gpt2)["total"] == 124_439_808
    # Llama 3.2 1B: 1,235,814,400 parameters (tied embeddings, 128256 vocab, GQA 32/8, d_ff 8192).
    llama = resolve_model(
        ModelConfig(arch="llama", n_layer=16, d_model=2048, n_head=32, n_kv_head=8, d_ff=8192, vocab_size=128256),
        128256,
        2048,
    )
    assert flops.param_counts(llama)["total"] == 1_235_814_400


def test_flops_per_token_is_palm_formula():
    cfg = resolve_model(ModelConfig(arch="gpt2", n_layer=12, d_model=768, n_head=12, vocab_size=50257), 50257, 1024)
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert flops.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_init_is_gpt2_normal_with_scaled_residual_projections():
    model, params = make("gpt2", n_layer=2, d_model=64)
    blocks = params["blocks"]
    assert np.std(np.asarray(blocks["attn"]["q"]["kernel"])) == pytest.approx(0.02, rel=0.1)
    for out in (blocks["attn"]["o"]["kernel"], blocks["mlp"]["down"]["kernel"]):
        assert np.std(np.asarray(out)) == pytest.approx(residual_std(model.cfg), rel=0.1)
    assert residual_std(model.cfg) == pytest.approx(0.02 / 2.0)


def test_blocks_are_stacked_with_a_layers_axis():
    model = model_of("llama", n_layer=3)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
    q = boxed["blocks"]["attn"]["q"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
    assert q.value.shape == (3, 32, 4, 8)


@pytest.mark.parametrize("unroll", [2, 3])
@pytest.mark.slow
def test_unrolled_layer_loop_has_the_same_parameters_logits_and_gradients(unroll):
    model, params = make("gpt2", n_layer=3)
    unrolled, unrolled_params = make("gpt2", n_layer=3, scan_unroll=unroll)
    jax.tree.map(np.testing.assert_array_equal, params, unrolled_params)  # same init, same layout

    def loss(m):
        return jax.jit(jax.value_and_grad(lambda p, t: cross_entropy(m.apply({"params": p}, t[:, :-1]), t[:, 1:])[0]))

    x = tokens(shape=(2, 17))
    (value, grads), (unrolled_value, unrolled_grads) = loss(model)(params, x), loss(unrolled)(params, x)
    np.testing.assert_allclose(logits_of(unrolled, params, x), logits_of(model, params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unrolled_value, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), unrolled_grads, grads)


def test_cross_entropy_of_uniform_logits_is_log_vocab_and_masks_count():
    logits = jnp.zeros((2, 5, 64))
    targets = jnp.ones((2, 5), jnp.int32)
    loss, count = cross_entropy(logits, targets)
    assert float(loss) == pytest.approx(np.log(64), rel=1e-6) and float(count) == 10
    weights = jnp.zeros((2, 5)).at[0, 0].set(1.0)
    logits = logits.at[0, 0, 1].set(5.0)
    loss, count = cross_entropy(logits, targets, weights)
    assert float(count) == 1 and float(loss) == pytest.approx(float(jnp.log(jnp.exp(5.0) + 63) - 5.0), rel=1e-6)


def test_packed_segments_do_not_attend_across():
    model, params = make("llama")
    x = tokens()
    seg = jnp.concatenate([jnp.ones((2, 8), jnp.int32), 2 * jnp.ones((2, 8), jnp.int32)], axis=1)
    pos = jnp.concatenate([jnp.arange(8), jnp.arange(8)])[None].repeat(2, 0)
    apply = jax.jit(model.apply)
    packed = apply({"params": params}, x, pos, seg)
    second_alone = apply({"params": params}, x[:, 8:])
    np.testing.assert_allclose(packed[:, 8:], second_alone, atol=1e-5)
