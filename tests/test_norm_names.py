"""The norms' parameters carry the names the model gives them (``blocks/norm1/scale``), not names Flax
generates (``blocks/norm1/LayerNorm_0/scale``); a checkpoint saved under the generated names still
restores, for inference (``jaxllm.load``) and for resuming training, into today's names."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxllm
from jaxllm.core.config import Config, ModelConfig, resolve_model, save_config
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def model_cfg(arch: str) -> ModelConfig:
    return resolve_model(
        ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, n_kv_head=2), vocab_size=256, seq_len=16
    )


def init_params(cfg: ModelConfig):
    return nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), TOKENS)["params"])


def legacy(params, arch: str):
    """The tree as the model laid it out before its norms were named: each norm's parameters one
    level down, under the name Flax generated for the unnamed LayerNorm / RMSNorm inside it."""
    inner = "LayerNorm_0" if arch == "gpt2" else "RMSNorm_0"

    def convert(node):
        return {
            k: {inner: v} if k.startswith("norm") else convert(v) if isinstance(v, dict) else v for k, v in node.items()
        }

    return convert(params)


@pytest.mark.parametrize("arch, norm_leaves", [("gpt2", {"scale", "bias"}), ("llama", {"scale"})])
def test_norm_parameters_are_named_by_the_model_not_by_flax(arch, norm_leaves):
    layout = ckpt.layout(jax.eval_shape(lambda: init_params(model_cfg(arch))))
    assert {n for n in layout if ".norm" in n or n.startswith("norm")} == {
        f"{where}.{leaf}" for where in ("blocks.norm1", "blocks.norm2", "norm_f") for leaf in norm_leaves
    }
    generated = [n for n in layout if re.search(r"_\d+(\.|$)", n)]  # Flax's Class_<index> names
    assert generated == []


def test_current_name_drops_only_the_generated_norm_level():
    assert ckpt.current_name("params.blocks.norm1.LayerNorm_0.scale") == "params.blocks.norm1.scale"
    assert ckpt.current_name("opt_state.1.0.mu.norm_f.RMSNorm_0.scale") == "opt_state.1.0.mu.norm_f.scale"
    assert ckpt.current_name("params.blocks.attn.q.kernel") == "params.blocks.attn.q.kernel"


def save_legacy_run(run_dir, arch: str):
    """A run directory whose one checkpoint (params and AdamW state) holds the legacy names."""
    cfg = Config(model=model_cfg(arch))
    cfg.train.seq_len = 16
    params = init_params(cfg.model)
    old = legacy(params, arch)
    checkpointer = ckpt.Checkpointer(run_dir, keep=1)
    checkpointer.save(3, {"params": old, "opt_state": optax.adam(1e-3).init(old)}, {"model": {"arch": arch}})
    checkpointer.close()
    save_config(cfg, run_dir / "config.yaml")
    ByteTokenizer().save(run_dir)
    return cfg, params


def test_a_checkpoint_with_generated_norm_names_loads_for_inference(tmp_path):
    cfg, params = save_legacy_run(tmp_path, "llama")
    loaded = jaxllm.load(tmp_path)  # checks every name and shape against the model's, and the checksums
    assert ckpt.layout(loaded.params) == ckpt.layout(params)
    expected = jax.jit(Transformer(cfg.model).apply)({"params": params}, TOKENS)
    np.testing.assert_array_equal(np.asarray(loaded.logits(TOKENS)), np.asarray(expected))


def test_a_checkpoint_with_generated_norm_names_resumes_training(tmp_path):
    cfg, params = save_legacy_run(tmp_path, "gpt2")
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params)}
    checkpointer = ckpt.Checkpointer(tmp_path, keep=1)
    try:
        one_device = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
        restored, meta = checkpointer.restore_latest(ckpt.abstract(state, one_device), cfg.model)
    finally:
        checkpointer.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert "LayerNorm_0" in "".join(meta["layout"])  # it really was the legacy layout on disk
