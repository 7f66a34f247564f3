"""``jaxllm.load(run_dir)``: a trained model for people, with its config, params and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from jaxllm import checkpoint as ckpt
from jaxllm import generate as gen
from jaxllm import tokenizer as tokenizers
from jaxllm.config import Config, from_dict
from jaxllm.errors import ConfigError
from jaxllm.model import Transformer


@dataclass
class LoadedModel:
    """A model ready to use: ``.logits(tokens)`` and ``.generate(prompt, ...)``."""

    config: Config
    params: Any
    tokenizer: tokenizers.Tokenizer

    def __post_init__(self):
        self.module = Transformer(self.config.model, deterministic=True)
        self._apply = jax.jit(lambda p, t: self.module.apply({"params": p}, t))

    def logits(self, tokens_BxT) -> jax.Array:
        """float32 ``[B, T, V]`` next-token logits for integer tokens ``[B, T]``."""
        return self._apply(self.params, jnp.asarray(tokens_BxT, jnp.int32)).astype(jnp.float32)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str:
        """The text that follows ``prompt`` (temperature 0 = greedy)."""
        ids = gen.generate_tokens(
            self._apply_unjitted,
            self.params,
            self.tokenizer.encode(prompt),
            max_new_tokens,
            self.config.model.max_seq_len,
            temperature,
            top_k,
            top_p,
            seed,
        )
        return self.tokenizer.decode(ids)

    def _apply_unjitted(self, params, tokens_BxT):
        return self.module.apply({"params": params}, tokens_BxT)

    def __hash__(self) -> int:  # the sampler caches its compiled loop per apply function
        return id(self)


def load(path: str | Path) -> LoadedModel:
    """Loads the latest checkpoint of a jaxllm run directory (onto the default device)."""
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a jaxllm run directory (no config.yaml)")
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    checkpointer = ckpt.Checkpointer(run_dir, keep=cfg.checkpoint.keep)
    steps = checkpointer.steps()
    if not steps:
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint yet")
    state = checkpointer.restore_single_device(steps[-1])
    checkpointer.close()
    return LoadedModel(cfg, state["params"], tokenizers.load(run_dir))
