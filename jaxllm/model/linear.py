"""The model's one matmul layer: ``Linear``, a kernel created in its final multi-axis shape with its
logical names, multiplied in the compute dtype, in float8 (``jaxllm.model.fp8``) or, for a stored
``QuantizedKernel``, by its integers (``jaxllm.model.quantize``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxllm.model import fp8
from jaxllm.model.quantize import QuantizedKernel, quantized_dot

Array = jax.Array


def init(std: float, axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros(axes: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Linear(nn.Module):
    """``y[..., out] = x[..., in] @ kernel[in, out] + bias[out]`` where ``in`` and ``out`` may span several
    axes (e.g. ``embed -> heads x head_dim``); the kernel is created in its final shape, with its names.
    ``fp8``: the product in float8 with current scaling (:func:`jaxllm.model.fp8.matmul`)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of kernel = in_shape + out_shape
    std: float
    use_bias: bool
    dtype: Any
    fp8: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        stored = self.get_variable("params", "kernel")
        if isinstance(stored, QuantizedKernel):  # weight-only int8/int4 (jaxllm.model.quantize)
            y = quantized_dot(x, stored, n_in, self.dtype)
        else:
            kernel = self.param("kernel", init(self.std, self.axes), self.in_shape + self.out_shape)
            if self.fp8:
                fp8.check_backend(jax.devices()[0].platform)
                y = fp8.matmul(x.astype(self.dtype), kernel, n_in).astype(self.dtype)
            else:
                y = jax.lax.dot_general(
                    x.astype(self.dtype),
                    kernel.astype(self.dtype),
                    ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
                )
        if self.use_bias:
            y = y + self.param("bias", zeros(self.axes[n_in:]), self.out_shape).astype(self.dtype)
        return y

    def matrix(self) -> Array:
        """The stored kernel (the fused loss multiplies by the head's own, inside its blocks)."""
        return self.get_variable("params", "kernel")
