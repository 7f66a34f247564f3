"""lm-evaluation-harness's ``LM`` (:mod:`jaxllm.evals.lm`) on a model from disk: a jaxllm run on its own
mesh config, or a Hugging Face directory data parallel over this process's devices, its parameters
placed by their logical names. :func:`load` is what ``python -m jaxllm.evaluate`` scores; a training
run scores its own parameters instead (:mod:`jaxllm.evals.during_training`).
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxllm.core.config import MeshConfig, from_dict
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import read_yaml
from jaxllm.data import tokenizer as tokenizers
from jaxllm.evals.lm import Backend, mesh_context, on_mesh
from jaxllm.infer import api
from jaxllm.parallel import sharding


def backend(model: api.LoadedModel, mesh: jax.sharding.Mesh | None = None, rules: tuple = ()) -> Backend:
    """The :class:`Backend` of a loaded model (its parameters already on ``mesh``, if given)."""
    if isinstance(model.tokenizer, api.NoTokenizer):
        raise ConfigError(
            f"{model.tokenizer.directory} has no {tokenizers.FILENAME}: the harness's tasks are text, "
            "and this model reads token ids only"
        )

    def decode_fn(params, prompts, n_new, **sampling):
        return model.decoder(params, [model.prefix + list(p) for p in prompts], n_new, **sampling)

    extra = on_mesh(mesh, rules) if mesh is not None else {}
    m = model.config.model
    return Backend(model.params, model._prefixed_logits, decode_fn, model.tokenizer, model.roles,
                   m.max_seq_len - len(model.prefix), **extra)  # fmt: skip


def load(path: str, quantize: str | None = None) -> tuple[api.LoadedModel, Backend]:
    """A jaxllm run (on its mesh config, over this process's devices) or a Hugging Face directory (data
    parallel over them), its parameters placed by their logical names, and its :class:`Backend`."""
    from jaxllm.hf import stream as hf_stream

    m = api.model_config(path)
    run = Path(path) / "config.yaml"  # a jaxllm run: its own mesh config
    mesh_cfg = from_dict(read_yaml(run, "run config")).mesh if run.is_file() else MeshConfig()
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
    with mesh_context(mesh, rules):
        boxed = hf_stream.abstract_params(m)
        sharding.check_param_divisible(boxed, mesh, rules)
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    model = api.load(path, quantize=quantize, shardings=shardings)
    if quantize is None:
        model.params = jax.device_put(model.params, shardings)
    return model, backend(model, mesh, rules)
