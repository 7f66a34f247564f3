"""Fine-tuning's model and loss: the method's parameters applied to the base model (see
:mod:`jaxllm.sft.peft`), and cross-entropy over the assistant tokens of a packed batch ``[B, 5, T]``
(:mod:`jaxllm.data.chat`: tokens, targets, weights, segment ids, positions)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.data import chat
from jaxllm.model import moe
from jaxllm.model.transformer import Transformer
from jaxllm.sft import peft


def forward(
    model: Transformer,
    params: dict,
    lora_scale: float,
    tokens_BxT,
    positions_BxT,
    segments_BxT=None,
    rngs=None,
    mutable=False,
):
    """Logits ``[B, T, V]`` of the fine-tuned model, whatever the method (see :mod:`jaxllm.sft.peft`); with
    ``mutable`` (``[moe.COLLECTION]``), ``(logits, collections)`` as ``Module.apply`` returns them."""
    variables = {"params": peft.model_params(params, lora_scale)}
    return model.apply(variables, tokens_BxT, positions_BxT, segments_BxT, rngs=rngs, mutable=mutable)


def _masked_loss(module: Transformer, tokens_BxT, positions_BxT, segments_BxT, targets_BxT, weights_BxT):
    """The mean cross-entropy over the weighted tokens, through :meth:`Transformer.loss`: the logits
    whole, or under ``model.loss_chunk`` fused with the head a block of positions at a time."""
    return module.loss(module.hidden(tokens_BxT, positions_BxT, segments_BxT), targets_BxT, weights_BxT)[0]


def make_loss_fn(model: Transformer, mask: dict, lora_scale: float) -> Callable:
    """``loss(params, batch_Bx5xT, rng) -> (loss, stats)``: cross-entropy over the assistant tokens of a
    packed batch (fused with the head under ``model.loss_chunk``), plus a mixture of experts' router
    losses; ``stats``: the router's (``moe.telemetry``)."""

    def loss_fn(params, batch_Bx5xT, rng):
        params = peft.stop_frozen(params, mask)
        b = batch_Bx5xT
        ce, sown = model.apply(
            {"params": peft.model_params(params, lora_scale)},
            b[:, chat.INPUTS],
            b[:, chat.POSITIONS],
            b[:, chat.SEGMENTS],
            b[:, chat.TARGETS],
            b[:, chat.MASK].astype(jnp.float32),
            rngs={"dropout": rng},
            mutable=[moe.COLLECTION],
            method=_masked_loss,
        )
        return ce + moe.loss(sown), moe.telemetry(sown)

    return loss_fn


def per_token_nll(model: Transformer, params: dict, batch_Bx5xT, lora_scale: float = 0.0) -> jax.Array:
    """Next-token negative log-likelihood ``[B, T]`` (nats) of every position of a packed batch."""
    b = batch_Bx5xT
    logits = forward(model, params, lora_scale, b[:, chat.INPUTS], b[:, chat.POSITIONS], b[:, chat.SEGMENTS]).astype(
        jnp.float32
    )
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b[:, chat.TARGETS][..., None], -1)[..., 0]
