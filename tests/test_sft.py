"""Fine-tuning: loss masks, packing, and what each method trains (tiny models, in process)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from equality import rel

from jaxllm.core.config import ModelConfig, OptimConfig, SFTConfig, load_config, resolve_model
from jaxllm.core.errors import ConfigError
from jaxllm.data import chat
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.tokenizer import ByteTokenizer, HFTokenizer
from jaxllm.hf import convert as hf
from jaxllm.model.transformer import Transformer
from jaxllm.parallel import sharding
from jaxllm.sft import finetune as sft
from jaxllm.sft import peft, sft_loss
from jaxllm.train.optim import optimizer
from jaxllm.train.train_step import TrainState, make_train_step

TOK = chat.chat_tokenizer(ByteTokenizer())
SEQ = 32
CHATS = [  # 11 + 19 positions share the first row of 32; the third starts a second row
    [{"role": "user", "content": "rev ab"}, {"role": "assistant", "content": "ba"}],
    [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "2+3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
    ],
    [{"role": "user", "content": "up hi"}, {"role": "assistant", "content": "HI"}],
]


BASE_VOCAB = ByteTokenizer().vocab_size  # the chat markers are new rows beyond it


def tiny(arch: str = "gpt2", **kw) -> tuple[Transformer, dict]:
    """A model over the chat vocabulary whose params hold the markers' rows apart, as sft.prepare does."""
    cfg = resolve_model(
        ModelConfig(
            arch=arch,
            n_layer=2,
            d_model=32,
            n_head=4,
            n_kv_head=2 if arch == "llama" else 0,
            vocab_size=TOK.vocab_size,
            **kw,
        ),
        TOK.vocab_size,
        2 * SEQ,
    )
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    base = {**params, "wte": {"embedding": params["wte"]["embedding"][:BASE_VOCAB]}}
    if "lm_head" in params:
        base["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :BASE_VOCAB]}
    return model, peft.new_tokens_init(base, TOK.vocab_size)


def batch(prefix: int = 0) -> jax.Array:
    return jnp.asarray(chat.pack([chat.shift(*chat.encode(TOK, c), prefix=prefix) for c in CHATS], SEQ))


def test_loss_mask_covers_exactly_the_assistant_tokens():
    ids, mask = chat.encode(TOK, CHATS[1])
    learned = [i for i, m in zip(ids, mask) if m]
    end = TOK.token_id("<|end|>")
    assert learned == TOK.encode("5") + [end] + TOK.encode("2") + [end]
    assert (
        TOK.decode([i for i, m in zip(ids, mask) if not m])
        == "<|system|>hi<|end|><|user|>2+3<|end|><|assistant|><|user|>1+1<|end|><|assistant|>"
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.slow
def test_packed_batch_gives_the_same_per_example_losses_as_unpacked(arch):
    model, params = tiny(arch)
    packed = batch()
    assert packed.shape[0] == 2 and int(packed[0, chat.SEGMENTS].max()) == 2
    nll = np.asarray(sft_loss.per_token_nll(model, params, packed))
    segments = np.asarray(packed[:, chat.SEGMENTS])
    where = [(0, 1), (0, 2), (1, 1)]  # (row, segment) of each example, in order
    for (row, seg), c in zip(where, CHATS):
        alone = jnp.asarray(chat.pack([chat.shift(*chat.encode(TOK, c))], SEQ))
        n = int((alone[0, chat.SEGMENTS] > 0).sum())
        expected = np.asarray(sft_loss.per_token_nll(model, params, alone))[0, :n]
        np.testing.assert_allclose(nll[row][segments[row] == seg], expected, rtol=1e-5, atol=1e-6)


def train_steps(model, params, method: str, lora_scale: float = 0.0, steps: int = 3) -> dict:
    mask = peft.trainable_mask(params, method)
    tx = peft.masked(optimizer(OptimConfig(lr=1e-2, warmup_steps=0), steps), mask)
    step = jax.jit(make_train_step(sft.make_loss_fn(model, mask, lora_scale), tx, optax.constant_schedule(1e-2)))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))
    data = batch(prefix=4 if method == "prompt" else 0)[None]
    for _ in range(steps):
        state, _ = step(state, data)
    return state.params


def assert_only_trainable_changed(before: dict, after: dict, method: str) -> None:
    mask = peft.trainable_mask(before, method)
    assert mask["new_tokens"]["embedding"]  # the chat markers' rows train under every method
    flat_b, flat_a, flat_m = (jax.tree_util.tree_leaves_with_path(t) for t in (before, after, mask))
    for (path, b), (_, a), (_, m) in zip(flat_b, flat_a, flat_m):
        if m:
            assert not np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(
                path
            )  # LoRA's A too, once B moved
        else:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)


