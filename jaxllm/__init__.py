"""jaxllm: a transformer language model from raw text to an instruction follower, in JAX."""

from __future__ import annotations

from jaxllm.core import environment

environment.skip_absent_tpu()  # before anything imports JAX: its start-up reads JAX_PLATFORMS

__all__ = ["LoadedModel", "load"]


def __getattr__(name: str):
    # Lazy, so that `import jaxllm.core.config` (argument parsing, error exits) does not start JAX.
    if name in __all__:
        from jaxllm.infer import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
