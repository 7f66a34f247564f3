"""Counting parameters and FLOPs, and model FLOPs utilisation (MFU).

Training FLOPs per token follow PaLM (appendix B), written in this repository's letters: 6 N + 12 L D T,
where N counts the weights that multiply activations (every matrix, including the output projection,
excluding embedding lookups), L layers, D = heads x head size (PaLM's H Q), T context length. The 6 is
2 (multiply-add) x 3 (forward + two backward matmuls); 12 L D T is the attention score and value
products, which N does not see.
"""

from __future__ import annotations

import re

import jax

from jaxllm.core.config import ModelConfig

# Dense peak FLOP/s per device, by a word of ``device.device_kind`` (lower-case; the first key found
# as whole words wins, so "l4" does not match "NVIDIA L40S" and "tpu v5 lite" is tried before "tpu
# v5", which is how v5p chips name themselves), for 16-bit inputs; float32 matmuls on GPUs run on
# TF32 tensor cores at half that. CPUs have no vendor figure: theirs is a nominal float32 matmul
# rate of a small (2-core) x86 host under XLA, so a CPU's MFU is comparable between runs, not an
# absolute (bench/cpu_matmul.py; bench/results/cpu-matmul_xeon-2core_2026-12-07.md). Sources of the
# others: jaxllm/plan/hardware.py.
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "a10g": 125e12,
    "a10": 125e12,
    "v100": 125e12,
    "tpu v6 lite": 918e12,
    "tpu v6": 918e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports itself as "TPU v5"
    "tpu v4": 275e12,
    "tpu v3": 123e12,
    "cpu": 2.5e11,
}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by hand (tested against the real parameter tree).

    ``total``: every parameter. ``non_embedding``: Kaplan's N, without token and position embeddings
    (an untied output projection counts). ``matmul``: N of the FLOP formula, the non-embedding weights
    plus the output projection (tied or not), without norm scales and biases. ``active``: the part of
    ``matmul`` one token multiplies by (mixture-of-experts layers: top_k of their experts, the shared
    experts and the router).
    """
    D, L, V, F, e = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_ff, cfg.moe
    head = D // cfg.n_head
    attn = 2 * D * cfg.n_head * head + 2 * D * cfg.n_kv_head * head
    mlp = (2 if cfg.arch == "gpt2" else 3) * D * F
    L_moe = L // e.every if e.n_experts else 0
    expert = (2 if cfg.arch == "gpt2" else 3) * D * (e.d_ff or F)
    matmul_moe = (e.n_experts + e.shared_experts) * expert + D * e.n_experts  # the experts, shared ones, the router
    if cfg.arch == "gpt2":
        biases = cfg.n_head * head + 2 * cfg.n_kv_head * head + D + F + D
        biases_moe = (
            biases
            - F
            - D
            + e.n_experts * ((e.d_ff or F) + D)
            + (e.shared_experts * (e.d_ff or F) + D if e.shared_experts else 0)
        )
        norms = 2 * 2 * D
    else:
        biases = biases_moe = 0
        norms = 2 * D
    final_norm = 0 if cfg.norm_position == "post" else (2 * D if cfg.arch == "gpt2" else D)
    lm_head = 0 if cfg.tie_embeddings else V * D
    blocks = (L - L_moe) * (attn + mlp + biases + norms) + L_moe * (attn + matmul_moe + biases_moe + norms)
    non_embedding = blocks + final_norm + lm_head
    embedding = V * D + (cfg.max_seq_len * D if cfg.arch == "gpt2" else 0)
    matmul = L * attn + (L - L_moe) * mlp + L_moe * matmul_moe + V * D
    return {
        "total": non_embedding + embedding,
        "non_embedding": non_embedding,
        "matmul": matmul,
        "active": matmul - L_moe * (e.n_experts - e.top_k) * expert,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's 6 N + 12 L D T, N the active weights (MoE: top_k experts)."""
    head = cfg.d_model // cfg.n_head
    return 6 * param_counts(cfg)["active"] + 12 * cfg.n_layer * cfg.n_head * head * seq_len


def peak_flops(device: jax.Device, override: float = 0.0) -> float:
    """Peak FLOP/s of one device: the override if set, else the table above (0 if unknown)."""
    if override > 0:
        return override
    kind = device.device_kind.lower() if device.platform != "cpu" else "cpu"
    for key, value in PEAK_FLOPS.items():
        if re.search(rf"\b{re.escape(key)}\b", kind):
            return value
    return 0.0


def mfu(tokens_per_sec: float, cfg: ModelConfig, seq_len: int, total_peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices used."""
    return tokens_per_sec * flops_per_token(cfg, seq_len) / total_peak if total_peak > 0 else 0.0