def logits(model, params, scale=0.0):
    tokens = batch()[:, chat.INPUTS]
    positions = batch()[:, chat.POSITIONS]
    return np.asarray(sft_loss.forward(model, params, scale, tokens, positions))


def with_lora(params):
    return peft.lora_init(params, ["q", "v", "o", "down"], 4, jax.random.PRNGKey(2))


def test_lora_with_zero_b_leaves_the_logits_unchanged():
    model, params = tiny()
    np.testing.assert_array_equal(logits(model, with_lora(params), 2.0), logits(model, params))


@pytest.mark.slow
def test_lora_trains_only_its_own_parameters():
    model, params = tiny()
    start = with_lora(params)
    assert_only_trainable_changed(start, train_steps(model, start, "lora", 2.0), "lora")


def test_lora_merges_into_plain_weights_with_the_same_logits():
    model, params = tiny()
    trained = train_steps(model, with_lora(params), "lora", 2.0)
    merged = peft.model_params(trained, 2.0)
    assert jax.tree.structure(merged) == jax.tree.structure(peft.model_params(params, 0.0))
    assert "new_tokens" not in merged and merged["wte"]["embedding"].shape[0] == TOK.vocab_size
    plain = np.asarray(model.apply({"params": merged}, batch()[:, chat.INPUTS], batch()[:, chat.POSITIONS]))
    np.testing.assert_allclose(plain, logits(model, trained, 2.0), rtol=0, atol=1e-6)
    assert not np.allclose(plain, logits(model, params), atol=1e-4)  # the update did something


@pytest.mark.slow
def test_prompt_tuning_trains_only_the_virtual_tokens():
    model, params = tiny(prompt_tokens=4)
    start = peft.prompt_init(params, 4, jax.random.PRNGKey(3))
    assert_only_trainable_changed(start, train_steps(model, start, "prompt"), "prompt")


@pytest.mark.slow
def test_adapters_start_as_the_identity_and_train_only_themselves():
    model, params = tiny(adapter_dim=8)
    base_model, base = tiny()
    np.testing.assert_allclose(logits(model, params), logits(base_model, base), rtol=0, atol=1e-6)
    assert_only_trainable_changed(params, train_steps(model, params, "adapter"), "adapter")


def test_adapter_init_draws_the_models_own_adapters_and_nothing_else():
    """What sft.method=adapter adds to a base without adapters: the very leaves a fresh adapter model
    draws (its init, jitted whole), and no other leaf."""
    model, _ = tiny(adapter_dim=8)
    key = jax.random.PRNGKey(3)
    whole = jax.jit(lambda: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])["blocks"])()
    adapters = peft.adapter_init(model.cfg, key)
    assert sorted(adapters) == ["adapter_attn", "adapter_mlp"]
    for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves({k: whole[k] for k in adapters}), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unknown_lora_target_is_refused():
    _, params = tiny()
    with pytest.raises(ConfigError, match="'gate' does not exist in this gpt2 model"):
        peft.parse_targets("q,gate", params, "gpt2")


@pytest.mark.parametrize("tie", [True, False])  # untied: the output layer grows columns too
def test_new_token_rows_start_at_the_mean_and_append_to_the_base_table(tie):
    _, params = tiny(tie_embeddings=tie)
    assert ("lm_head" in params) == (not tie)
    plain = peft.model_params(params, 0.0)
    base_VxD = params["wte"]["embedding"]
    np.testing.assert_array_equal(plain["wte"]["embedding"][:BASE_VOCAB], base_VxD)
    np.testing.assert_allclose(
        plain["wte"]["embedding"][BASE_VOCAB:], np.stack([base_VxD.mean(0)] * len(chat.SPECIAL)), rtol=1e-6
    )
    if "lm_head" in params:
        w_DxV = params["lm_head"]["kernel"]
        np.testing.assert_array_equal(plain["lm_head"]["kernel"][:, :BASE_VOCAB], w_DxV)
        np.testing.assert_allclose(
            plain["lm_head"]["kernel"][:, BASE_VOCAB:], np.stack([w_DxV.mean(1)] * len(chat.SPECIAL), 1), rtol=1e-6
        )


def test_greedy_answers_equal_a_full_forward_argmax_decode_with_a_learned_prompt():
    model, params = tiny(prompt_tokens=4)
    params = peft.prompt_init(params, 4, jax.random.PRNGKey(3))
    end, n_new = TOK.token_id("<|end|>"), 6
    prompts = [[sft.PLACEHOLDER] * 4 + TOK.encode(text) for text in ("rev ab", "2+3 is what")]
    answers = sft.make_greedy(model.cfg, 0.0, n_new, end)(params, prompts)
    # No cache: the whole (right-padded, so causally unaffected) sequence again for every token.
    full = jax.jit(lambda p, t_1xS: sft_loss.forward(model, p, 0.0, t_1xS, jnp.arange(SEQ)[None]))
    for prompt, answer in zip(prompts, answers):
        tokens, expected = list(prompt), []
        for _ in range(n_new):
            logits = full(params, jnp.asarray([tokens + [0] * (SEQ - len(tokens))]))
            token = int(jnp.argmax(logits[0, len(tokens) - 1]))
            if token == end:
                break
            expected.append(token)
            tokens.append(token)
        assert answer == expected


