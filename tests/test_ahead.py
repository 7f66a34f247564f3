"""The start-up path: the train step and evaluation compiled ahead, on a background thread, for the
state and batches the run then feeds them; the initialisation traced with the layer loop rolled."""

import jax
import numpy as np

from jaxllm.core.config import resolve_model
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding
from jaxllm.train import trainer


def test_steps_compiled_ahead_take_what_the_run_feeds_and_equal_the_jitted_ones(tiny_cfg):
    cfg = tiny_cfg("model.scan_unroll=2", "train.grad_accum=2")
    model_cfg = resolve_model(cfg.model, 256, cfg.train.seq_len)
    setup = trainer.build(cfg, model_cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:2]))
    ahead = trainer.compiled_ahead(cfg, setup)
    tokens = (np.arange(4000) % 251).astype(np.uint16)
    # the initialisation rolls the layer loop; the parameters are the configured (unrolled) model's
    key, dummy = jax.random.PRNGKey(cfg.train.seed), np.zeros((1, cfg.train.seq_len), np.int32)
    unrolled = jax.jit(Transformer(model_cfg).init)(key, dummy)["params"]
    with setup.context():
        state = setup.init()
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(unrolled)):
            np.testing.assert_array_equal(a, b)
        batch = trainer.batch_at(tokens, cfg, setup.batch_sharding, 0)  # [A, B, T+1]
        rows = trainer.global_batch(np.asarray(batch)[0], sharding.batch_sharding(setup.mesh, 0), batch.shape[1:])
        eval_ahead = ahead.eval(state.params, rows)
        s_ahead, m_ahead = ahead.step(jax.tree.map(lambda x: x.copy(), state), batch)
        assert setup.step._cache_size() == 0 and setup.eval._cache_size() == 0  # ran the programs compiled ahead
        eval_jit = setup.eval(state.params, rows)
        s_jit, m_jit = setup.step(state, batch)
    assert float(eval_ahead) == float(eval_jit)
    assert float(m_ahead["loss"]) == float(m_jit["loss"])
    for a, b in zip(jax.tree.leaves(s_ahead), jax.tree.leaves(s_jit)):
        np.testing.assert_array_equal(a, b)
