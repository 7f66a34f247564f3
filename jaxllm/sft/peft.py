"""Parameter-efficient fine-tuning: LoRA, prompt tuning, bottleneck adapters, and freezing the rest.

All methods keep ONE parameter tree, the model's own, plus the method's extra leaves:

- LoRA: ``lora_a [L, in, r]`` and ``lora_b [L, r, out]`` beside each targeted ``kernel`` (``in``/``out``
  flatten the kernel's input/output axes, e.g. ``o``: in = heads x head_dim). The model runs on
  ``W + (alpha / r) A B`` (:func:`model_params`): the update is merged into the weights before the
  forward pass, so training, evaluation and export run the very same function and the model code
  knows nothing of LoRA. B starts at zero: the fine-tuned model starts as the pre-trained one.
  (Unmerged, per-token LoRA would allow dropout on the LoRA branch's input; merged, it cannot, and
  for these sizes the merge also costs no more than the side branch.)
- Prompt tuning: ``prompt [prompt_tokens, D]``, learned vectors that replace the embeddings at the
  first ``prompt_tokens`` positions of every example (the data puts placeholders there; see
  :func:`jaxllm.sft.finetune.forward`).
- Adapters: part of the model (``model.adapter_dim``): ``blocks/adapter_attn``, ``blocks/adapter_mlp``.
- New tokens (every method): ``new_tokens/embedding [n_new, D]`` (and ``new_tokens/lm_head [D, n_new]`` when
  the output layer is untied), the rows of the chat markers the base vocabulary lacks. They are
  their own leaves, concatenated to the frozen table before each forward pass, and they train under
  every method, as Hugging Face PEFT's trainable new-token embeddings do: a frozen table would
  leave a new token where it started, and the model could never learn to emit ``<|end|>``.

Freezing is optax masking: :func:`masked` sends the frozen leaves' updates to exactly zero (no
gradient step, no weight decay), so the base stays bitwise unchanged. :func:`stop_frozen` also stops
their gradients, so XLA never computes the frozen weights' gradients at all.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxllm.core.config import ModelConfig
from jaxllm.core.errors import ConfigError
from jaxllm.core.runtime import one_off_compiler_options
from jaxllm.model.transformer import Transformer

METHODS = ("full", "lora", "prompt", "adapter")
LORA_TARGETS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def _names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"sft.method={method!r} is unknown; choose one of {', '.join(METHODS)}")


def parse_targets(targets: str, params: dict, arch: str) -> list[str]:
    """``"q,v"`` -> ``["q", "v"]``, each checked to exist in this model."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ConfigError("lora.targets is empty; name projections among q, k, v, o, gate, up, down")
    present = [t for t, sub in LORA_TARGETS.items() if t in params["blocks"][sub]]
    for t in names:
        if t not in present:
            raise ConfigError(f"lora.targets: {t!r} does not exist in this {arch} model; it has {', '.join(present)}")
    return names


# --------------------------------------------------------------------------- LoRA


def _n_in(target: str) -> int:
    return 2 if target == "o" else 1  # o maps (heads, head_dim) -> embed


def lora_init(params: dict, targets: list[str], rank: int, key: jax.Array) -> dict:
    """``params`` plus ``lora_a`` (normal, std 1/sqrt(in)) and ``lora_b`` (zeros) for each target."""
    params = jax.tree.map(lambda x: x, params)  # a new tree; the leaves are shared, never mutated
    for i, t in enumerate(targets):
        node = params["blocks"][LORA_TARGETS[t]][t]
        kernel = node["kernel"]
        n_in = _n_in(t)
        layers, d_in = kernel.shape[0], math.prod(kernel.shape[1 : 1 + n_in])
        d_out = math.prod(kernel.shape[1 + n_in :])
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, d_in, rank), jnp.float32) / math.sqrt(d_in)
        node["lora_a"], node["lora_b"] = a, jnp.zeros((layers, rank, d_out), jnp.float32)
    return params