# --------------------------------------------------------------------------- a Hugging Face base on a mesh


def write_hf_base(directory, tok):
    """A random tiny LLaMA over ``tok``'s vocabulary as a Hugging Face directory (several safetensors
    files and an index) with ``tok`` beside it: what `sft.py init.from=HF_DIR` starts from."""
    m = resolve_model(
        ModelConfig(arch="llama", n_layer=2, d_model=32, n_head=4, n_kv_head=2, tie_embeddings=False),
        tok.vocab_size,
        96,
    )
    params = nn.unbox(Transformer(m).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    hf.write(m, params, directory, max_shard_bytes=40_000)
    tok.save(directory)
    return directory


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return write_hf_base(tmp_path_factory.mktemp("hf_base"), ByteTokenizer())


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_chat_base(tmp_path_factory):
    """The same with a BPE tokenizer whose tokenizer_config.json names its special tokens and a chat template."""
    tok = HFTokenizer.train(["rev ab is ba; 2+3 is 5; the user asks, the assistant answers"] * 20, 300)
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    tok = HFTokenizer(tok.tok, roles={"eos_token": "<|im_end|>", "pad_token": "<pad>"}, chat_template=CHATML)
    return write_hf_base(tmp_path_factory.mktemp("hf_chat_base"), tok)


def sft_cfg(directory, *overrides: str):
    return load_config(
        None,
        [
            f"init.from={directory}",
            "sft.n_train=2",
            "sft.n_eval=1",
            "train.seq_len=32",
            "train.batch_size=8",
            "train.steps=2",
            "optim.warmup_steps=0",
            *overrides,
        ],
        cls=SFTConfig,
    )


def two_steps(cfg, p: sft.Prepared) -> tuple[list[float], dict]:
    """The losses of two steps (the first, and the one after an update) and the parameters after them."""
    job = sft.build(cfg, p)
    state, order, losses = job.init(), sft.batch_order(len(p.rows), cfg.train), []
    with job.context():
        for step in range(2):
            state, metrics = job.step(state, sft.batch_at(p.rows, order, job.batch_sharding, step))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param(["mesh.data=1", "mesh.fsdp=8"], id="fsdp"),
        pytest.param(
            ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "optim.shard_state=true"], id="fsdp_tensor_zero1_lora"
        ),
    ],
)
def test_hf_base_streams_into_the_mesh_and_fine_tunes_as_on_one_device(hf_base, mesh):
    assert (hf_base / "model.safetensors.index.json").is_file()
    method = ["sft.method=lora"] if "optim.shard_state=true" in mesh else []  # a masked optimizer under ZeRO-1
    one_cfg, cfg = sft_cfg(hf_base, "mesh.data=1", *method), sft_cfg(hf_base, *mesh, *method)
    p = sft.prepare(cfg, jax.devices())
    up = p.params["blocks"]["mlp"]["up"]["kernel"]  # [L, D, F]: D over fsdp, F over tensor, as pre-training
    assert (
        up.sharding.spec
        == sharding.logical_shardings(nn.Partitioned(up, ("layers", "embed", "mlp")), p.mesh, p.rules).spec
    )
    assert all(s.data.size < up.size for s in up.addressable_shards)  # no device holds the whole parameter
    one_losses, one_params = two_steps(one_cfg, sft.prepare(one_cfg, jax.devices()[:1]))
    losses, params = two_steps(cfg, p)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)  # the first loss and the one after an update
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(one_params)):
        assert rel(got, want) <= 1e-5, jax.tree_util.keystr(path)  # the trained leaves updated alike


def moment_shardings(job: sft.Job) -> dict:
    """``{parameter path: sharding}`` of Adam's first moment in a fine-tuning job's optimizer state."""
    found = {}
    for path, s in jax.tree_util.tree_leaves_with_path(job.state_shardings.opt_state):
        name = jax.tree_util.keystr(path)
        if ".mu[" in name:
            found[name.split(".mu", 1)[1]] = s
    return found


