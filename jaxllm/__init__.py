"""jaxllm: a transformer language model from raw text to an instruction follower, in JAX."""

from jaxllm.api import LoadedModel, load

__all__ = ["LoadedModel", "load"]
