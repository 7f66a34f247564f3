"""The training options the shipped configs turn on, each against its definition: dropout, remat,
bfloat16 compute, the learning-rate schedules, the weight-decay mask; and the data the runs read:
disjoint task splits, Hugging Face configs that jaxllm cannot express. Tiny in-process models
(d_model 32, 2 layers, 16 positions)."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from equality import rel

import jaxllm
from jaxllm.core.config import ModelConfig, OptimConfig, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.data import tasks
from jaxllm.hf import convert as hf
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import optim
from jaxllm.train.train_step import make_loss_fn

TOKENS_BxT1 = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 17)), jnp.int32)


def tiny(**changes) -> ModelConfig:
    base = ModelConfig(arch="gpt2", n_layer=2, d_model=32, n_head=4, **changes)
    return resolve_model(base, vocab_size=64, seq_len=16)


def init(cfg: ModelConfig):
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), TOKENS_BxT1[:, :-1])["params"])


@pytest.fixture(scope="module")
def params():
    return init(tiny())  # dropout, remat and dtype add no parameters: one tree serves every variant


def logits(cfg: ModelConfig, params, deterministic: bool = True, rng=None):
    model = Transformer(cfg, deterministic=deterministic)
    rngs = None if rng is None else {"dropout": rng}
    return jax.jit(lambda p: model.apply({"params": p}, TOKENS_BxT1[:, :-1], rngs=rngs))(params)


# --------------------------------------------------------------------------- dropout


def test_dropout_in_training_draws_a_new_mask_per_key(params):
    train = jax.jit(make_loss_fn(Transformer(tiny(dropout=0.5), deterministic=False)))
    first, _ = train(params, TOKENS_BxT1, jax.random.PRNGKey(1))
    again, _ = train(params, TOKENS_BxT1, jax.random.PRNGKey(1))
    other, _ = train(params, TOKENS_BxT1, jax.random.PRNGKey(2))
    assert float(first) == float(again)
    assert float(first) != float(other)


def test_evaluation_ignores_the_dropout_rate(params):
    np.testing.assert_array_equal(logits(tiny(dropout=0.5), params), logits(tiny(), params))


def test_dropout_rate_zero_in_training_equals_no_dropout(params):
    trained = logits(tiny(dropout=0.0), params, deterministic=False, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(trained, logits(tiny(), params))


# --------------------------------------------------------------------------- remat and bfloat16


def loss_and_grads(cfg: ModelConfig, params):
    loss_fn = make_loss_fn(Transformer(cfg))
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, TOKENS_BxT1, jax.random.PRNGKey(0))


def test_remat_recomputes_blocks_without_changing_loss_or_gradients(params):
    (loss, _), grads = loss_and_grads(tiny(), params)
    (remat_loss, _), remat_grads = loss_and_grads(tiny(remat="full"), params)
    # The project's float32 equality (tests/equality.rel <= 1e-5), over the whole gradient vector: the
    # recomputed forward sits in the backward program, where XLA may fuse it differently, so the
    # rounding order differs. Entry by entry that is up to 1e-4 relative on the smallest gradients, and
    # noise on the attention key bias, whose gradient is exactly zero in exact arithmetic (a shift of
    # every key's score by the same q.b leaves the softmax unchanged): 1e-12 either way.
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    flat = [jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (remat_grads, grads)]
    assert rel(*flat) <= 1e-5
    # and the flag took effect: the backward pass holds a rematerialised block
    grad_fn = jax.grad(
        lambda p: make_loss_fn(Transformer(tiny(remat="full")))(p, TOKENS_BxT1, jax.random.PRNGKey(0))[0]
    )
    assert "remat" in str(jax.make_jaxpr(grad_fn)(params))
    assert "remat" not in str(
        jax.make_jaxpr(jax.grad(lambda p: make_loss_fn(Transformer(tiny()))(p, TOKENS_BxT1, jax.random.PRNGKey(0))[0]))(
            params
        )
    )


def test_bfloat16_compute_keeps_float32_parameters_and_logits_within_bfloat16_rounding(params):
    cfg = tiny(dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(jax.eval_shape(lambda: init(cfg)))} == {jnp.dtype(jnp.float32)}
    half, full = logits(cfg, params), logits(tiny(), params)
    assert half.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits (a relative step of 2^-8); through two blocks and the head
    # the error stays within a few such steps of the logits' scale, and well above float32's
    scale = float(jnp.max(jnp.abs(full)))
    error = float(jnp.max(jnp.abs(half.astype(jnp.float32) - full)))
    assert error <= 4 * 2.0**-8 * scale
    assert error > 2.0**-20 * scale  # the bf16 path really ran in bf16
    (_, _), grads = loss_and_grads(cfg, params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


# --------------------------------------------------------------------------- learning-rate schedules

LR, MIN_LR, WARMUP, STEPS = 1e-3, 1e-4, 10, 110  # 100 steps after the warmup
MID, END = WARMUP + 50, STEPS


@pytest.mark.parametrize(
    "name, at_mid, at_end",
    [
        ("cosine", (LR + MIN_LR) / 2, MIN_LR),  # lr_min + (lr - lr_min)(1 + cos(pi t))/2 at t = 1/2 and 1
        ("linear", (LR + MIN_LR) / 2, MIN_LR),
        ("wsd", LR, MIN_LR),  # stable until the last decay_fraction (20 of 100 steps), then linear
        ("constant", LR, LR),
    ],
)
def test_schedule_after_warmup_at_the_middle_and_the_end(name, at_mid, at_end):
    lr = optim.schedule(OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, schedule=name), STEPS)
    assert float(lr(0)) == 0.0
    assert math.isclose(float(lr(WARMUP // 2)), LR / 2, rel_tol=1e-6)
    assert math.isclose(float(lr(WARMUP)), LR, rel_tol=1e-6)
    assert math.isclose(float(lr(MID)), at_mid, rel_tol=1e-6)
    assert math.isclose(float(lr(END)), at_end, rel_tol=1e-6)


def test_wsd_decays_linearly_over_its_last_decay_fraction():
    cfg = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, schedule="wsd", decay_fraction=0.2)
    lr = optim.schedule(cfg, STEPS)
    assert math.isclose(float(lr(STEPS - 20)), LR, rel_tol=1e-6)  # the decay starts 20 steps before the end
    assert math.isclose(float(lr(STEPS - 10)), (LR + MIN_LR) / 2, rel_tol=1e-6)


# --------------------------------------------------------------------------- weight decay


def test_weight_decay_reaches_matrices_and_the_token_embedding_only():
    params = jax.eval_shape(lambda: init(tiny(tie_embeddings=False)))
    mask = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    decayed = {".".join(k.key for k in path) for path, on in mask if on}
    kernels = {n for n in ckpt.layout(params) if n.endswith(".kernel")}
    assert decayed == kernels | {"wte.embedding"}
    assert {"wpe.embedding", "norm_f.scale", "norm_f.bias", "blocks.norm1.scale", "blocks.attn.q.bias"}.isdisjoint(
        decayed
    )


def test_the_optimizer_decays_exactly_the_masked_leaves(params):
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0.0)
    tx = optim.optimizer(cfg, steps=10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    mask = optim.decay_mask(params)
    for update, p, on in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask)):
        # with no gradient, AdamW's update is the decoupled decay alone: -lr * weight_decay * p
        np.testing.assert_allclose(update, -0.1 * 0.5 * p if on else np.zeros_like(p), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- data


def test_task_splits_share_no_instruction():
    train = {chat[0]["content"] for _, chat in tasks.dataset("train", 40)}
    held_out = {chat[0]["content"] for _, chat in tasks.dataset("eval", 40)}
    assert len(held_out) == 40 * len(tasks.TASKS)  # every held-out prompt distinct
    assert train.isdisjoint(held_out)
    assert all(tasks.is_held_out(i) for i in held_out) and not any(tasks.is_held_out(i) for i in train)


# --------------------------------------------------------------------------- Hugging Face configs

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 16}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 64,
    "max_position_embeddings": 16,
}


def test_the_plain_hf_configs_are_read():  # the refusals below are each one key away from these
    assert (hf.model_config(GPT2, "c").arch, hf.model_config(LLAMA, "c").arch) == ("gpt2", "llama")


@pytest.mark.parametrize(
    "config, message",
    [
        ({**GPT2, "model_type": "mistral"}, "model_type 'mistral' is not supported; jaxllm reads gpt2"),
        ({**GPT2, "activation_function": "relu"}, "GPT-2 activation 'relu' is not supported"),
        ({**GPT2, "scale_attn_by_inverse_layer_idx": True}, "GPT-2 attention variants"),
        ({**LLAMA, "head_dim": 16}, "head_dim=16 differs from hidden_size/num_attention_heads"),
        ({**LLAMA, "attention_bias": True}, "LLaMA with biases or an activation other than silu"),
        ({**LLAMA, "hidden_act": "gelu"}, "LLaMA with biases or an activation other than silu"),
        ({**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling .* is not supported"),
    ],
)
def test_hf_configs_jaxllm_cannot_express_are_refused_by_name(config, message):
    with pytest.raises(ConfigError, match=message):
        hf.model_config(config, "config.json")


def test_loading_an_hf_directory_with_an_unsupported_config_is_one_line(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    save_file({"model.embed_tokens.weight": np.zeros((64, 32), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as refused:
        jaxllm.load(tmp_path)
    assert "rope_scaling" in str(refused.value) and "\n" not in str(refused.value)
    assert str(tmp_path / "config.json") in str(refused.value)  # it names the file
