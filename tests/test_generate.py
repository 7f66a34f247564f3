"""Cached decoding (prefill + jitted decode loop) against the reference: full forward passes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, corpus_text
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxllm.core.config import MeshConfig, ModelConfig, load_config, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.data.tokenizer import HFTokenizer
from jaxllm.hf import convert as hf
from jaxllm.infer import generate
from jaxllm.model.decode import Decoder, cache_slots, filter_logits, generate_tokens
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding

FLAVOURS = {
    "gpt2": ModelConfig(arch="gpt2", n_layer=2, d_model=32, n_head=4),
    "llama_gqa": ModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4, n_kv_head=2),
}
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]  # lengths 3, 7, 12
N_NEW = 10


def build(flavour: str) -> tuple[ModelConfig, Transformer, dict]:
    cfg = resolve_model(FLAVOURS[flavour], vocab_size=64, seq_len=32)
    model = Transformer(cfg)
    # At this init the logits span about +-0.6 and the greedy choices here win by >= 0.07, far
    # above float32 rounding (~1e-7), so equal tokens are a property of the code, not of luck.
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return cfg, model, params


def greedy_by_full_forward(model: Transformer, params, prompt: list[int], n_new: int):
    """The reference: rerun the whole sequence for every token (in a buffer of the full context;
    causality makes the positions after the last token irrelevant). Returns (tokens, logits_NxV)."""
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    buf = np.zeros((1, model.cfg.max_seq_len), np.int32)
    buf[0, : len(prompt)] = prompt
    logits = []
    for n in range(len(prompt), len(prompt) + n_new):
        logits.append(np.asarray(forward(params, jnp.asarray(buf))[0, n - 1]))
        buf[0, n] = int(np.argmax(logits[-1]))
    return buf[0, len(prompt) : len(prompt) + n_new].tolist(), np.stack(logits)


@pytest.fixture(scope="module", params=list(FLAVOURS))
def decoded(request):
    """Both flavours: the batched cached decode and each prompt's full-forward reference."""
    cfg, model, params = build(request.param)
    tokens_BxN, logits_BxNxV = Decoder(cfg).run(params, PROMPTS, N_NEW, temperature=0.0, with_logits=True)
    refs = [greedy_by_full_forward(model, params, p, N_NEW) for p in PROMPTS]
    return np.asarray(tokens_BxN), np.asarray(logits_BxNxV), refs


@pytest.mark.slow
def test_cached_greedy_tokens_equal_full_forward_for_batched_prompts_of_different_lengths(decoded):
    tokens_BxN, _, refs = decoded
    for row, (ref_tokens, _) in enumerate(refs):
        assert tokens_BxN[row].tolist() == ref_tokens


def test_cached_logits_within_1e_5_of_full_forward(decoded):
    _, logits_BxNxV, refs = decoded
    for row, (_, ref_logits) in enumerate(refs):
        np.testing.assert_allclose(logits_BxNxV[row], ref_logits, rtol=0, atol=1e-5)


def test_a_short_generation_from_a_long_context_model_uses_a_short_cache_with_the_same_logits():
    cfg = resolve_model(FLAVOURS["gpt2"], vocab_size=64, seq_len=256)
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert cache_slots(cfg, 16, N_NEW) == 64 and cache_slots(cfg, 240, 100) == 256  # rounded up, capped
    prompt = PROMPTS[1]
    tokens_BxN, logits_BxNxV = Decoder(cfg).run(params, [prompt], N_NEW, temperature=0.0, with_logits=True)
    buf = np.zeros((1, cfg.max_seq_len), np.int32)  # the full-context reference, fed the decoded tokens
    buf[0, : len(prompt) + N_NEW] = prompt + np.asarray(tokens_BxN)[0].tolist()
    full_TxV = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, jnp.asarray(buf)))[0]
    np.testing.assert_allclose(logits_BxNxV[0], full_TxV[len(prompt) - 1 : len(prompt) - 1 + N_NEW], rtol=0, atol=1e-5)


