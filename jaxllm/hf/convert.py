"""Hugging Face weights in and out: ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and ``MixtralForCausalLM`` directories.

A Hugging Face model directory holds ``config.json``, weights in ``*.safetensors`` (one file, or
several named by ``model.safetensors.index.json``) and, optionally, tokenizer files. :func:`read`
turns one into a jaxllm model config and parameters placed under the run's shardings, streamed a
block at a time (:mod:`jaxllm.hf.stream`; the tensor layouts are :mod:`jaxllm.hf.layout`);
:func:`write` does the reverse, and ``transformers`` loads the result. Only safetensors are read:
pickled ``pytorch_model.bin`` files can run arbitrary code when loaded, so nothing here unpickles.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.core.config import ModelConfig, MoEConfig, validate_model
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import atomic_write, read_json
from jaxllm.hf import safetensors_io as st
from jaxllm.hf import stream as hf_stream

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"  # decoding defaults, the end-of-sequence ids among them
MAX_SHARD_BYTES = 5 * 10**9  # per weights file, as transformers' save_pretrained


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


# --------------------------------------------------------------------------- configs


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(hf: dict, where: str) -> ModelConfig:
    """A jaxllm model config from a Hugging Face ``config.json``; refuses what the model cannot express."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"{where}: GPT-2 activation {act!r} is not supported (jaxllm uses tanh-approximate GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ConfigError(
                f"{where}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                "reorder_and_upcast_attn) are not supported"
            )
        d = hf["n_embd"]
        return ModelConfig(
            arch="gpt2",
            n_layer=hf["n_layer"],
            d_model=d,
            n_head=hf["n_head"],
            n_kv_head=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d,
            vocab_size=hf["vocab_size"],
            max_seq_len=hf["n_positions"],
            tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    if kind == "mixtral":
        return _mixtral(hf, where)
    if kind == "llama":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if (hf.get("head_dim") or d // heads) != d // heads:
            raise ConfigError(
                f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads; not supported"
            )
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: LLaMA with biases or an activation other than silu is not supported")
        scaling = hf.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope_scaling {scaling!r} is not supported")
        return ModelConfig(
            arch="llama",
            n_layer=hf["num_hidden_layers"],
            d_model=d,
            n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads,
            d_ff=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=hf["max_position_embeddings"],
            tie_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=_rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
        )
    raise ConfigError(f"{where}: model_type {kind!r} is not supported; jaxllm reads gpt2, llama and mixtral")


def _mixtral(hf: dict, where: str) -> ModelConfig:
    """Mixtral: LLaMA whose every MLP is ``num_local_experts`` SwiGLU experts, a token's top
    ``num_experts_per_tok`` weighted by their router probabilities renormalised to sum to 1, as
    :func:`jaxllm.model.moe.route` does for top_k > 1, dropless. With one expert per token Mixtral gives it
    weight 1 where jaxllm (Switch) weighs it by its probability: refused rather than run differently."""
    if hf.get("sliding_window") is not None:
        raise ConfigError(
            f"{where}: Mixtral with sliding_window={hf['sliding_window']} is not supported "
            "(jaxllm attends to every earlier position)"
        )
    if hf["num_experts_per_tok"] == 1:
        raise ConfigError(
            f"{where}: Mixtral with num_experts_per_tok=1 weighs its expert by 1, jaxllm's top-1 routing by the "
            "router probability (Switch); not supported"
        )
    base = model_config({**hf, "model_type": "llama"}, where)
    moe = MoEConfig(
        n_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        aux_loss=float(hf.get("router_aux_loss_coef", 0.001)),
        router_z_loss=0.0,
    )
    return dataclasses.replace(base, moe=moe)


def _checked(m: ModelConfig, where: str) -> ModelConfig:
    """``m`` if every size read from ``config.json`` has the right type and makes a valid model."""
    for f in dataclasses.fields(m):
        if f.default is dataclasses.MISSING:  # a nested config (model.moe): config.json never sets it
            continue
        value, typ = getattr(m, f.name), type(f.default)
        if isinstance(value, bool) != (typ is bool) or not isinstance(value, (float, int) if typ is float else typ):
            raise ConfigError(f"{where}: {f.name} must be a {typ.__name__}, got {value!r}")
    try:
        validate_model(m)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return m


def hf_config(m: ModelConfig) -> dict:
    if m.adapter_dim or m.norm_position != "pre" or not m.residual:
        raise ConfigError("only plain pre-LN models with residuals and no adapters have a Hugging Face equivalent")
    common = {"vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings, "torch_dtype": "float32"}
    if m.arch == "gpt2":
        if m.n_kv_head != m.n_head:
            raise ConfigError(
                "GPT-2 has no grouped-query attention; a gpt2 model with n_kv_head != n_head cannot be exported"
            )
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": m.n_layer,
            "n_embd": m.d_model,
            "n_head": m.n_head,
            "n_inner": m.d_ff,
            "n_positions": m.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common,
        }
    if m.moe.n_experts:
        return _mixtral_config(m, common)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": m.n_layer,
        "hidden_size": m.d_model,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head,
        "head_dim": m.d_model // m.n_head,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        **common,
    }


def _mixtral_config(m: ModelConfig, common: dict) -> dict:
    e = m.moe
    if m.arch != "llama" or e.every != 1 or e.top_k == 1 or (e.d_ff and e.d_ff != m.d_ff) or e.shared_experts:
        raise ConfigError(
            "only a llama MoE with every block MoE (model.moe.every=1), top_k > 1, experts of "
            "model.d_ff and no shared experts has a Hugging Face (Mixtral) equivalent"
        )
    llama = hf_config(dataclasses.replace(m, moe=MoEConfig()))
    return {
        **llama,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": e.n_experts,
        "num_experts_per_tok": e.top_k,
        "router_aux_loss_coef": e.aux_loss,
        "sliding_window": None,
        **common,
    }


# --------------------------------------------------------------------------- directories


def read_config(directory: Path) -> ModelConfig:
    """The jaxllm model config of a Hugging Face directory's ``config.json``, once the weight files'
    headers are known to be readable safetensors (as :func:`read` checks them, in the same order)."""
    raw = read_json(directory / CONFIG, "Hugging Face config")
    st.catalog(directory)
    return _config_of(raw, str(directory / CONFIG))


def _config_of(hf: dict, where: str) -> ModelConfig:
    try:
        return _checked(model_config(hf, where), where)
    except KeyError as e:
        raise ConfigError(f"{where} lacks {e.args[0]!r}") from None
    except TypeError:
        raise ConfigError(f"{where} holds a value of the wrong type for a {hf.get('model_type')} model") from None


def read(directory: str | Path, shardings: Any = None, dtype=np.float32) -> tuple[ModelConfig, Any]:
    """``(model config, params)`` of a Hugging Face GPT-2 or LLaMA directory, each parameter under its
    leaf of ``shardings`` (default: the first device), in ``dtype``; host memory about one tensor."""
    directory = Path(directory)
    raw = read_json(directory / CONFIG, "Hugging Face config")
    entries = st.catalog(directory)  # before the config's keys: pickles or damaged files say so first
    m = _config_of(raw, str(directory / CONFIG))
    return m, hf_stream.load_params(directory, m, shardings, dtype, entries)


def declared_eos(directory: Path) -> tuple[int, ...]:
    """The end-of-sequence ids a Hugging Face directory declares, where ``transformers``' ``generate``
    looks: ``generation_config.json``'s ``eos_token_id`` (an id or a list), else ``config.json``'s."""
    for name, what in ((GENERATION_CONFIG, "generation config"), (CONFIG, "Hugging Face config")):
        path = Path(directory) / name
        value = read_json(path, what).get("eos_token_id") if path.is_file() else None
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ConfigError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
            return tuple(ids)
    return ()


def write(
    m: ModelConfig,
    params: Any,
    directory: str | Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    config_ids: dict | None = None,
    generation_ids: dict | None = None,
) -> None:
    """``config.json`` + safetensors that ``transformers`` loads (the tokenizer is the caller's): one
    ``model.safetensors``, or files of at most ``max_shard_bytes`` and an index. ``config_ids`` (the
    ``bos/eos/pad_token_id`` keys) go into ``config.json``, ``generation_ids`` into a
    ``generation_config.json`` (its ``eos_token_id`` stops ``generate``). Gathers one tensor at a time;
    in a multi-host run every process calls this and process 0 writes. Weight files (and a
    generation config) an earlier export left in ``directory`` are removed, so ``transformers``
    cannot mix the two. A ``directory`` that is a file is refused before anything is written."""
    config = {**hf_config(m), **(config_ids or {})}
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} is a file; save_hf writes a directory")
    shapes, tensor = hf_stream.stored_tensors(m, params)
    writer = jax.process_index() == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
    names = st.write(directory, shapes, tensor, np.float32, max_shard_bytes, writer)
    if writer:
        for old in st.stale(directory, names):
            old.unlink()
        atomic_write(directory / CONFIG, json.dumps(config, indent=2))
        if generation_ids:
            atomic_write(directory / GENERATION_CONFIG, json.dumps(generation_ids, indent=2))
        else:
            (directory / GENERATION_CONFIG).unlink(missing_ok=True)
