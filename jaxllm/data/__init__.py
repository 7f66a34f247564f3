"""Text to token batches: sources, preparation into shards, tokenizers, the synthetic Markov corpus, chat and tasks."""

from __future__ import annotations

__all__ = ["open_dataset"]


def __getattr__(name: str):
    # Lazy, so that importing one data module (a tokenizing worker's) does not import the others.
    if name == "open_dataset":
        from jaxllm.data.shards import open_dataset

        return open_dataset
    raise AttributeError(f"module 'jaxllm.data' has no attribute {name!r}")
