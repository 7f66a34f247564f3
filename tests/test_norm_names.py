"""The norms' parameters carry the names the model gives them (``blocks/norm1/scale``), not names Flax
generates (``blocks/norm1/LayerNorm_0/scale``): the names checkpoints and ``jaxllm.hf.layout`` use."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)


def model_cfg(arch: str) -> ModelConfig:
    return resolve_model(
        ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, n_kv_head=2), vocab_size=256, seq_len=16
    )


@pytest.mark.parametrize("arch, norm_leaves", [("gpt2", {"scale", "bias"}), ("llama", {"scale"})])
def test_norm_parameters_are_named_by_the_model_not_by_flax(arch, norm_leaves):
    cfg = model_cfg(arch)
    layout = ckpt.layout(jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), TOKENS))))
    layout = {k.removeprefix("params."): v for k, v in layout.items()}
    assert {n for n in layout if ".norm" in n or n.startswith("norm")} == {
        f"{where}.{leaf}" for where in ("blocks.norm1", "blocks.norm2", "norm_f") for leaf in norm_leaves
    }
    generated = [n for n in layout if re.search(r"_\d+(\.|$)", n)]  # Flax's Class_<index> names
    assert generated == []
