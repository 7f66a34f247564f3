"""The single-device reference for parallelism tests: one trainer step's loss and gradients.

A plan is correct when its step gives the one-device loss and gradients (float32, rel 1e-5). With
``optim.clip_norm=0``, Adam's first moment after one step is exactly (1 - b1) * gradient, so the
gradient is read back from the optimizer state that the trainer's own jitted step returns.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxllm.core.config import load_config, resolve
from jaxllm.parallel import sharding
from jaxllm.train import trainer


def one_step(args: list[str], devices: list, vocab: int, seq: int, batch: int, initial=None) -> dict:
    """``{"loss", "grads", "initial"}`` of one step of the config ``args`` on ``devices``, from
    ``initial`` (host arrays; the config's own initialisation when None), on fixed random tokens."""
    cfg = resolve(load_config(None, args), vocab)
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))
    tokens = np.random.default_rng(0).integers(0, vocab, (1, batch, seq + 1), dtype=np.int32)
    with setup.context():
        initial = jax.device_get(setup.init()) if initial is None else initial
        state, metrics = setup.step(
            jax.device_put(initial, setup.state_shardings), jax.device_put(tokens, setup.batch_sharding)
        )
        mu = jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu"))  # on the host: no program per leaf
        grads = jax.tree.map(lambda m: m / (1 - cfg.optim.b1), mu)
        return {"loss": float(metrics["loss"]), "grads": grads, "initial": initial}


def rel(got, want) -> float:
    """Relative L2 distance of two arrays."""
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))


def assert_state_bytes_exact(overrides: list[str]) -> None:
    """The planner's parameter and optimizer bytes per device equal the train state's real shards
    under the mesh ``overrides`` name (Adam's step counts are the only extra optimizer bytes)."""
    from jaxllm.plan import planner as plan
    from jaxllm.train import checkpoint as ckpt

    cfg = plan.resolved(load_config(None, overrides))
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()))
    state = ckpt.abstract(jax.eval_shape(setup.init), setup.state_shardings)
    boxed = plan.memory_model.boxed_params(cfg.model, cfg.train.seq_len)
    analytic = plan.memory_model.estimate(cfg, boxed, dict(setup.mesh.shape))
    assert analytic.params == sharding.per_device_bytes(state.params)
    assert 0 <= sharding.per_device_bytes(state.opt_state) - analytic.optimizer <= 64
