"""Weight-only int8 / int4 quantization: real integer storage, bounded error, an exact matmul.

``quantize_params`` runs jitted here: one compilation instead of a dispatch per array operation
(0.75 s of CPU against 2.5 s per call); ``test_generate.py`` runs it eagerly through ``jaxllm.load``."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.model import quantize as quant
from jaxllm.model.transformer import Transformer, linear_axes

CFG = resolve_model(ModelConfig(arch="llama", n_layer=2, d_model=64, n_head=4, n_kv_head=2), vocab_size=64, seq_len=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 32)), jnp.int32)


@pytest.fixture(scope="module")
def float_model():
    model = Transformer(CFG)
    return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), TOKENS)["params"])


def quantized(model, params, mode: str, group_size: int = 64):
    convert = functools.partial(
        quant.quantize_params, axes_by_path=linear_axes(model, params), mode=mode, group_size=group_size
    )
    return jax.jit(convert)(params)


def kernels(params) -> list[quant.QuantizedKernel]:
    return [
        x
        for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
        if isinstance(x, quant.QuantizedKernel)
    ]


@pytest.mark.parametrize("mode, dtype, bits", [("int8", jnp.int8, 8), ("int4", jnp.int4, 4)])
def test_every_matmul_weight_is_stored_as_integers_of_the_mode_width(float_model, mode, dtype, bits):
    model, params = float_model
    qparams = quantized(model, params, mode, group_size=32)
    found = kernels(qparams)
    # 2 scanned layers' q, k, v, o, gate, up, down (the tied embedding is the output head and stays float)
    assert len(found) == 7
    for k in found:
        assert k.q.dtype == dtype
        assert k.q.size * bits // 8 == quant.storage_bytes(k.q)
    if mode == "int8":  # the CPU backend stores int8 at one byte each (it does not pack int4)
        assert all(k.q.on_device_size_in_bytes() == k.q.size for k in found)
    float_kernel_bytes = sum(4 * k.q.size for k in found)
    assert sum(quant.storage_bytes(k.q) for k in found) == float_kernel_bytes * bits // 32


def test_int8_logits_stay_within_2_percent_of_the_float_logit_range(float_model):
    # The bound: max |logit_int8 - logit_float| <= 0.02 * (max - min of the float logits).
    model, params = float_model
    forward = jax.jit(lambda p: model.apply({"params": p}, TOKENS))
    logits, q_logits = forward(params), forward(quantized(model, params, "int8"))
    spread = float(jnp.max(logits) - jnp.min(logits))
    assert float(jnp.max(jnp.abs(q_logits - logits))) <= 0.02 * spread
    assert float(jnp.max(jnp.abs(q_logits - logits))) > 0  # the quantized weights were really used


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("mode, group_size", [("int8", 0), ("int4", 16)])
def test_rounding_error_is_at_most_half_a_step(mode, group_size):
    w = normal(1, (3, 32, 4, 8))  # layers x in x (heads x head_dim)

    @jax.jit
    def round_trip(w):
        k = quant.quantize_kernel(w, n_lead=1, n_in=1, mode=mode, group_size=group_size)
        return k, quant.dequantize(k, n_lead=1, n_in=1)

    k, w_back = round_trip(w)
    groups = 1 if mode == "int8" else 32 // group_size
    assert k.scale.shape == (3, groups, 4, 8)
    step = np.repeat(np.asarray(k.scale), 32 // groups, axis=1)
    assert np.all(np.abs(np.asarray(w_back) - w) <= step / 2 + 1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_dot_equals_matmul_with_the_dequantized_kernel(mode):
    w = normal(2, (4, 8, 32))  # two input axes (heads x head_dim) -> 32
    x = normal(3, (2, 5, 4, 8))

    @jax.jit
    def both(w, x):
        k = quant.quantize_kernel(w, n_lead=0, n_in=2, mode=mode, group_size=8)
        expected = jnp.einsum("btnh,nhd->btd", x, quant.dequantize(k, n_lead=0, n_in=2))
        return quant.quantized_dot(x, k, 2, jnp.float32), expected

    got, expected = both(w, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_int4_smaller_groups_track_the_weights_more_closely(float_model):
    model, params = float_model
    w = params["blocks"]["mlp"]["down"]["kernel"]  # layers x mlp x embed

    def error(group_size: int) -> float:
        k = quantized(model, params, "int4", group_size)["blocks"]["mlp"]["down"]["kernel"]
        return float(jnp.mean(jnp.abs(quant.dequantize(k, n_lead=1, n_in=1) - w)))

    assert error(16) < error(64) < error(192)
    assert math.isclose(error(192), error(10_000))  # a group larger than the input is the whole input


def test_unknown_mode_and_non_dividing_group_are_refused(float_model):
    model, params = float_model
    with pytest.raises(ConfigError, match="unknown quantization mode 'int2'"):
        quant.quantize_params(params, linear_axes(model, params), "int2")
    with pytest.raises(ConfigError, match="group size 48 does not divide"):
        quant.quantize_params(params, linear_axes(model, params), "int4", group_size=48)
