"""Mixtral interop: a random small MixtralForCausalLM built with transformers loads through
jaxllm.load into jaxllm's mixture-of-experts blocks (jaxllm.model.moe: dropless, top-2, probabilities
renormalised) with transformers' logits, on one device and streamed into an expert-parallel mesh;
save_hf writes back the very same tensors; what jaxllm cannot run the same way is refused."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch", reason="the reference Mixtral is transformers' (torch)")
transformers = pytest.importorskip("transformers", reason="the reference logits are transformers'")

import jaxllm
from jaxllm.core.config import MeshConfig, ModelConfig, MoEConfig, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.hf import convert as hf
from jaxllm.hf import stream as hf_stream
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding

TOKENS = np.array([[3, 17, 42, 5, 99, 0, 64, 7, 12, 33, 71, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 120]])


def mixtral_model(**overrides):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        **{
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 32,
            "tie_word_embeddings": False,
            **overrides,
        }
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # a decisive router: at init (std 0.02) near-ties would let rounding pick the experts
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(50.0) if hasattr(layer, "mlp") else layer.block_sparse_moe.gate.weight.mul_(50.0)
    return model


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    model = mixtral_model()
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


@pytest.mark.slow
def test_mixtral_loads_as_jaxllm_moe_with_transformers_logits(mixtral_dir):
    model, directory = mixtral_dir
    loaded = jaxllm.load(directory)
    e = loaded.config.model.moe
    assert (e.n_experts, e.top_k, e.capacity_factor) == (4, 2, 0.0)  # dropless
    assert loaded.params["blocks"]["mlp"]["gate"]["kernel"].shape == (2, 4, 32, 48)  # [L, E, D, F]
    np.testing.assert_allclose(np.asarray(loaded.logits(TOKENS)), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mixtral_streams_into_an_expert_parallel_mesh_with_transformers_logits(mixtral_dir):
    model, directory = mixtral_dir
    mesh_cfg = MeshConfig(data=1, fsdp=2, expert=4)
    m = hf.read_config(directory)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
    shardings = sharding.logical_shardings(hf_stream.abstract_params(m), mesh, rules)
    _, params = hf.read(directory, shardings)
    up = params["blocks"]["mlp"]["up"]["kernel"]
    assert {s.data.shape for s in up.addressable_shards} == {(2, 1, 16, 48)}  # one expert, half of D, per device
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logits = jax.jit(lambda p, t: Transformer(m, deterministic=True).apply({"params": p}, t))(params, TOKENS)
    np.testing.assert_allclose(np.asarray(logits), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_save_hf_writes_back_the_same_mixtral_tensors_and_transformers_reads_them(mixtral_dir, tmp_path):
    model, directory = mixtral_dir
    out = tmp_path / "out"
    jaxllm.load(directory).save_hf(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    want, got = load_file(directory / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, TOKENS), torch_logits(model, TOKENS))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_experts_per_tok": 1}, "num_experts_per_tok=1 weighs its expert by 1"),
        ({"sliding_window": 8}, "sliding_window=8 is not supported"),
    ],
)
def test_a_mixtral_jaxllm_would_run_differently_is_refused_in_one_line(tmp_path, override, message):
    mixtral_model(**override).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ConfigError, match=message):
        jaxllm.load(tmp_path)


@pytest.mark.parametrize("moe", [{"top_k": 1}, {"every": 2}, {"shared_experts": 1}])
def test_an_moe_without_a_mixtral_equivalent_is_not_exported(tmp_path, moe):
    m = resolve_model(
        ModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4, moe=MoEConfig(n_experts=4, **moe)), 128, 32
    )
    params = jax.eval_shape(
        lambda: nn.unbox(Transformer(m).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])
    )
    with pytest.raises(ConfigError, match="has a Hugging Face \\(Mixtral\\) equivalent"):
        hf.write(m, params, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written
