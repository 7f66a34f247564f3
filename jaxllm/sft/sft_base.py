"""The model fine-tuning starts from: ``init.from``'s config with the run's compute options, and its
parameters laid out on the run's mesh as pre-training lays them out, a Hugging Face checkpoint
streamed straight into those shardings (:mod:`jaxllm.hf.stream`), so no device ever holds the whole
model unless the mesh says so.

The weights fix the model's shape; the config's ``model`` section may only choose how it computes
(:data:`COMPUTE_ONLY`), and a key set there that would change the shape is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from jaxllm.core.config import ModelConfig
from jaxllm.core.errors import ConfigError
from jaxllm.hf import stream as hf_stream
from jaxllm.infer import api
from jaxllm.parallel import sharding

# model.* keys that change how the model computes, not its weights
COMPUTE_ONLY = (
    "dtype",
    "remat",
    "scan_unroll",
    "attention",
    "attention_block",
    "dropout",
    "loss_chunk",
    "matmul_dtype",
)


def with_compute_options(base: ModelConfig, asked: ModelConfig) -> ModelConfig:
    """``base`` (init.from's model) with the compute-only options that ``asked`` (the config's
    ``model`` section) sets away from their defaults; any other key set there must agree with ``base``."""
    default = ModelConfig()
    chosen = [f.name for f in dataclasses.fields(ModelConfig) if getattr(asked, f.name) != getattr(default, f.name)]
    for key in chosen:
        if key not in COMPUTE_ONLY and getattr(asked, key) != getattr(base, key):
            raise ConfigError(
                f"model.{key}={getattr(asked, key)!r} would change init.from's model "
                f"({key} is {getattr(base, key)!r}); "
                f"its weights fix the shape: only {', '.join('model.' + k for k in COMPUTE_ONLY)} may be set"
            )
    return dataclasses.replace(base, **{k: getattr(asked, k) for k in chosen if k in COMPUTE_ONLY})


def param_shardings(tree: Any, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, rule_table) -> Any:
    """A sharding per leaf of ``tree`` (arrays or shape structs): a leaf of the model ``model_cfg``
    describes, by its logical names; the method's own small leaves (LoRA, prompt, new tokens) and a
    leaf whose size the mesh does not divide (a vocabulary grown by the chat markers), replicated."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        boxed = hf_stream.abstract_params(model_cfg)
        sharding.check_param_divisible(boxed, mesh, rule_table)
        named = sharding.logical_shardings(boxed, mesh, rule_table)
    by_key = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_leaves_with_path(named)}
    repl = sharding.replicated(mesh)

    def pick(path, leaf):
        s = by_key.get(jax.tree_util.keystr(path))
        return s if s is not None and sharding.fits(s, leaf.shape) else repl

    return jax.tree_util.tree_map_with_path(pick, tree)


def load(init_from: str | Path, asked: ModelConfig, mesh: jax.sharding.Mesh, rule_table) -> api.LoadedModel:
    """``init.from`` with the compute options of ``asked``, its parameters under :func:`param_shardings`
    (a Hugging Face directory streams into them; a jaxllm run's checkpoint is placed after reading)."""
    m = with_compute_options(api.model_config(init_from), asked)
    shardings = param_shardings(nn.unbox(hf_stream.abstract_params(m)), m, mesh, rule_table)
    base = api.load(init_from, shardings=shardings)
    if isinstance(base.tokenizer, api.NoTokenizer):
        raise ConfigError(
            f"init.from={str(init_from)!r} has no tokenizer.json: fine-tuning on text needs the model's tokenizer"
        )
    return dataclasses.replace(
        base, config=dataclasses.replace(base.config, model=m), params=jax.device_put(base.params, shardings)
    )
