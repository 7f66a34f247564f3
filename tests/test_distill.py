"""Distillation: the mixed loss, a frozen teacher, and the trainer hook."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, corpus_text

import train as train_cli
from jaxllm.core.config import ModelConfig, load_config, resolve_model
from jaxllm.model.transformer import Transformer, cross_entropy
from jaxllm.train import distill

CFG = resolve_model(ModelConfig(arch="gpt2", n_layer=2, d_model=32, n_head=4), vocab_size=64, seq_len=16)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 17)), jnp.int32)


def init(seed: int):
    model = Transformer(CFG)
    return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), TOKENS[:, :-1])["params"])


def test_kl_term_equals_the_definition_at_temperature_2():
    s, t = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64)), jax.random.normal(jax.random.PRNGKey(1), (2, 3, 64))
    p = np.exp(np.asarray(t, np.float64) / 2)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(np.asarray(s, np.float64) / 2)
    q /= q.sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=-1))
    np.testing.assert_allclose(float(distill.kl_to_teacher(s, t, 2.0)), expected, rtol=1e-5)


def test_student_identical_to_teacher_has_zero_distillation_loss_at_alpha_1():
    model, params = init(0)
    loss = jax.jit(distill.make_loss_fn(model, model, temperature=2.0, alpha=1.0))(
        params, TOKENS, jax.random.PRNGKey(0), params
    )
    assert abs(float(loss)) < 1e-6


def test_alpha_0_is_the_next_token_loss():
    model, params = init(0)
    _, teacher_params = init(1)
    loss_fn = jax.jit(distill.make_loss_fn(model, model, temperature=2.0, alpha=0.0))
    loss = loss_fn(params, TOKENS, jax.random.PRNGKey(0), teacher_params)
    ce = jax.jit(lambda p: cross_entropy(model.apply({"params": p}, TOKENS[:, :-1]), TOKENS[:, 1:])[0])(params)
    assert float(loss) == pytest.approx(float(ce), rel=1e-6)


def test_teacher_receives_no_gradient():
    model, params = init(0)
    _, teacher_params = init(1)
    loss_fn = distill.make_loss_fn(model, model, temperature=2.0, alpha=0.5)
    grads = jax.jit(jax.grad(lambda t: loss_fn(params, TOKENS, jax.random.PRNGKey(0), t)))(teacher_params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A factory of tiny trained runs on the test corpus: ``runs(name, *overrides) -> (run_dir, summary)``, each
    trained once for the module."""
    from jaxllm.train.trainer import train

    tmp = tmp_path_factory.mktemp("distill")
    (tmp / "corpus.txt").write_text(corpus_text())

    @functools.cache  # a run two tests ask for trains once
    def make(name: str, *overrides: str):
        base = TINY + [f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}", f"run.dir={tmp / name}"]
        return tmp / name, train(load_config(None, base + list(overrides)), devices=jax.devices()[:1])

    return make


def losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# The teacher and the plain run are shared by both tests (``runs`` trains each once).
STEPS = ["train.steps=20", "optim.lr=3e-3", "log.every=5"]


@pytest.mark.slow
def test_training_with_a_teacher_at_alpha_0_follows_training_without_one(runs):
    teacher, _ = runs("teacher", "model.d_model=64")
    plain, _ = runs("plain20", *STEPS)
    taught, _ = runs("taught0", *STEPS, f"distill.teacher={teacher}", "distill.alpha=0")
    np.testing.assert_allclose(losses(taught), losses(plain), rtol=1e-6)
    assert len(losses(plain)) == 4


@pytest.mark.slow
def test_teacher_with_another_vocabulary_exits_2_with_one_line_and_writes_nothing(runs, tmp_path, capsys):
    teacher, _ = runs("char_teacher", "data.tokenizer=char", "train.steps=1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text())
    student = tmp_path / "student"
    capsys.readouterr()
    code = train_cli.main(
        [
            *TINY,
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={student}",
            f"distill.teacher={teacher}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "distillation needs the same tokenizer" in err
    assert not student.exists()


def kl_on_validation_text(student_dir, teacher_dir) -> float:
    import jaxllm

    student, teacher = jaxllm.load(student_dir), jaxllm.load(teacher_dir)
    tokens = np.frombuffer(corpus_text()[-2000:].encode(), np.uint8).astype(np.int32)[: 4 * 16].reshape(4, 16)
    return float(distill.kl_to_teacher(student.logits(tokens), teacher.logits(tokens), 1.0))


@pytest.mark.slow
def test_training_with_a_teacher_at_alpha_1_brings_the_student_closer_to_it_than_plain_training(runs):
    teacher, _ = runs("teacher", "model.d_model=64")
    plain, _ = runs("plain20", *STEPS)
    taught, _ = runs("taught20", *STEPS, f"distill.teacher={teacher}", "distill.alpha=1", "distill.temperature=1")
    assert kl_on_validation_text(taught, teacher) < 0.8 * kl_on_validation_text(plain, teacher)
