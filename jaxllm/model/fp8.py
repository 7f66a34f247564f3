"""float8 matmuls (``model.matmul_dtype=fp8``): ``x @ w`` with both operands in e4m3 and the
backward's incoming gradient in e5m2, the products accumulated in float32.

Scaling is *current* (per tensor, per call): each operand is multiplied by ``max_finite / amax``,
its own absolute maximum now, before the cast, and the product divided by both scales. Delayed
scaling (Transformer Engine's default) takes the scale from a history of past maxima instead, which
saves one reduction per operand but is state that the train state, checkpoints and every parallel
plan would have to carry and keep consistent; the current maximum needs none of that, and is never
stale after a spike. Forward: e4m3 (3 mantissa bits) for activations and weights. Backward: e5m2 for
the gradient (its wider range holds gradients' spread), e4m3 for the saved operands.

Master weights stay float32 (the optimizer never sees float8); the kernel is quantized from them on
every call. XLA:CPU runs these matmuls by converting to float32 (slowly: the numerics are the same);
XLA:GPU uses float8 tensor cores where the GPU has them (compute capability 8.9+).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.core.errors import ConfigError

Array = jax.Array
FORWARD, GRADIENT = jnp.float8_e4m3fn, jnp.float8_e5m2


def quantize(a: Array, dtype) -> tuple[Array, Array]:
    """``(a * scale cast to dtype, scale)``, scale = dtype's largest finite value / max |a| (float32)."""
    top = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(a)).astype(jnp.float32)
    scale = top / jnp.maximum(amax, jnp.finfo(jnp.float32).tiny)
    return jnp.clip(a.astype(jnp.float32) * scale, -top, top).astype(dtype), jax.lax.stop_gradient(scale)


def _dot(a: Array, b: Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> Array:
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, n_in: int) -> Array:
    """``y[..., out] = x[..., in] @ w[in, out]`` (``n_in`` contracted axes) in float8; float32 out."""
    return _forward(x, w, n_in)[0]


def _forward(x: Array, w: Array, n_in: int):
    xq, sx = quantize(x, FORWARD)
    wq, sw = quantize(w, FORWARD)
    y = _dot(xq, wq, (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))) / (sx * sw)
    return y, (xq, sx, wq, sw, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))  # the dtypes, as arrays


def _backward(n_in: int, saved, g: Array):
    xq, sx, wq, sw, x_like, w_like = saved
    gq, sg = quantize(g, GRADIENT)
    lead, n_out = xq.ndim - n_in, wq.ndim - n_in
    # dx[..., in] = g[..., out] . w[in, out] over out;  dw[in, out] = x[..., in] . g[..., out] over ...
    dx = _dot(gq, wq, (tuple(range(lead, lead + n_out)), tuple(range(n_in, n_in + n_out)))) / (sg * sw)
    dw = jax.lax.dot_general(
        xq, gq, ((tuple(range(lead)), tuple(range(lead))), ((), ())), preferred_element_type=jnp.float32
    ) / (sx * sg)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


matmul.defvjp(_forward, _backward)


@functools.cache
def check_backend(platform: str) -> None:
    """A one-line ConfigError unless the ``platform`` backend compiles a float8 matmul (both the
    forward's e4m3 x e4m3 and the backward's e5m2 x e4m3), asked once per process."""
    try:
        one = jax.sharding.SingleDeviceSharding(jax.devices(platform)[0])
        rhs = jax.ShapeDtypeStruct((16, 16), FORWARD, sharding=one)
        for dtype in (FORWARD, GRADIENT):
            lhs = jax.ShapeDtypeStruct((16, 16), dtype, sharding=one)
            jax.jit(lambda p, q: _dot(p, q, ((1,), (0,)))).lower(lhs, rhs).compile()
    except (jax.errors.JaxRuntimeError, NotImplementedError, TypeError, ValueError) as e:  # the backend refuses
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.matmul_dtype=fp8: the {platform} backend cannot compile float8 matmuls ({first})")
