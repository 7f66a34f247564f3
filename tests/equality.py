"""The single-device reference for parallelism tests: one trainer step's loss and gradients.

A plan is correct when its step gives the one-device loss and gradients (float32, rel 1e-5). With
``optim.clip_norm=0``, Adam's first moment after one step is exactly (1 - b1) * gradient, so the
gradient is read back from the optimizer state that the trainer's own jitted step returns.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxllm.core.config import load_config, resolve_model
from jaxllm.parallel import sharding
from jaxllm.train import trainer


def one_step(args: list[str], devices: list, vocab: int, seq: int, batch: int, initial=None) -> dict:
    """``{"loss", "grads", "initial"}`` of one step of the config ``args`` on ``devices``, from
    ``initial`` (host arrays; the config's own initialisation when None), on fixed random tokens."""
    cfg = load_config(None, args)
    setup = trainer.build(cfg, resolve_model(cfg.model, vocab, seq), sharding.make_mesh(cfg.mesh, devices))
    tokens = np.random.default_rng(0).integers(0, vocab, (1, batch, seq + 1), dtype=np.int32)
    with setup.context():
        initial = jax.device_get(setup.init()) if initial is None else initial
        state, metrics = setup.step(jax.device_put(initial, setup.state_shardings), jax.device_put(tokens, setup.batch_sharding))
        mu = optax.tree_utils.tree_get(state.opt_state, "mu")
        grads = jax.tree.map(lambda m: m / (1 - cfg.optim.b1), mu)
        return jax.device_get({"loss": float(metrics["loss"]), "grads": grads, "initial": initial})


def rel(got, want) -> float:
    """Relative L2 distance of two arrays."""
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))