def test_optimizer_state_is_sharded_like_the_trainable_parameters_and_split_by_zero1(hf_base):
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "sft.method=lora"]
    cfg, zero1_cfg = sft_cfg(hf_base, *mesh), sft_cfg(hf_base, *mesh, "optim.shard_state=true")
    lora = sft.prepare(cfg, jax.devices())
    param_sh = {jax.tree_util.keystr(k): s for k, s in jax.tree_util.tree_leaves_with_path(lora.shardings)}
    trained = {jax.tree_util.keystr(k) for k, m in jax.tree_util.tree_leaves_with_path(lora.mask) if m}
    assert set(moment_shardings(sft.build(cfg, lora))) == trained < set(param_sh)  # frozen weights hold no state
    full = dataclasses.replace(lora, mask=jax.tree.map(lambda _: True, lora.mask))  # every leaf trains
    assert moment_shardings(sft.build(cfg, full)) == param_sh
    split = moment_shardings(sft.build(zero1_cfg, full))
    L, D, F = lora.params["blocks"]["mlp"]["up"]["kernel"].shape
    # the up kernel's moment: D over fsdp and F over tensor as its parameter, and L over data (ZeRO-1)
    assert split["['blocks']['mlp']['up']['kernel']"].shard_shape((L, D, F)) == (L // 2, D // 2, F // 2)
    # LoRA's A [L, D, r] is replicated as a parameter; its moment is split over data x fsdp
    assert split["['blocks']['attn']['q']['lora_a']"].shard_shape((L, D, 8)) == (L, D // 4, 8)


def test_compute_options_apply_to_a_hf_base_and_its_weights_stay_float32(hf_base):
    p = sft.prepare(
        sft_cfg(hf_base, "model.dtype=bfloat16", "model.remat=full", "model.n_layer=2", "mesh.data=1"),
        jax.devices()[:1],
    )
    assert (p.model_cfg.dtype, p.model_cfg.remat, p.model_cfg.n_layer) == ("bfloat16", "full", 2)
    assert {x.dtype for x in jax.tree.leaves(p.params)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("override", ["model.n_layer=3", "model.d_model=64", "model.n_kv_head=4"])
def test_a_model_override_that_changes_the_hf_base_shape_is_refused(hf_base, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* would change init.from's model"):
        sft.prepare(sft_cfg(hf_base, override, "mesh.data=1"), jax.devices()[:1])


def test_a_hf_base_with_a_chat_template_fine_tunes_on_its_template_and_special_tokens(hf_chat_base):
    p = sft.prepare(sft_cfg(hf_chat_base, "mesh.data=1"), jax.devices()[:1])
    tok = p.tokenizer
    no_markers_added = p.model_cfg.vocab_size == p.base_config.model.vocab_size and "new_tokens" not in p.params
    assert no_markers_added and tok.vocab_size <= p.model_cfg.vocab_size
    first = chat.encode(tok, sft.load_data(sft_cfg(hf_chat_base), tok)[0][0])[0]
    assert tok.decode(first).startswith("<|im_start|>user\n") and p.rows[0, chat.INPUTS, 0] == first[0]
    unused = p.rows[:, chat.SEGMENTS] == 0
    assert (p.rows[:, chat.INPUTS][unused] == tok.role_id("pad_token")).all()
    assert all(tok.decode(q).endswith("<|im_end|>\n<|im_start|>assistant\n") for q in p.eval_set.prompts)
    assert chat.end_id(tok) == tok.role_id("eos_token")


def test_a_hf_base_without_a_tokenizer_is_refused_in_one_line(hf_base, tmp_path):
    import shutil

    bare = shutil.copytree(hf_base, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*.json"))
    with pytest.raises(ConfigError, match="has no tokenizer.json: fine-tuning on text needs the model's tokenizer"):
        sft.prepare(sft_cfg(bare, "mesh.data=1"), jax.devices()[:1])


def test_chat_markers_beyond_the_base_tokenizer_are_new_rows_even_where_the_table_has_padding(tmp_path):
    base_tok = tokenizers.build("byte", [], 0)  # 257 tokens: the table is padded to 320 rows
    base = write_hf_base(tmp_path, base_tok)
    p = sft.prepare(sft_cfg(base, "mesh.data=1", "sft.method=lora"), jax.devices()[:1])
    base_rows = base_tok.vocab_size
    assert p.base_config.model.vocab_size > p.tokenizer.vocab_size > base_rows  # the markers fit the padding
    new = p.params["new_tokens"]["embedding"]
    assert p.model_cfg.vocab_size == p.tokenizer.vocab_size and new.shape[0] == p.tokenizer.vocab_size - base_rows
    assert p.params["wte"]["embedding"].shape[0] == base_rows
    np.testing.assert_allclose(new, np.broadcast_to(p.params["wte"]["embedding"].mean(0), new.shape), rtol=1e-6)
    assert peft.trainable_mask(p.params, "lora")["new_tokens"]["embedding"]
