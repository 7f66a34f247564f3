"""Post-training, weight-only quantization: int8 per output channel, int4 per group of inputs.

Every ``Linear`` kernel ``w[in..., out...]`` is replaced by a :class:`QuantizedKernel`: integers
``q`` of the kernel's own shape and float32 scales ``scale[G, out...]``, where the flattened input
dimension ``I`` is cut into ``G`` groups of ``I / G`` rows and ``w ~= q * scale[group(row)]``.
Symmetric (no zero point): ``scale = max|w| / qmax`` over each group's rows of each output channel.

- ``int8``: ``G = 1``, one scale per output channel, ``qmax = 127``.
- ``int4``: ``G = I / group_size`` (1 if I is smaller), ``qmax = 7``; small groups track outliers, one float32
  scale per ``group_size`` weights (0.5 bit per weight at group size 64).

The matmul dequantizes on the fly (:func:`quantized_dot`): integers become compute-dtype operands,
each group's partial product is scaled, the groups are summed. With ``G = 1`` this is a plain matmul
whose output columns are scaled, so int8 costs no extra FLOPs. Activations, norms, biases and the
token embedding (the tied output head) stay float: they are a small share of the bytes in the
models here, and the embedding table feeds every logit.

Bytes are counted at the storage width (int4 = half a byte): XLA packs int4 on GPUs and TPUs, but the
CPU backend keeps one byte per int4 element (``on_device_size_in_bytes``), so on a CPU int4 saves no
memory over int8 there, only in checkpoints and on accelerators.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jaxllm.core.errors import ConfigError

MODES = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}


@flax.struct.dataclass
class QuantizedKernel:
    """``q``: int8/int4, the kernel's shape (layer-stacked kernels keep their leading axis).
    ``scale``: float32 ``[..., G, out...]``; the groups axis sits right after any leading axes."""

    q: jax.Array
    scale: jax.Array


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")


def quantize_kernel(w: jax.Array, n_lead: int, n_in: int, mode: str, group_size: int) -> QuantizedKernel:
    """Quantizes ``w[lead..., in..., out...]`` (``n_lead`` stacked axes, ``n_in`` input axes)."""
    dtype, qmax = MODES[mode]
    lead, ins, outs = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in], w.shape[n_lead + n_in :]
    n_rows = math.prod(ins)
    group = n_rows if mode == "int8" else min(group_size, n_rows)
    if n_rows % group:
        raise ConfigError(f"int4 group size {group} does not divide a kernel's input size {n_rows}; pick a divisor")
    w_xGxgxO = w.astype(jnp.float32).reshape(lead + (n_rows // group, group, math.prod(outs)))
    scale_xGx1xO = jnp.max(jnp.abs(w_xGxgxO), axis=-2, keepdims=True) / qmax
    scale_xGx1xO = jnp.where(scale_xGx1xO == 0, 1.0, scale_xGx1xO)  # an all-zero group stays zero
    q = jnp.clip(jnp.round(w_xGxgxO / scale_xGx1xO), -qmax, qmax).astype(dtype)
    return QuantizedKernel(q=q.reshape(w.shape), scale=scale_xGx1xO.reshape(lead + (n_rows // group,) + outs))


def dequantize(k: QuantizedKernel, n_lead: int, n_in: int) -> jax.Array:
    """The float32 kernel that ``k`` stands for (for checks; :func:`quantized_dot` never builds it)."""
    lead, outs = k.q.shape[:n_lead], k.q.shape[n_lead + n_in :]
    n_rows, n_groups = math.prod(k.q.shape[n_lead : n_lead + n_in]), k.scale.shape[n_lead]
    q_xGxgxO = k.q.astype(jnp.float32).reshape(lead + (n_groups, n_rows // n_groups, math.prod(outs)))
    return (q_xGxgxO * k.scale.reshape(lead + (n_groups, 1, math.prod(outs)))).reshape(k.q.shape)


def quantized_dot(x: jax.Array, k: QuantizedKernel, n_in: int, dtype: Any) -> jax.Array:
    """``x[..., in...] @ kernel[in..., out...]`` with the kernel dequantized inside the matmul.

    ``y[..., o] = sum_g scale[g, o] * (x[..., rows of g] @ q[rows of g, o])``: the integers are
    converted to ``dtype`` as matmul operands and the scales multiply the per-group partial sums.
    """
    ins, outs = k.q.shape[:n_in], k.q.shape[n_in:]
    n_rows, n_groups, n_out = math.prod(ins), k.scale.shape[0], math.prod(outs)
    batch = x.shape[: x.ndim - n_in]
    x_xGxg = x.astype(dtype).reshape(batch + (n_groups, n_rows // n_groups))
    q_Gxgxo = k.q.reshape(n_groups, n_rows // n_groups, n_out).astype(dtype)
    y_xGxO = jnp.einsum("...gi,gio->...go", x_xGxg, q_Gxgxo)
    y_xO = jnp.sum(y_xGxO * k.scale.reshape(n_groups, n_out).astype(dtype), axis=-2)
    return y_xO.reshape(batch + outs)


def quantize_params(
    params: Any, axes_by_path: dict[tuple[str, ...], tuple[int, int]], mode: str, group_size: int = 64
) -> Any:
    """``params`` with the kernel of every module in ``axes_by_path`` (``{module path: (input axes,
    input + output axes)}``, :func:`jaxllm.model.transformer.linear_axes`) replaced by a :class:`QuantizedKernel`
    (a new tree)."""
    check_mode(mode)
    if group_size <= 0:
        raise ConfigError(f"the int4 group size must be positive, got {group_size}")

    def convert(path: tuple[str, ...], node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {name: convert(path + (name,), child) for name, child in node.items()}
        if path in axes_by_path and "kernel" in node:
            n_in, n_axes = axes_by_path[path]
            kernel = node["kernel"]
            out["kernel"] = quantize_kernel(kernel, kernel.ndim - n_axes, n_in, mode, group_size)
        return out

    return convert((), dict(params))


def storage_bytes(params: Any) -> int:
    """Bytes of a parameter tree at each leaf's storage width (an int4 weight is half a byte)."""
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(params))
