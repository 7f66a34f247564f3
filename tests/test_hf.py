"""Hugging Face interop: random small GPT-2 and LLaMA (grouped-query) models built with transformers,
saved as safetensors, read through jaxllm.load; logits must match transformers' and save_hf must
write back the very same tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxllm
from jaxllm.core.errors import ConfigError

TOKENS = np.array([[3, 17, 42, 5, 99, 0, 64, 7, 12, 33, 71, 2], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 120]])


def write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))


def gpt2_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def saved(model, tmp_path):
    directory = tmp_path / "hf"
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("build", [gpt2_model, llama_model], ids=["gpt2", "llama_gqa"])
def test_logits_match_transformers(build, tmp_path):
    model = build()
    loaded = jaxllm.load(saved(model, tmp_path))
    np.testing.assert_allclose(np.asarray(loaded.logits(TOKENS)), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("build", [gpt2_model, llama_model], ids=["gpt2", "llama_gqa"])
def test_save_hf_round_trips_to_identical_weights(build, tmp_path):
    directory = saved(build(), tmp_path)
    jaxllm.load(directory).save_hf(tmp_path / "out")
    original, written = load_file(directory / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(original) == sorted(written)
    for k in original:
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)


@pytest.mark.parametrize("build", [gpt2_model, llama_model], ids=["gpt2", "llama_gqa"])
def test_save_hf_output_loads_in_transformers_with_the_same_logits(build, tmp_path):
    model = build()
    jaxllm.load(saved(model, tmp_path)).save_hf(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(torch_logits(reloaded, TOKENS), torch_logits(model, TOKENS))


def test_pickled_bin_only_directory_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 32}
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ConfigError, match="safetensors"):
        jaxllm.load(tmp_path)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors"),
            "is not a readable safetensors file",
        ),
        (lambda d: _edit_config(d, n_embd=64), "the weights' shapes disagree with config.json"),
        (
            lambda d: _edit_config(d, vocab_size=256),
            r"tensor 'transformer.wte.weight' is \(128, 32\) but config.json describes \(256, 32\)",
        ),
        (lambda d: _edit_config(d, n_layer="two"), "n_layer must be a int, got 'two'"),
        (lambda d: _edit_config(d, n_layer=0), "n_layer must be positive"),
        (lambda d: _edit_config(d, n_embd=None), "holds a value of the wrong type"),
        (lambda d: (d / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}'), "is not UTF-8 text"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}'), "tokenizer.json"),
    ],
)
def test_a_damaged_hugging_face_directory_is_one_user_error(tmp_path, damage, message):
    """Issue 12: these escaped as tracebacks (or loaded NaN-producing weights)."""
    from jaxllm.core.errors import UserError

    directory = saved(gpt2_model(), tmp_path)
    damage(directory)
    with pytest.raises(UserError, match=message):
        jaxllm.load(directory)