def test_generation_stops_at_the_eos_the_checkpoint_declares(tmp_path):
    """A Hugging Face directory whose tokenizer_config.json names as ``eos_token`` a token no default
    name would find (``<stop>`` in a word-level vocabulary) stops there; a generation_config.json whose
    ``eos_token_id`` names the first token generated stops at once."""
    import jaxllm

    cfg, _, params = build("gpt2")
    hf.write(cfg, params, tmp_path)
    prompt = [1, 2, 3]
    ref = Decoder(cfg)(params, [prompt], N_NEW, temperature=0.0)[0]  # no end: all N_NEW tokens
    new = [i for i, t in enumerate(ref) if t not in ref[:i]]  # where each token first appears
    declared, named = ref[new[0]], ref[new[1]]  # this random model repeats itself: [3, 3, 3, 3, 49, ...]
    assert named not in prompt
    vocab = {f"w{i}": i for i in range(cfg.vocab_size) if i != named} | {"<stop>": named}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<stop>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<stop>"])
    HFTokenizer(tok, roles={"eos_token": "<stop>"}).save(tmp_path)
    text = " ".join(f"w{i}" for i in prompt)
    lm = jaxllm.load(tmp_path)
    assert lm.eos_ids == (named,) and lm.generate(text, N_NEW, temperature=0.0) == lm.tokenizer.decode(ref[: new[1]])
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [{declared}, {cfg.vocab_size}]}}')
    lm = jaxllm.load(tmp_path)  # an id outside the vocabulary can never end a generation: dropped
    assert lm.eos_ids == (declared, named) and lm.generate(text, N_NEW, temperature=0.0) == ""


def test_save_hf_declares_the_models_eos_and_config_json_is_read_without_a_generation_config(tmp_path):
    import json

    import jaxllm

    cfg, _, params = build("gpt2")
    hf.write(cfg, params, tmp_path / "plain")  # declares no eos, has no tokenizer
    hf.write(cfg, params, tmp_path / "in")
    (tmp_path / "in" / "generation_config.json").write_text('{"eos_token_id": 7}')
    jaxllm.load(tmp_path / "in").save_hf(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written == {"eos_token_id": [7]} and jaxllm.load(tmp_path / "out").eos_ids == (7,)
    jaxllm.load(tmp_path / "plain").save_hf(tmp_path / "out")  # over it: the earlier export's eos is gone
    assert not (tmp_path / "out" / "generation_config.json").exists() and jaxllm.load(tmp_path / "out").eos_ids == ()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps({**config, "eos_token_id": [9, 8]}))
    assert jaxllm.load(tmp_path / "out").eos_ids == (9, 8)


@pytest.mark.slow
def test_sampling_with_top_k_1_gives_the_greedy_tokens():
    cfg, _, params = build("llama_gqa")
    decoder = Decoder(cfg)
    assert decoder(params, PROMPTS, N_NEW, temperature=1.0, top_k=1, seed=3) == decoder(
        params, PROMPTS, N_NEW, temperature=0.0
    )


def test_top_k_and_top_p_keep_exactly_the_most_likely_tokens():
    logits_1x4 = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25]]))
    kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits_1x4, 1.0, **kw)))[0].tolist()
    assert kept(top_k=2, top_p=1.0) == [False, True, False, True]
    assert kept(top_k=0, top_p=0.7) == [False, True, False, True]  # 0.5 < 0.7 <= 0.5 + 0.25
    assert kept(top_k=0, top_p=0.76) == [False, True, True, True]


