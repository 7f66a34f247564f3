"""data.document_mask: attention stops at the end-of-document id, and positions restart after it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.data import segments
from jaxllm.model.transformer import Transformer
from jaxllm.train.train_step import make_eval_step, make_loss_fn

EOD = 63


def test_segments_and_positions_follow_the_end_ids():
    tokens = jnp.array([[5, 6, EOD, 7, 8, 9, EOD, EOD, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    segment_ids, positions = segments.segments_and_positions(tokens, EOD)
    np.testing.assert_array_equal(segment_ids[0], [1, 1, 1, 2, 2, 2, 2, 3, 4])  # an end id ends its own document
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(segment_ids[1], np.ones(9))
    np.testing.assert_array_equal(positions[1], np.arange(9))


def test_no_end_id_means_no_extra_inputs():
    assert segments.model_inputs(jnp.zeros((1, 4), jnp.int32), None) == {}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_model(request):
    cfg = resolve_model(
        ModelConfig(arch=request.param, n_layer=2, d_model=32, n_head=4, vocab_size=64), vocab_size=64, seq_len=16
    )
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
    return model, params


def _embedding_grad(model, params, tokens_BxT, eod_id, position):
    """d loss(position) / d (the input embedding of every position): ``[T, D]``."""

    def loss_at(delta_BxTxD):
        def forward(m):
            extra = segments.model_inputs(tokens_BxT, eod_id)
            positions = extra.get("positions_BxT", jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape))
            x = m.embed(tokens_BxT, positions) + delta_BxTxD
            x, _ = m.blocks(x, positions, extra.get("segment_ids_BxT"))
            return m.head(x)

        logits = model.apply({"params": params}, method=forward)
        return jax.nn.logsumexp(logits[0, position]) - logits[0, position, 7]

    zeros = jnp.zeros((1, tokens_BxT.shape[1], model.cfg.d_model))
    return np.asarray(jax.grad(loss_at)(zeros)[0])


def test_loss_after_a_document_end_has_no_gradient_from_tokens_before_it(tiny_model):
    model, params = tiny_model
    tokens = jnp.array([[3, 4, 5, 6, EOD, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    grad = np.abs(_embedding_grad(model, params, tokens, EOD, position=9)).sum(axis=1)
    assert np.all(grad[:5] == 0)  # the earlier document, its end id included
    assert np.all(grad[5:10] > 0)  # its own document up to itself
    unmasked = np.abs(_embedding_grad(model, params, tokens, None, position=9)).sum(axis=1)
    assert np.all(unmasked[:10] > 0)  # without the mask the earlier document does reach it


def test_masked_loss_of_a_packed_window_equals_each_document_alone(tiny_model):
    model, params = tiny_model
    doc_a, doc_b = [3, 4, 5, 6, 7, EOD], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    window = jnp.array([doc_a + doc_b])  # T+1 = 17 tokens, 16 predictions
    packed = make_eval_step(model, EOD)(params, window)
    alone = [
        make_eval_step(model)(params, jnp.array([doc])) for doc in (doc_a + [9], doc_b)
    ]  # a's end predicts b's start
    weights = np.array([len(doc_a), len(doc_b) - 1])
    np.testing.assert_allclose(packed, np.dot(np.array(alone), weights) / weights.sum(), rtol=1e-5)
    loss, _ = make_loss_fn(model, EOD)(params, window, jax.random.PRNGKey(0))
    np.testing.assert_allclose(loss, packed, rtol=1e-6)
