"""Inputs that could keep a command busy without end, run as processes bounded by a timeout: a
forecast of an absurd budget, and a fine-tuning run whose base's chat template loops in loops. Each
ends in exit 2 and one line, well within its bound, with every file unchanged."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import run_cli
from hostile_kit import W, assert_one_line, snapshot
from test_hostile_scaling import make_sweep

from jaxllm.core.config import ModelConfig, resolve_model
from jaxllm.data import chat_template
from jaxllm.data.tokenizer import HFTokenizer
from jaxllm.hf import convert as hf
from jaxllm.model.transformer import Transformer

NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def hf_base_with_template(directory, template: str):
    """A random tiny LLaMA as a Hugging Face directory whose tokenizer carries ``template``."""
    tok = HFTokenizer.train(["the user asks, the assistant answers"] * 20, 300)
    tok.tok.add_special_tokens(["<|im_end|>", "<pad>"])
    tok = HFTokenizer(tok.tok, roles={"eos_token": "<|im_end|>", "pad_token": "<pad>"}, chat_template=template)
    m = resolve_model(ModelConfig(arch="llama", n_layer=1, d_model=32, n_head=4, n_kv_head=2), tok.vocab_size, 64)
    params = nn.unbox(jax.jit(Transformer(m).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    hf.write(m, params, directory)
    tok.save(directory)
    return directory


@pytest.mark.slow
def test_a_forecast_of_1e40_flops_refuses_at_once(tmp_path):
    make_sweep(tmp_path / "s")
    before = snapshot(tmp_path)
    out = run_cli("scaling.py", "forecast", "--fit", str(tmp_path / "s" / "fit.json"), "--compute", "1e40", timeout=60)
    assert_one_line(out.returncode, out.stderr, "beyond train.steps' limit")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_sft_on_a_base_whose_chat_template_loops_in_loops_ends_within_the_render_budget(tmp_path):
    hf_base_with_template(tmp_path / "base" / "saved", NESTED_LOOPS)  # W's init.from: base/saved
    w = W(tmp_path, tmp_path / "base")
    before = snapshot(tmp_path)
    start = time.monotonic()
    out = run_cli("sft.py", *w.sft(), timeout=120)
    assert_one_line(out.returncode, out.stderr, f"ran longer than {chat_template.RENDER_SECONDS:g} s")
    assert time.monotonic() - start < 60  # start-up and one conversation's budget, not the loops' 10^10 turns
    assert snapshot(tmp_path) == before
