"""The optimizer, in one place: global-norm clipping, then AdamW with decay on weight matrices only,
driven by a warmup + decay learning-rate schedule.

Weight decay applies to every ``kernel`` (the weight matrices) and to the token embedding (it is also
the output projection when tied); not to biases, norm scales or position embeddings.
"""

from __future__ import annotations

import jax
import optax

from jaxllm.core.config import OptimConfig


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup to ``lr``, then the chosen decay to ``min_lr``."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))
    rest = max(steps - warmup, 1)
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup) if warmup else optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr / cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.min_lr, rest)
    elif cfg.schedule == "wsd":
        n_decay = max(round(rest * cfg.decay_fraction), 1)
        decay = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, cfg.min_lr, n_decay)], [rest - n_decay]
        )
    else:
        decay = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params) -> dict:
    """True for the leaves that get weight decay: weight matrices and the token embedding."""

    def wants_decay(path, _) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        return names[-1] == "kernel" or names[-2:] == ["wte", "embedding"]

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm -> adamw(schedule, mask=decay_mask)``."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(
        optax.adamw(
            schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    )
    return optax.chain(*parts)
