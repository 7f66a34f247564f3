"""What a block keeps for its backward pass (``model.remat``), as ``jax.checkpoint`` policies.

- ``none``: everything autodiff saves (no recomputation, the most memory);
- ``full``: the block's input alone; the backward runs the whole block's forward again (a third more
  FLOPs, the least memory);
- ``dots``: every matmul's output, the attention scores and values included
  (``checkpoint_dots``); only the elementwise work between them (norms, activations, softmax) is
  recomputed;
- ``dots_no_batch``: the projections' outputs (matmuls without batch dimensions), not the attention
  core's batched products (``dots_with_no_batch_dims_saveable``): attention is recomputed, its
  ``T x T`` scores never saved;
- ``offload``: what ``dots_no_batch`` saves, moved to host memory during the forward and back for the
  backward (``offload_dot_with_no_batch_dims``); needs a backend with a ``pinned_host`` memory.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxllm.core.errors import ConfigError

HOST_MEMORY = "pinned_host"


def host_memory_kinds(device: jax.Device) -> set[str]:
    """The memory kinds ``device`` can address (``device``, ``pinned_host``, ...)."""
    return {m.kind for m in device.addressable_memories()}


def check_offload(device: jax.Device) -> None:
    """A one-line ConfigError unless ``device`` can move saved activations to pinned host memory."""
    if HOST_MEMORY not in host_memory_kinds(device):
        kinds = ", ".join(sorted(host_memory_kinds(device)))
        raise ConfigError(
            f"model.remat=offload needs {HOST_MEMORY} memory, which this {device.platform} backend does "
            f"not have (it has {kinds}); use model.remat=dots_no_batch or full"
        )


def policy(name: str):
    """The ``jax.checkpoint`` policy of ``model.remat=name`` (None for ``full``: save nothing)."""
    cp = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "dots":
        return cp.checkpoint_dots
    if name == "dots_no_batch":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        device = jax.devices()[0]
        check_offload(device)
        return cp.offload_dot_with_no_batch_dims(device.default_memory().kind, HOST_MEMORY)
    raise ConfigError(f"model.remat={name!r} has no checkpoint policy")


def wrap(unit: type[nn.Module], name: str) -> type[nn.Module]:
    """``unit`` (a block, or a group of blocks) rematerialised under ``model.remat=name``."""
    if name == "none":
        return unit
    return nn.remat(unit, prevent_cse=False, policy=policy(name))
