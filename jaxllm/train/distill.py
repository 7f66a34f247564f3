"""Knowledge distillation: a student learns from the data and from a frozen, trained teacher.

    loss = (1 - alpha) * CE(student, next token) + alpha * T^2 * KL(teacher_T || student_T)

where ``p_T = softmax(logits / T)``. A temperature T > 1 softens both distributions so the student
also learns how the teacher ranks the wrong tokens (Hinton et al., 2015); the T^2 keeps the KL
term's gradients at the scale of the cross-entropy's as T grows. The teacher's forward pass runs in
the same jitted step as the student's, on the same tokens; its parameters are an argument of the
step (not a compile-time constant), sharded by the same logical rules, and receive no gradient.

    python train.py model.n_layer=2 model.d_model=64 distill.teacher=runs/tiny distill.alpha=0.5

Teacher and student must share the tokenizer (the KL compares distributions over the same ids); the
teacher's context must cover the student's ``train.seq_len``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.core.config import DistillConfig, ModelConfig, from_dict
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import read_yaml
from jaxllm.data import tokenizer as tokenizers
from jaxllm.model import moe
from jaxllm.model.transformer import Transformer, cross_entropy
from jaxllm.parallel import sharding
from jaxllm.train import checkpoint as ckpt


@dataclass
class Teacher:
    model: Transformer  # deterministic
    params: Any  # placed with ``shardings``
    shardings: Any


def kl_to_teacher(student_BxTxV: jax.Array, teacher_BxTxV: jax.Array, temperature: float) -> jax.Array:
    """Mean over tokens of ``KL(softmax(teacher / T) || softmax(student / T))`` in nats (float32)."""
    log_q_BxTxV = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    log_p_BxTxV = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p_BxTxV) * (log_p_BxTxV - log_q_BxTxV), axis=-1))


def make_loss_fn(student: Transformer, teacher: Transformer, temperature: float, alpha: float) -> Callable:
    """``loss(params, tokens_BxT1, rng, teacher_params) -> the mixed loss`` (nats), plus the weighted
    router losses of a mixture-of-experts student (``jaxllm.model.moe.loss``), whatever ``alpha``."""

    def loss_fn(params, tokens_BxT1, rng, teacher_params):
        inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
        logits_BxTxV, sown = student.apply(
            {"params": params}, inputs_BxT, rngs={"dropout": rng}, mutable=[moe.COLLECTION]
        )
        teacher_BxTxV = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, inputs_BxT))
        ce = cross_entropy(logits_BxTxV, targets_BxT)[0]
        kl = kl_to_teacher(logits_BxTxV, teacher_BxTxV, temperature)
        return (1.0 - alpha) * ce + alpha * temperature**2 * kl + moe.loss(sown)

    return loss_fn


def make_train_step(student: Transformer, teacher: Transformer, d: DistillConfig, make_step: Callable) -> Callable:
    """``step(state, tokens_AxBxT1, teacher_params)``: ``make_step(loss_fn)``'s step with the distillation
    loss, the teacher's parameters passed in so that one compiled step serves them whatever their values."""

    def step(state, tokens_AxBxT1, teacher_params):
        loss_fn = make_loss_fn(student, teacher, d.temperature, d.alpha)
        return make_step(lambda p, t, r: loss_fn(p, t, r, teacher_params))(state, tokens_AxBxT1)

    return step


# --------------------------------------------------------------------------- the teacher's run


def _teacher_config(run_dir: Path) -> ModelConfig:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"distill.teacher={str(run_dir)!r} is not a jaxllm run directory (no config.yaml)")
    if not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"distill.teacher={str(run_dir)!r} has no checkpoint yet")
    return from_dict(read_yaml(run_dir / "config.yaml", "teacher run config")).model


def check_teacher(path: str, student: ModelConfig, tokenizer: tokenizers.Tokenizer, seq_len: int, pipe: int) -> None:
    """Refuses a teacher that cannot teach this student, before anything is written."""
    run_dir = Path(path)
    teacher = _teacher_config(run_dir)
    if pipe > 1:
        raise ConfigError("distillation does not run under mesh.pipe > 1; use the data, fsdp and tensor axes")
    theirs = tokenizers.load(run_dir)
    same = teacher.vocab_size == student.vocab_size and all(
        theirs.decode([i]) == tokenizer.decode([i]) for i in range(min(theirs.vocab_size, tokenizer.vocab_size))
    )
    if not same or theirs.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"distill.teacher={path!r} has a vocabulary of {teacher.vocab_size} ids ({theirs.kind} tokenizer), "
            f"the student {student.vocab_size} ({tokenizer.kind}); distillation needs the same tokenizer"
        )
    if teacher.max_seq_len < seq_len:
        raise ConfigError(
            f"distill.teacher={path!r} has a context of {teacher.max_seq_len} tokens < train.seq_len={seq_len}"
        )


def load_teacher(path: str, mesh: jax.sharding.Mesh, rules: Any) -> Teacher:
    """The teacher's latest parameters, sharded over ``mesh`` by the logical-axis ``rules``."""
    run_dir = Path(path)
    cfg = _teacher_config(run_dir)
    model = Transformer(cfg, deterministic=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    checkpointer = ckpt.Checkpointer(run_dir, keep=1)  # read only: orbax prunes when saving, never here
    try:
        params = checkpointer.restore_single_device(checkpointer.steps()[-1])["params"]
    finally:
        checkpointer.close()
    return Teacher(model=model, params=jax.device_put(params, shardings), shardings=shardings)