def lora_merge(params: dict, scale: float) -> dict:
    """The plain model tree: every ``kernel`` with LoRA leaves beside it becomes ``W + scale * A B``."""

    def merge(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            kernel = node["kernel"]
            delta = jnp.einsum("lir,lro->lio", node["lora_a"], node["lora_b"]).reshape(kernel.shape)
            rest = {k: v for k, v in node.items() if k not in ("lora_a", "lora_b")}
            return {**rest, "kernel": (kernel + scale * delta).astype(kernel.dtype)}
        return {k: merge(v) for k, v in node.items()}

    return merge(params)


# --------------------------------------------------------------------------- prompt tuning


def prompt_init(params: dict, n_virtual: int, key: jax.Array) -> dict:
    """``params`` plus ``prompt [n_virtual, D]``, initialised as copies of random vocabulary embeddings."""
    table_VxD = params["wte"]["embedding"]
    rows = jax.random.randint(key, (n_virtual,), 0, table_VxD.shape[0])
    return {**params, "prompt": table_VxD[rows]}


# --------------------------------------------------------------------------- adapters


def adapter_init(model_cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh ``adapter_attn`` / ``adapter_mlp`` leaves of ``blocks`` (``model_cfg.adapter_dim`` > 0), as the
    model initialises them. Jitted: XLA computes these leaves only, never the rest of a fresh model
    (eagerly, a second copy of a billion-parameter base would be drawn on the host to keep its adapters)."""

    def init() -> dict:
        blocks = nn.unbox(Transformer(model_cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"])["blocks"]
        return {k: v for k, v in blocks.items() if k.startswith("adapter_")}

    return jax.jit(init, compiler_options=one_off_compiler_options())()


# --------------------------------------------------------------------------- new tokens


def vocab_rows(params: dict, n: int) -> dict:
    """``params`` with only the first ``n`` rows of the embedding table (and columns of an untied output
    layer): the tokenizer's own, without the rows that round the table up to a multiple of 64."""
    out = {**params, "wte": {"embedding": params["wte"]["embedding"][:n]}}
    if "lm_head" in params:
        out["lm_head"] = {**params["lm_head"], "kernel": params["lm_head"]["kernel"][:, :n]}
    return out


def new_tokens_init(params: dict, vocab_size: int) -> dict:
    """``params`` plus ``new_tokens``: the rows (and untied output columns) from the base vocabulary
    up to ``vocab_size``, each the mean of the old ones, so new tokens start with average logits
    instead of dominating or vanishing. Unchanged if the base vocabulary is large enough."""
    table_VxD = params["wte"]["embedding"]
    extra = vocab_size - table_VxD.shape[0]
    if extra <= 0:
        return params
    new = {"embedding": jnp.repeat(table_VxD.mean(0, keepdims=True), extra, 0)}
    if "lm_head" in params:
        w_DxV = params["lm_head"]["kernel"]
        new["lm_head"] = jnp.repeat(w_DxV.mean(1, keepdims=True), extra, 1)
    return {**params, "new_tokens": new}


def _with_new_tokens(params: dict) -> dict:
    """The plain model tree: ``new_tokens`` appended to the embedding table (and the output kernel)."""
    if "new_tokens" not in params:
        return params
    new = params["new_tokens"]
    out = {k: v for k, v in params.items() if k != "new_tokens"}
    table_VxD = params["wte"]["embedding"]
    out["wte"] = {**params["wte"], "embedding": jnp.concatenate([table_VxD, new["embedding"].astype(table_VxD.dtype)])}
    if "lm_head" in new:
        w_DxV = params["lm_head"]["kernel"]
        out["lm_head"] = {
            **params["lm_head"],
            "kernel": jnp.concatenate([w_DxV, new["lm_head"].astype(w_DxV.dtype)], 1),
        }
    return out


# --------------------------------------------------------------------------- freezing


def model_params(params: dict, lora_scale: float) -> dict:
    """What the Transformer applies (and what is exported): LoRA merged in, new-token rows appended."""
    return _with_new_tokens(lora_merge(params, lora_scale))


def trainable_mask(params: dict, method: str) -> dict:
    """True on the leaves ``method`` trains: all (full), LoRA's A and B, the prompt, the adapters;
    and, whatever the method, the new tokens' rows."""

    def trains(path, _) -> bool:
        names = _names(path)
        if method == "full" or names[0] == "new_tokens":
            return True
        if method == "lora":
            return names[-1] in ("lora_a", "lora_b")
        if method == "prompt":
            return names[0] == "prompt"
        return any(n.startswith("adapter_") for n in names)

    return jax.tree_util.tree_map_with_path(trains, params)


def masked(tx: optax.GradientTransformation, mask: dict) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves; the frozen ones get exactly zero updates (and no optimizer state)."""
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def stop_frozen(params: dict, mask: dict) -> dict:
    return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)


def count(params: dict, mask: dict) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    sizes = jax.tree.map(lambda p: p.size, params)
    total = sum(jax.tree.leaves(sizes))
    trainable = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
    return trainable, total
