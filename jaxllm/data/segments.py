"""Document boundaries inside a training window, from the end-of-document id (``data.document_mask``).

A window of the token stream may hold the end of one document, the whole of others and the start of
the next, each followed by the end-of-document id. :func:`segments_and_positions` gives every input
position its document (segment ids 1, 2, ... in order; the end id belongs to the document it ends)
and its position within that document (restarting at 0), which the model's attention turns into a
block-diagonal causal mask: a token attends only to earlier tokens of its own document, and sees the
positions it would see if the document stood alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segments_and_positions(tokens_BxT: jax.Array, eod_id: int) -> tuple[jax.Array, jax.Array]:
    """``(segment_ids_BxT, positions_BxT)``, int32, for input tokens ``tokens_BxT``."""
    ends_BxT = (tokens_BxT == eod_id).astype(jnp.int32)
    starts_BxT = jnp.pad(ends_BxT[:, :-1], ((0, 0), (1, 0)))  # a document starts after an end id
    segment_ids_BxT = 1 + jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32)
    index_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
    first_BxT = jax.lax.cummax(jnp.where(starts_BxT == 1, index_BxT, 0), axis=1)
    return segment_ids_BxT, index_BxT - first_BxT


def model_inputs(tokens_BxT: jax.Array, eod_id: int | None) -> dict:
    """The model's ``positions_BxT`` and ``segment_ids_BxT`` for ``eod_id``; none when it is None (no mask)."""
    if eod_id is None:
        return {}
    segment_ids_BxT, positions_BxT = segments_and_positions(tokens_BxT, eod_id)
    return {"positions_BxT": positions_BxT, "segment_ids_BxT": segment_ids_BxT}
