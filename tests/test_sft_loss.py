"""Fine-tuning's loss under ``model.loss_chunk`` and the compute options a fine-tune may set over its base."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equality import rel
from test_sft import SEQ, batch, tiny, with_lora

from jaxllm.core.config import ModelConfig
from jaxllm.core.errors import ConfigError
from jaxllm.data import chat
from jaxllm.model.transformer import Transformer
from jaxllm.sft import peft, sft_base, sft_loss


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def loss_and_grads(model: Transformer, params: dict, method: str, lora_scale: float):
    mask = peft.trainable_mask(params, method)
    fn = sft_loss.make_loss_fn(model, mask, lora_scale)
    (loss, _), grads = jax.value_and_grad(fn, has_aux=True)(params, batch(), jax.random.PRNGKey(3))
    return loss, grads


@pytest.mark.parametrize(
    "arch, method, tie",
    [
        ("gpt2", "full", True),
        pytest.param("llama", "full", False, marks=pytest.mark.slow),
        pytest.param("llama", "lora", True, marks=pytest.mark.slow),
    ],
)
def test_fused_sft_loss_equals_the_unfused_masked_loss_and_gradients(arch, method, tie):
    model, params = tiny(arch, tie_embeddings=tie)
    if method == "lora":
        params = with_lora(params)
        params["blocks"]["attn"]["q"]["lora_b"] = 0.1 * jnp.ones_like(params["blocks"]["attn"]["q"]["lora_b"])
    fused = Transformer(dataclasses.replace(model.cfg, loss_chunk=SEQ // 4))
    want_loss, want_grads = loss_and_grads(model, params, method, 2.0)
    got_loss, got_grads = loss_and_grads(fused, params, method, 2.0)
    assert rel(got_loss, want_loss) < 1e-5
    assert rel(flat(got_grads), flat(want_grads)) < 1e-5
    frozen = [
        g for g, m in zip(jax.tree.leaves(got_grads), jax.tree.leaves(peft.trainable_mask(params, method))) if not m
    ]
    assert not any(np.any(g) for g in frozen)


def largest_f32_elements(model: Transformer, params: dict) -> int:
    """Elements of the largest float32 array in the optimised HLO of the SFT loss's gradient."""
    fn = sft_loss.make_loss_fn(model, peft.trainable_mask(params, "full"), 0.0)
    grad = jax.jit(jax.grad(lambda p, b: fn(p, b, jax.random.PRNGKey(0))[0]))
    hlo = grad.lower(params, batch()).compile().as_text()
    return max(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"f32\[([\d,]+)\]", hlo))


def test_fused_sft_gradient_holds_no_whole_float32_logits():
    model, params = tiny("gpt2")
    b, t, v = batch().shape[0], SEQ, params["wte"]["embedding"].shape[0] + params["new_tokens"]["embedding"].shape[0]
    assert largest_f32_elements(model, params) >= b * t * v
    fused = Transformer(dataclasses.replace(model.cfg, loss_chunk=SEQ // 4))
    assert largest_f32_elements(fused, params) < b * t * v


def test_fused_sft_loss_counts_only_the_assistant_tokens():
    model, params = tiny("gpt2")
    fused = Transformer(dataclasses.replace(model.cfg, loss_chunk=SEQ // 4))
    b = batch()
    nll = np.asarray(sft_loss.per_token_nll(model, params, b))
    weights = np.asarray(b[:, chat.MASK], np.float64)
    loss, _ = sft_loss.make_loss_fn(fused, peft.trainable_mask(params, "full"), 0.0)(params, b, jax.random.PRNGKey(0))
    assert rel(loss, (nll * weights).sum() / weights.sum()) < 1e-5


def test_a_fine_tune_may_set_the_fused_loss_and_fp8_over_its_base():
    base = ModelConfig(n_layer=2, d_model=32, n_head=4)
    got = sft_base.with_compute_options(base, ModelConfig(loss_chunk=8, matmul_dtype="fp8"))
    assert (got.loss_chunk, got.matmul_dtype, got.n_layer, got.d_model) == (8, "fp8", 2, 32)


def test_a_fine_tune_that_changes_the_base_shape_is_refused_naming_the_compute_options():
    base = ModelConfig(n_layer=2, d_model=32, n_head=4)
    with pytest.raises(ConfigError, match="model.d_model=64 would change.*model.loss_chunk, model.matmul_dtype"):
        sft_base.with_compute_options(base, ModelConfig(d_model=64))
