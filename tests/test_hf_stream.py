"""Hugging Face checkpoints at scale: a checkpoint that transformers split into several
safetensors files streams into parameters sharded over 8 faked devices, each device reading only its
block, with transformers' logits; the host holds about one tensor at a time; save_hf of a sharded
model writes an index over its size cap and transformers reads it back to the same logits; a
directory of weights alone loads; damaged checkpoints are one line."""

from __future__ import annotations

import json
import tracemalloc

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference checkpoints are written by transformers (torch)")
transformers = pytest.importorskip("transformers", reason="the reference logits are transformers'")

import jaxllm
from jaxllm.core.config import MeshConfig
from jaxllm.core.errors import ConfigError
from jaxllm.hf import convert as hf
from jaxllm.hf import safetensors_io as st
from jaxllm.hf import stream as hf_stream
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding

TOKENS = np.array([[3, 17, 42, 5, 99, 0, 64, 7, 12, 33, 71, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 120]])


def llama_model(**sizes):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            **sizes,
        }
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def save_sharded(model, directory, dtype=None, max_shard_size="16KB"):
    """``model`` as transformers writes it with a small cap: several files and an index."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = llama_model()
    return model, save_sharded(model, tmp_path_factory.mktemp("llama"))


def sharded_logits(m, params, mesh_cfg) -> np.ndarray:
    mesh = sharding.make_mesh(mesh_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(mesh_cfg)):
        apply = jax.jit(lambda p, t: Transformer(m, deterministic=True).apply({"params": p}, t))
        return np.asarray(apply(params, TOKENS))


def mesh_shardings(m, mesh_cfg):
    return sharding.logical_shardings(
        hf_stream.abstract_params(m), sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
    )


MESHES = {
    "data": MeshConfig(data=8),
    "fsdp": MeshConfig(data=1, fsdp=8),
    "tensor": MeshConfig(data=4, tensor=2),
    "fsdp_tensor": MeshConfig(data=2, fsdp=2, tensor=2),
    "pipe_layers": MeshConfig(data=4, pipe=2),
    # head size split: a block is part of every head, read as a bounding box and cut after the reshape
    "head_dim": MeshConfig(data=4, tensor=2, rules={"head_dim": "tensor", "heads": None, "kv_heads": None}),
}
FAST = "fsdp_tensor"  # the fast lane's mesh; the others are slow-lane


def slow_unless_fast(names):
    return [n if n == FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_transformers_split_the_checkpoint_into_three_or_more_files_with_an_index(llama_dir):
    _, directory = llama_dir
    assert (directory / st.INDEX).is_file()
    assert len(list(directory.glob("model-*-of-*.safetensors"))) >= 3


@pytest.mark.parametrize("mesh_name", slow_unless_fast(MESHES))
def test_a_sharded_checkpoint_streams_into_each_mesh_with_transformers_logits(llama_dir, mesh_name):
    model, directory = llama_dir
    mesh_cfg = MESHES[mesh_name]
    m = hf.read_config(directory)
    shardings = mesh_shardings(m, mesh_cfg)
    _, params = hf.read(directory, shardings)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    np.testing.assert_allclose(sharded_logits(m, params, mesh_cfg), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mesh_name", slow_unless_fast([FAST, "head_dim"]))
def test_gpt2_fused_qkv_streams_per_slice_under_tensor_parallelism(tmp_path, mesh_name):
    model = gpt2_model()
    directory = save_sharded(model, tmp_path / "gpt2")
    m = hf.read_config(directory)
    _, params = hf.read(directory, mesh_shardings(m, MESHES[mesh_name]))
    got = sharded_logits(m, params, MESHES[mesh_name])
    np.testing.assert_allclose(got, torch_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_into_float32_parameters_exactly(tmp_path):
    model = llama_model()
    directory = save_sharded(model, tmp_path / "bf16", dtype=torch.bfloat16)
    m, params = hf.read(directory, mesh_shardings(hf.read_config(directory), MESHES["fsdp_tensor"]))
    want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [N*H, D], rounded to bf16
    q = np.asarray(params["blocks"]["attn"]["q"]["kernel"][1])  # [D, N, H]
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q.reshape(m.d_model, -1).T, want)


@pytest.mark.slow
def test_streaming_holds_about_one_tensor_of_host_memory(tmp_path):
    """Peak traced host allocations during a load stay under twice the largest stored tensor, while the
    checkpoint is many times that (a second load: the first compiled the layer updates)."""
    model = llama_model(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, vocab_size=256)
    directory = save_sharded(model, tmp_path / "big", max_shard_size="8MB")
    shardings = mesh_shardings(hf.read_config(directory), MESHES["fsdp_tensor"])
    hf.read(directory, shardings)
    largest = max(np.prod(e.shape) * 4 for e in st.catalog(directory).values())
    total = sum(np.prod(e.shape) * 4 for e in st.catalog(directory).values())
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        hf.read(directory, shardings)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert total > 8 * largest
    assert peak < 2 * largest, f"peak {peak} bytes; largest tensor {largest}, checkpoint {total}"


def test_save_hf_of_a_sharded_model_writes_an_index_and_round_trips_through_transformers(llama_dir, tmp_path):
    model, directory = llama_dir
    m = hf.read_config(directory)
    _, params = hf.read(directory, mesh_shardings(m, MESHES["fsdp_tensor"]))
    out = tmp_path / "out"
    hf.write(m, params, out, max_shard_bytes=20_000)
    index = json.loads((out / st.INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) >= 3
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, TOKENS), torch_logits(model, TOKENS))


def test_save_hf_under_the_cap_writes_one_file_and_removes_an_earlier_export(llama_dir, tmp_path):
    _, directory = llama_dir
    m, params = hf.read(directory)
    out = tmp_path / "out"
    hf.write(m, params, out, max_shard_bytes=20_000)
    hf.write(m, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", st.SINGLE]


def test_a_directory_of_weights_alone_loads_for_logits_and_token_ids(llama_dir):
    model, directory = llama_dir
    assert not (directory / "tokenizer.json").exists()
    loaded = jaxllm.load(directory)
    want = torch_logits(model, TOKENS)
    np.testing.assert_allclose(np.asarray(loaded.logits(TOKENS)), want, atol=1e-4, rtol=0)
    (first,) = loaded.generate_ids([TOKENS[0].tolist()], max_new_tokens=1, temperature=0.0)
    assert first == [int(want[0, -1].argmax())]


def test_text_generation_without_a_tokenizer_is_one_line(llama_dir, capsys):
    from jaxllm.infer import generate

    _, directory = llama_dir
    with pytest.raises(ConfigError, match="has no tokenizer.json: this model reads and writes token ids only"):
        jaxllm.load(directory).generate("hello")
    assert generate.main([str(directory), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer.json" in err and "\n" not in err


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


def _rewrite(path, name, value):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def _shard_of(directory, name):
    return directory / json.loads((directory / st.INDEX).read_text())["weight_map"][name]


def _drop_a_shard(d):
    _shard_of(d, "model.norm.weight").unlink()


def _wrong_shape(d):
    _rewrite(
        _shard_of(d, "model.layers.1.mlp.up_proj.weight"),
        "model.layers.1.mlp.up_proj.weight",
        np.zeros((64, 16), np.float32),
    )


def _integer_dtype(d):
    _rewrite(
        _shard_of(d, "model.layers.0.input_layernorm.weight"),
        "model.layers.0.input_layernorm.weight",
        np.ones(32, np.int32),
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (_drop_a_shard, r"model.safetensors.index.json names model-\d+-of-\d+.safetensors, which is not in"),
        (
            _wrong_shape,
            r"tensor 'model.layers.1.mlp.up_proj.weight' is \(64, 16\) but config.json describes \(64, 32\)",
        ),
        (_integer_dtype, r"tensor 'model.layers.0.input_layernorm.weight' has dtype 'I32'; readable: F64"),
    ],
    ids=["index_names_a_missing_file", "wrong_shape", "integer_dtype"],
)
def test_a_damaged_sharded_checkpoint_is_one_line_and_exit_2(llama_dir, tmp_path, capsys, damage, message):
    from jaxllm.infer import generate

    directory = _copy(llama_dir[1], tmp_path)
    damage(directory)
    assert generate.main([str(directory), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    with pytest.raises(ConfigError, match=message):
        jaxllm.load(directory)
