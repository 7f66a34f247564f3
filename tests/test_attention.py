"""Attention kernels: chunked attention computes what XLA's computes (values and gradients), the
choice of kernel refuses what a backend lacks, and decoding through the KV cache is unchanged."""

from __future__ import annotations

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

import train
from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.model import attention
from jaxllm.model.decode import Decoder
from jaxllm.model.transformer import Transformer

RTOL = 1e-5


def rel(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want)))


def qkv(n_head: int, n_kv: int, T: int = 16, B: int = 2, H: int = 8):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return (
        jax.random.normal(k1, (B, T, n_head, H)),
        jax.random.normal(k2, (B, T, n_kv, H)),
        jax.random.normal(k3, (B, T, n_kv, H)),
    )


def packed_segments(B: int, T: int) -> tuple[jax.Array, jax.Array]:
    """Rows of three packed documents: segment ids, and positions restarting at each document."""
    cuts = [0, 5, 11, T]
    seg = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(itertools.pairwise(cuts))])
    pos = np.concatenate([np.arange(b - a) for a, b in itertools.pairwise(cuts)])
    return jnp.asarray(np.tile(seg, (B, 1))), jnp.asarray(np.tile(pos, (B, 1)))


CASES = {  # name -> (query heads, key/value heads, packed)
    "causal": (4, 4, False),
    "gqa": (4, 2, False),
    "packed_gqa": (4, 1, True),
}


def loss_and_grads(impl: str, case: str, in_order: bool, block: int = 4):
    n_head, n_kv, packed = CASES[case]
    q, k, v = qkv(n_head, n_kv)
    B, T = q.shape[:2]
    seg, pos = packed_segments(B, T) if packed else (None, jnp.broadcast_to(jnp.arange(T), (B, T)))
    mask = attention.Mask(pos, pos, seg, seg, in_order)
    weights = jax.random.normal(jax.random.PRNGKey(1), q.shape)

    def loss(q, k, v):
        out = attention.attend(impl, q, k, v, mask, block)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("in_order", [True, False], ids=["block_skipping", "mask_by_position"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_attention_and_its_gradients_equal_xla(case, in_order):
    out, grads = loss_and_grads("chunked", case, in_order)
    want_out, want_grads = loss_and_grads("xla", case, True)
    assert rel(out, want_out) <= RTOL
    for name, g, w in zip("qkv", grads, want_grads):
        assert rel(g, w) <= RTOL, name


def test_chunked_attention_never_builds_the_scores():
    """The compiled gradient of chunked attention holds no T x T buffer per head; XLA's does."""
    T = 1024
    q = jnp.zeros((1, T, 4, 8))
    pos = jnp.broadcast_to(jnp.arange(T), (1, T))
    mask = attention.Mask(pos, pos, None, None, True)

    def temp_bytes(impl):
        grad = jax.grad(lambda q, k, v: jnp.sum(attention.attend(impl, q, k, v, mask, 64)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    scores = 4 * T * T * 4  # N x T x S float32
    assert temp_bytes("xla") >= scores > 8 * temp_bytes("chunked")


def test_kernels_a_backend_lacks_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="splash needs a TPU"):
        attention.resolve("splash", "cpu", "float32")
    with pytest.raises(ConfigError, match="cudnn needs a GPU"):
        attention.resolve("cudnn", "tpu", "bfloat16")
    with pytest.raises(ConfigError, match="cudnn needs model.dtype=bfloat16"):
        attention.resolve("cudnn", "gpu", "float32")


def test_train_py_on_a_backend_without_the_kernel_exits_2_in_one_line(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}"]
    assert train.main([*args, "model.attention=splash"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: model.attention=splash needs a TPU (this is cpu); use chunked or auto"
    )
    assert not run_dir.exists()


def test_auto_takes_the_fused_kernel_or_says_once_that_it_falls_back(capsys):
    assert attention.resolve("auto", "tpu", "float32") == "splash"
    assert attention.resolve("auto", "gpu", "bfloat16") == "cudnn"
    assert capsys.readouterr().err == ""
    assert attention.resolve("auto", "gpu", "float16") == "cudnn"
    attention._say_fallback.cache_clear()
    assert [attention.resolve("auto", "cpu", "float32") for _ in range(3)] == ["chunked"] * 3
    assert capsys.readouterr().err == "model.attention=auto: no fused kernel for cpu/float32; using chunked\n"


def test_zigzag_gives_every_shard_one_early_and_one_late_chunk_and_equal_causal_work():
    order = attention.zigzag_order(32, 4)
    assert sorted(order.tolist()) == list(range(32))
    shards = order.reshape(4, 8)
    assert shards[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    work = (shards + 1).sum(axis=1)  # keys each shard's queries read under the causal mask
    assert len(set(work.tolist())) == 1
    assert attention.zigzag_order(32, 1) is None and attention.zigzag_order(12, 4) is None


def tiny(attention_impl: str, **kw) -> Transformer:
    cfg = ModelConfig(
        arch="llama", n_layer=2, d_model=32, n_head=4, n_kv_head=2, attention=attention_impl, attention_block=4, **kw
    )
    return Transformer(resolve_model(cfg, 64, 32))


@pytest.mark.slow
def test_model_with_chunked_attention_equals_xla_on_packed_rows():
    xla, chunked = tiny("xla"), tiny("chunked")
    params = nn.unbox(xla.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
    seg, pos = packed_segments(2, 16)

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens, pos, seg) ** 2)))(
            params
        )

    (got, got_g), (want, want_g) = loss(chunked), loss(xla)
    assert abs(got - want) <= RTOL * abs(want)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert rel(g, w) <= RTOL


@pytest.mark.slow
def test_decoding_under_chunked_attention_equals_xla():
    xla = tiny("xla")
    params = nn.unbox(xla.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    runs = {
        impl: Decoder(dataclasses.replace(xla.cfg, attention=impl)).run(
            params, prompts, 6, temperature=0.0, with_logits=True
        )
        for impl in ("xla", "chunked")
    }
    assert np.asarray(runs["chunked"][0]).tolist() == np.asarray(runs["xla"][0]).tolist()
    assert rel(runs["chunked"][1], runs["xla"][1]) <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_splash_wrapper_equals_xla_in_pallas_interpret_mode(monkeypatch, packed):
    """The TPU kernel itself cannot run here; Pallas's interpreter runs it on the CPU, which checks
    jaxllm's wrapper: layout, scaling, GQA by repeated heads, segment ids (values and gradients)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    make = sk.make_splash_mha
    monkeypatch.setattr(sk, "make_splash_mha", lambda *a, **kw: make(*a, **kw, interpret=True))
    q, k, v = qkv(2, 1, T=128, B=1, H=64)
    pos = jnp.broadcast_to(jnp.arange(128), (1, 128))
    seg = jnp.asarray(np.repeat([[0, 1]], 64, axis=1)) if packed else None
    mask = attention.Mask(pos, pos, seg, seg, True)

    def value_and_grads(impl):
        return jax.value_and_grad(
            lambda q, k, v: jnp.sum(attention.attend(impl, q, k, v, mask) * q), argnums=(0, 1, 2)
        )(q, k, v)

    (got, got_g), (want, want_g) = value_and_grads("splash"), value_and_grads("xla")
    assert abs(got - want) <= RTOL * abs(want)
    for g, w in zip(got_g, want_g):
        assert rel(g, w) <= RTOL