@pytest.mark.slow
def test_decoding_under_a_tensor_parallel_mesh_equals_single_device():
    cfg, _, params = build("llama_gqa")
    single, single_logits = Decoder(cfg).run(params, PROMPTS, N_NEW, temperature=0.0, with_logits=True)
    mesh_cfg = MeshConfig(data=1, tensor=2)
    mesh, rules = sharding.make_mesh(mesh_cfg, jax.devices()[:2]), sharding.rules(mesh_cfg)
    model = Transformer(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
        shardings = sharding.logical_shardings(boxed, mesh, rules)
        sharded = jax.device_put(params, shardings)
        assert sharded["blocks"]["attn"]["q"]["kernel"].sharding.spec[2] == "tensor"  # heads really split
        tokens, logits = Decoder(cfg).run(sharded, PROMPTS, N_NEW, temperature=0.0, with_logits=True)
    assert np.asarray(tokens).tolist() == np.asarray(single).tolist()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(single_logits), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- a trained run: API and CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from jaxllm.train.trainer import train

    tmp = tmp_path_factory.mktemp("gen")
    (tmp / "corpus.txt").write_text(corpus_text())
    cfg = load_config(
        None, TINY + [f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}", f"run.dir={tmp / 'run'}"]
    )
    train(cfg, devices=jax.devices()[:1])
    return tmp / "run"


@pytest.mark.slow
def test_loaded_model_generate_equals_greedy_full_forward(run_dir):
    import jaxllm

    lm = jaxllm.load(run_dir)
    prompt = lm.tokenizer.encode("def alpha")
    ref = generate_tokens(
        lambda p, t: lm.module.apply({"params": p}, t), lm.params, prompt, 6, lm.config.model.max_seq_len, 0.0
    )
    assert lm.generate("def alpha", 6, temperature=0.0) == lm.tokenizer.decode(ref)


# The command line in-process: ``main`` returns the exit status that ``python -m jaxllm.generate`` exits with.


@pytest.mark.slow
def test_cli_prints_the_prompt_and_the_same_completion_as_the_api(run_dir, capsys):
    import jaxllm

    expected = jaxllm.load(run_dir, quantize="int8").generate("def ", 8, temperature=0.0)
    status = generate.main(
        [str(run_dir), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0", "--quantize", "int8"]
    )
    assert status == 0
    assert capsys.readouterr().out == "def " + expected + "\n"


def test_cli_max_new_tokens_beyond_context_exits_2_with_one_line(run_dir, capsys):
    assert generate.main([str(run_dir), "--prompt", "def ", "--max-new-tokens", "100"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "context of 16 tokens" in err


def test_cli_unknown_quantization_mode_exits_2_with_one_line(run_dir, capsys):
    assert generate.main([str(run_dir), "--prompt", "def ", "--quantize", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown quantization mode 'int3'" in err


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "tokens, message",
    [
        ([[1, 2, 320]], r"token id 320 is outside the model's vocabulary \[0, 320\)"),
        ([[1, -1, 2]], "token id -1 is outside"),
        ([[1] * 17], "17 tokens exceed the model's context of 16"),
        ([1, 2, 3], r"shape \[batch, positions\]"),
        ([[]], r"shape \[batch, positions\], got shape \(1, 0\)"),
    ],
)
def test_logits_refuse_ids_outside_the_vocabulary_and_rows_beyond_the_context(run_dir, tokens, message):
    """These returned NaN logits (an out-of-range lookup fills, it does not fail)."""
    import jaxllm

    lm = jaxllm.load(run_dir)
    assert lm.config.model.vocab_size == 320 and lm.config.model.max_seq_len == 16
    with pytest.raises(ConfigError, match=message):
        lm.logits(tokens)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be positive"),
    ],
)
def test_generate_refuses_nonsensical_sampling_settings(run_dir, settings, message):
    """top_p=0 and temperature=nan returned NUL characters."""
    import jaxllm

    with pytest.raises(ConfigError, match=message):
        jaxllm.load(run_dir).generate("def ", **{"max_new_tokens": 4, **settings})


def test_decoder_refuses_prompt_ids_outside_the_vocabulary():
    cfg, _, params = build("gpt2")
    with pytest.raises(ConfigError, match=r"token id 64 is outside the model's vocabulary \[0, 64\)"):
        Decoder(cfg)(params, [[1, 64]], 2, temperature=0.0)


def _tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("flipped", [False, True], ids=["unreadable", "flipped_bytes"])
def test_load_falls_back_to_the_previous_checkpoint_when_the_newest_is_corrupt(run_dir, tmp_path, capsys, flipped):
    """Item 8: jaxllm.load read only the newest checkpoint, and printed tensorstore tracebacks."""
    import shutil

    import jaxllm
    from jaxllm.train.trainer import train

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # step 4; step 6 below is the newer one that gets damaged
    cfg = load_config(str(run / "config.yaml"), ["train.steps=6", "checkpoint.every=6", f"run.dir={run}"])
    expected = jax.tree.map(np.asarray, jaxllm.load(run).params)
    train(cfg, devices=jax.devices()[:1])
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "6"]
    files = [p for p in (run / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
    if flipped:  # 64 bytes in the middle of the largest data file: it still restores, to wrong values
        data = max(files, key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
        data.write_bytes(bytes(raw))
    else:
        for f in files:
            f.write_bytes(b"garbage")
    before = _tree_bytes(run)
    capsys.readouterr()
    params = jaxllm.load(run).params
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: checkpoint 6 (") and warning.endswith(f"of {run} is damaged; loaded step 4")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)
    assert _tree_bytes(run) == before  # loading moved, renamed and wrote nothing


def test_cli_without_max_new_tokens_generates_what_the_context_leaves_and_says_so(run_dir, capsys):
    assert generate.main([str(run_dir), "--prompt", "def ", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and err.count("\n") == 1 and "generating 12 new tokens" in err  # 16 - 4


def test_cli_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 0.8)" in out and "(default: 64)" in out and "default: 200" in out
