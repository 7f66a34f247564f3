"""Context parallelism: the sequence split over ``mesh.context`` computes what one device computes.

Each layout runs the trainer's own jitted step once on the same batch from the same initial state;
the loss and every gradient (read back from Adam's first moment, as in test_pipeline) must match the
one-device step within rel 1e-5 (float32). The model is the llama flavour (RoPE, GQA), so a position
moved by the zig-zag split would show.
"""

from __future__ import annotations

import equality
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from equality import rel
from test_attention import packed_segments

import train
from jaxllm.core.config import MeshConfig, load_config, resolve_model
from jaxllm.model import attention
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding

VOCAB, SEQ, BATCH = 64, 32, 8
BASE = [
    "model.arch=llama",
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=4",
    "model.n_kv_head=2",
    f"model.vocab_size={VOCAB}",
    f"train.seq_len={SEQ}",
    f"train.batch_size={BATCH}",
    "optim.warmup_steps=1",
    "optim.clip_norm=0",
]
RTOL = 1e-5
LAYOUTS = {
    "context2": ["mesh.context=2", "mesh.data=-1"],
    "context4": ["mesh.context=4", "mesh.data=-1"],
    "context8": ["mesh.context=8", "mesh.data=1"],
    "context2_fsdp2_tensor2": ["mesh.context=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.data=1"],
    "context2_chunked": ["mesh.context=2", "mesh.data=-1", "model.attention=chunked", "model.attention_block=4"],
    "context2_pipe2": ["mesh.context=2", "mesh.pipe=2", "mesh.data=-1"],
    "context2_pipe2_1f1b": [
        "mesh.context=2",
        "mesh.pipe=2",
        "mesh.data=-1",
        "pipeline.schedule=1f1b",
        "pipeline.microbatches=4",
    ],
    "context2_tensor2_sequence_parallel": [
        "mesh.context=2",
        "mesh.tensor=2",
        "mesh.sequence_parallel=true",
        "mesh.data=-1",
    ],
}


def one_step(overrides: list[str], devices: list, initial=None) -> dict:
    """Loss and gradients of one trainer step; the initial state (host arrays) if none is given."""
    return equality.one_step(BASE + overrides, devices, VOCAB, SEQ, BATCH, initial)


@pytest.fixture(scope="module")
def reference() -> dict:
    return one_step([], jax.devices()[:1])


FAST_CASE = "context2_fsdp2_tensor2"  # the fast lane's one context-parallel case: context composed with fsdp and tensor


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == FAST_CASE else pytest.mark.slow) for n in LAYOUTS])
def test_context_parallel_step_equals_single_device(reference, name):
    run = one_step(LAYOUTS[name], jax.devices(), reference["initial"])
    assert abs(run["loss"] - reference["loss"]) <= RTOL * abs(reference["loss"])
    for path, want in jax.tree_util.tree_leaves_with_path(reference["grads"]):
        got = dict(jax.tree_util.tree_leaves_with_path(run["grads"]))[path]
        assert rel(got, want) <= RTOL, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_packed_rows_under_context_parallelism_give_the_single_device_logits():
    cfg = resolve_model(load_config(None, BASE).model, VOCAB, SEQ)
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))["params"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, SEQ), 0, VOCAB)
    seg, pos = packed_segments(2, SEQ)
    apply = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))
    want = apply(params, tokens, pos, seg)
    mesh_cfg = MeshConfig(data=1, context=4)
    with jax.set_mesh(sharding.make_mesh(mesh_cfg, jax.devices()[:4])), nn.logical_axis_rules(sharding.rules(mesh_cfg)):
        assert attention.sequence_shards() == 4
        got = apply(params, tokens, pos, seg)
    assert rel(got, want) <= RTOL


def test_context_parallelism_splits_the_activations_over_the_sequence():
    mesh_cfg = MeshConfig(data=2, context=4)
    table = dict(sharding.rules(mesh_cfg))
    assert table["seq"] == table["q_seq"] == "context" and table["kv_seq"] is None
    assert sharding.make_mesh(mesh_cfg, jax.devices()).shape == {
        "data": 2,
        "fsdp": 1,
        "tensor": 1,
        "pipe": 1,
        "context": 4,
    }


def test_a_sequence_the_zigzag_cannot_split_is_refused_in_one_line(tmp_path, capsys):
    assert train.main(["mesh.context=4", "mesh.data=-1", "train.seq_len=20", f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.seq_len=20 is not divisible by 2*mesh.context=8 (context parallelism's zig-zag split)"
    ]
    assert not (tmp_path / "run").exists()
