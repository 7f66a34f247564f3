"""Hugging Face weights in and out: ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` directories.

A Hugging Face model directory holds ``config.json``, weights in ``*.safetensors`` and a
``tokenizer.json``. :func:`read` turns one into a jaxllm model config and parameter tree;
:func:`write` does the reverse, and ``transformers`` loads the result. Only safetensors are read:
pickled ``pytorch_model.bin`` files can run arbitrary code when loaded, so nothing here unpickles.

Layout differences the conversion undoes (per layer ``i``; ours stack layers on a leading axis):

- GPT-2 stores ``Conv1D`` weights as ``[in, out]`` (ours too) with q, k, v fused: ``c_attn [D, 3D]``
  is split into ``q/k/v kernel [D, N, H]``; ``c_proj [D, D]`` is ``o kernel [N, H, D]`` flattened.
- LLaMA stores ``nn.Linear`` weights as ``[out, in]``: transposed, then the head axes unflattened.
  Its rotary embedding already uses the half-split layout of :func:`jaxllm.model.rope`, so q and k
  need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.config import ModelConfig, validate_model
from jaxllm.errors import ConfigError
from jaxllm.fileio import atomic_write, read_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


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
            raise ConfigError(f"{where}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are not supported")
        d = hf["n_embd"]
        return ModelConfig(
            arch="gpt2", n_layer=hf["n_layer"], d_model=d, n_head=hf["n_head"], n_kv_head=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"],
            tie_embeddings=hf.get("tie_word_embeddings", True), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    if kind == "llama":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim", d // heads) != d // heads:
            raise ConfigError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads; not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: LLaMA with biases or an activation other than silu is not supported")
        scaling = hf.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"{where}: rope_scaling {scaling!r} is not supported")
        return ModelConfig(
            arch="llama", n_layer=hf["num_hidden_layers"], d_model=d, n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            max_seq_len=hf["max_position_embeddings"], tie_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=_rope_theta(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
        )
    raise ConfigError(f"{where}: model_type {kind!r} is not supported; jaxllm reads gpt2 and llama")


def _checked(m: ModelConfig, where: str) -> ModelConfig:
    """``m`` if every size read from ``config.json`` has the right type and makes a valid model."""
    for f in dataclasses.fields(m):
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
            raise ConfigError("GPT-2 has no grouped-query attention; a gpt2 model with n_kv_head != n_head cannot be exported")
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": m.n_layer, "n_embd": m.d_model,
            "n_head": m.n_head, "n_inner": m.d_ff, "n_positions": m.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": m.n_layer,
        "hidden_size": m.d_model, "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head,
        "head_dim": m.d_model // m.n_head, "intermediate_size": m.d_ff, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, **common,
    }


# --------------------------------------------------------------------------- weights


def _gpt2_params(w: dict[str, np.ndarray], m: ModelConfig) -> dict:
    D, N, H, L = m.d_model, m.n_head, m.d_model // m.n_head, m.n_layer
    w = {k.removeprefix("transformer."): v for k, v in w.items()}

    def stack(name: str, fn=lambda x: x) -> np.ndarray:
        return np.stack([fn(w[f"h.{i}.{name}"]) for i in range(L)])

    qkv = [stack("attn.c_attn.weight", lambda x, j=j: x[:, j * D : (j + 1) * D].reshape(D, N, H)) for j in range(3)]
    qkv_b = [stack("attn.c_attn.bias", lambda x, j=j: x[j * D : (j + 1) * D].reshape(N, H)) for j in range(3)]
    params = {
        "wte": {"embedding": w["wte.weight"]},
        "wpe": {"embedding": w["wpe.weight"]},
        "blocks": {
            "attn": {
                **{n: {"kernel": qkv[j], "bias": qkv_b[j]} for j, n in enumerate("qkv")},
                "o": {"kernel": stack("attn.c_proj.weight", lambda x: x.reshape(N, H, D)), "bias": stack("attn.c_proj.bias")},
            },
            "mlp": {
                "up": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
                "down": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")},
            },
            "norm1": {"LayerNorm_0": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")}},
            "norm2": {"LayerNorm_0": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")}},
        },
        "norm_f": {"LayerNorm_0": {"scale": w["ln_f.weight"], "bias": w["ln_f.bias"]}},
    }
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": w["lm_head.weight"].T}
    return params


def _gpt2_weights(p: dict, m: ModelConfig) -> dict[str, np.ndarray]:
    D = m.d_model
    a, b = p["blocks"]["attn"], p["blocks"]["mlp"]
    n1, n2 = p["blocks"]["norm1"]["LayerNorm_0"], p["blocks"]["norm2"]["LayerNorm_0"]
    w = {"transformer.wte.weight": p["wte"]["embedding"], "transformer.wpe.weight": p["wpe"]["embedding"]}
    for i in range(m.n_layer):
        h = f"transformer.h.{i}."
        w[h + "ln_1.weight"], w[h + "ln_1.bias"] = n1["scale"][i], n1["bias"][i]
        w[h + "attn.c_attn.weight"] = np.concatenate([a[n]["kernel"][i].reshape(D, D) for n in "qkv"], axis=1)
        w[h + "attn.c_attn.bias"] = np.concatenate([a[n]["bias"][i].reshape(D) for n in "qkv"])
        w[h + "attn.c_proj.weight"], w[h + "attn.c_proj.bias"] = a["o"]["kernel"][i].reshape(D, D), a["o"]["bias"][i]
        w[h + "ln_2.weight"], w[h + "ln_2.bias"] = n2["scale"][i], n2["bias"][i]
        w[h + "mlp.c_fc.weight"], w[h + "mlp.c_fc.bias"] = b["up"]["kernel"][i], b["up"]["bias"][i]
        w[h + "mlp.c_proj.weight"], w[h + "mlp.c_proj.bias"] = b["down"]["kernel"][i], b["down"]["bias"][i]
    w["transformer.ln_f.weight"] = p["norm_f"]["LayerNorm_0"]["scale"]
    w["transformer.ln_f.bias"] = p["norm_f"]["LayerNorm_0"]["bias"]
    if not m.tie_embeddings:
        w["lm_head.weight"] = p["lm_head"]["kernel"].T
    return w


def _llama_params(w: dict[str, np.ndarray], m: ModelConfig) -> dict:
    D, N, K, H, L = m.d_model, m.n_head, m.n_kv_head, m.d_model // m.n_head, m.n_layer

    def stack(name: str, fn) -> np.ndarray:
        return np.stack([fn(w[f"model.layers.{i}.{name}"]) for i in range(L)])

    params = {
        "wte": {"embedding": w["model.embed_tokens.weight"]},
        "blocks": {
            "attn": {
                "q": {"kernel": stack("self_attn.q_proj.weight", lambda x: x.T.reshape(D, N, H))},
                "k": {"kernel": stack("self_attn.k_proj.weight", lambda x: x.T.reshape(D, K, H))},
                "v": {"kernel": stack("self_attn.v_proj.weight", lambda x: x.T.reshape(D, K, H))},
                "o": {"kernel": stack("self_attn.o_proj.weight", lambda x: x.T.reshape(N, H, D))},
            },
            "mlp": {n: {"kernel": stack(f"mlp.{n}_proj.weight", np.transpose)} for n in ("gate", "up", "down")},
            "norm1": {"RMSNorm_0": {"scale": stack("input_layernorm.weight", lambda x: x)}},
            "norm2": {"RMSNorm_0": {"scale": stack("post_attention_layernorm.weight", lambda x: x)}},
        },
        "norm_f": {"RMSNorm_0": {"scale": w["model.norm.weight"]}},
    }
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": w["lm_head.weight"].T}
    return params


def _llama_weights(p: dict, m: ModelConfig) -> dict[str, np.ndarray]:
    D = m.d_model
    a, b = p["blocks"]["attn"], p["blocks"]["mlp"]
    w = {"model.embed_tokens.weight": p["wte"]["embedding"], "model.norm.weight": p["norm_f"]["RMSNorm_0"]["scale"]}
    for i in range(m.n_layer):
        h = f"model.layers.{i}."
        for n in "qkv":
            w[h + f"self_attn.{n}_proj.weight"] = a[n]["kernel"][i].reshape(D, -1).T
        w[h + "self_attn.o_proj.weight"] = a["o"]["kernel"][i].reshape(-1, D).T
        for n in ("gate", "up", "down"):
            w[h + f"mlp.{n}_proj.weight"] = b[n]["kernel"][i].T
        w[h + "input_layernorm.weight"] = p["blocks"]["norm1"]["RMSNorm_0"]["scale"][i]
        w[h + "post_attention_layernorm.weight"] = p["blocks"]["norm2"]["RMSNorm_0"]["scale"][i]
    if not m.tie_embeddings:
        w["lm_head.weight"] = p["lm_head"]["kernel"].T
    return w


# --------------------------------------------------------------------------- directories


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's ``*.safetensors`` files, as float32 numpy arrays."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        if pickled:
            raise ConfigError(
                f"{directory} holds only pickled weights ({pickled[0]}); jaxllm never unpickles (it can run code). "
                "Convert them to safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)"
            )
        raise ConfigError(f"{directory} has a config.json but no *.safetensors weights")
    from safetensors import safe_open

    weights = {}
    for f in files:
        try:
            with safe_open(f, framework="flax") as st:  # flax: bfloat16 tensors load too
                for k in st.keys():  # noqa: SIM118  (a safetensors handle, not a dict: no __iter__)
                    weights[k] = np.asarray(st.get_tensor(k), dtype=np.float32)
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types, and OSError)
            raise ConfigError(f"{f} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    return weights


def read(directory: str | Path) -> tuple[ModelConfig, dict]:
    """``(model config, params)`` of a Hugging Face GPT-2 or LLaMA directory (numpy, float32)."""
    directory = Path(directory)
    where = str(directory / CONFIG)
    hf = read_json(directory / CONFIG, "Hugging Face config")
    weights = read_weights(directory)
    try:
        m = _checked(model_config(hf, where), where)
    except KeyError as e:
        raise ConfigError(f"{where} lacks {e.args[0]!r}") from None
    except TypeError:
        raise ConfigError(f"{where} holds a value of the wrong type for a {hf.get('model_type')} model") from None
    try:
        params = (_gpt2_params if m.arch == "gpt2" else _llama_params)(weights, m)
    except KeyError as e:
        raise ConfigError(f"{directory}: tensor {e.args[0]!r} is missing for a {hf['model_type']} model") from None
    except ValueError as e:  # a reshape: the tensors' sizes disagree with config.json
        raise ConfigError(f"{directory}: the weights' shapes disagree with {CONFIG} ({e})") from None
    return m, params


def write(m: ModelConfig, params: Any, directory: str | Path) -> None:
    """``config.json`` + ``model.safetensors`` that ``transformers`` loads (the tokenizer is the caller's)."""
    from safetensors.numpy import save_file

    config = hf_config(m)
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    weights = (_gpt2_weights if m.arch == "gpt2" else _llama_weights)(p, m)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)
    atomic_write(directory / CONFIG, json.dumps(config, indent=2))
