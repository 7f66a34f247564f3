"""A Hugging Face export that transformers loads as jaxllm runs it: for gpt2 and llama models with byte,
char and bpe tokenizers (and a mixtral with bpe), AutoTokenizer encodes every string to jaxllm's ids,
greedy generate gives jaxllm's greedy text without a warning about token ids, and a fine-tuned model's
chat template (jaxllm's markers or a Hub tokenizer's own) renders sft.py's ids."""

from __future__ import annotations

import json
import random
import warnings

import jax
import numpy as np
import pytest

from jaxllm.core.config import Config, ModelConfig, MoEConfig
from jaxllm.core.errors import ConfigError
from jaxllm.data import chat
from jaxllm.data import tokenizer as tokenizers

torch = pytest.importorskip("torch", reason="the export tests load the export in transformers (torch)")
transformers = pytest.importorskip("transformers", reason="the export tests load the export in transformers")

CORPUS = "The quick brown fox, the 日本語 and é — jumps! <|>\n\tover 12 lazy dogs; ünïcode 🙂 ok?\n" * 20
PIECES = ["the", " fox", "日本語", "é", "🙂", "ü", "\n", "\t", "   ", "  \n ", "<|endoftext|>", "<|user|>", "<|end|>"]
PIECES += ["<|", "|>", "<|assistant|", "12", "!", ";", "?", "—", "lazy dogs", " ", "\n\n\n"]


def strings(count: int = 200) -> list[str]:
    """Empty, whitespace runs, Unicode, special tokens and their fragments typed as text, mixed."""
    rng = random.Random(0)
    return ["", " ", "   ", "\n\t "] + ["".join(rng.choices(PIECES, k=rng.randint(1, 8))) for _ in range(count - 4)]


def tokenizer(kind: str) -> tokenizers.Tokenizer:
    return chat.chat_tokenizer(tokenizers.build(kind, [CORPUS], 320))


def model_config(arch: str, vocab: int) -> ModelConfig:
    """A tiny model of ``arch``: gpt2, llama, or mixtral (llama with 4 top-2 experts per block)."""
    return ModelConfig(
        arch="gpt2" if arch == "gpt2" else "llama", n_layer=2, d_model=32, n_head=4,
        n_kv_head=4 if arch == "gpt2" else 2, d_ff=64, vocab_size=-(-vocab // 64) * 64, max_seq_len=48,
        tie_embeddings=arch == "gpt2", moe=MoEConfig(n_experts=4 if arch == "mixtral" else 0),
    )  # fmt: skip


def random_model(arch: str, tok: tokenizers.Tokenizer):
    import flax.linen as nn

    from jaxllm.infer.api import LoadedModel
    from jaxllm.model.transformer import Transformer

    m = model_config(arch, tok.vocab_size)
    params = nn.unbox(Transformer(m).init(jax.random.PRNGKey(1), np.zeros((1, 8), np.int32))["params"])
    params = jax.tree.map(lambda x: x * 4, params)  # sharper logits: greedy choices far from ties
    if m.moe.n_experts:  # a decisive router: near-ties would let rounding pick the experts
        router = params["blocks"]["mlp"]["router"]
        router["kernel"] = router["kernel"] * 50
    return LoadedModel(Config(model=m), params, tok)


CASES = [(arch, kind) for arch in ("gpt2", "llama") for kind in ("byte", "char", "bpe")] + [("mixtral", "bpe")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{(arch, kind): (jaxllm model, export directory)}``."""
    out = {}
    for arch, kind in CASES:
        model = random_model(arch, tokenizer(kind))
        directory = tmp_path_factory.mktemp(f"{arch}_{kind}")
        model.save_hf(directory)
        out[arch, kind] = model, directory
    return out


@pytest.mark.parametrize("arch, kind", CASES)
def test_auto_tokenizer_encodes_every_string_to_jaxllm_ids(exported, arch, kind):
    model, directory = exported[arch, kind]
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for text in strings():
        if kind == "char":
            text = "".join(ch for ch in text if ch in model.tokenizer.chars or ch in "<|>")  # its alphabet
        assert hf.encode(text) == model.tokenizer.encode(text), repr(text)
        ids = model.tokenizer.encode(text)
        assert hf.decode(ids) == model.tokenizer.decode(ids), repr(text)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_ids_of_padded_embedding_rows_decode_as_transformers_decodes_them(exported, kind):
    model, directory = exported["llama", kind]
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    ids = model.tokenizer.encode("日本語 é🙂<|end|>ü")
    padded = model.config.model.vocab_size - 1  # a row past the last token
    assert padded >= model.tokenizer.vocab_size
    for cut in range(len(ids) + 1):
        with_pad = [*ids[:cut], padded, *ids[cut:]]
        assert model.tokenizer.decode(with_pad) == hf.decode(with_pad) == model.tokenizer.decode(ids)


@pytest.mark.parametrize("arch, kind", CASES)
def test_greedy_generate_gives_jaxllm_greedy_text_without_a_token_id_warning(exported, arch, kind, capfd):
    model, directory = exported[arch, kind]
    transformers.logging.set_verbosity_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
        for prompt in ("the fox", "日本語\n", "<|user|>12 lazy"):
            ours = model.generate(prompt, max_new_tokens=16, temperature=0.0)
            enc = hf_tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = hf_model.generate(**enc, do_sample=False, max_new_tokens=16)[0, enc["input_ids"].shape[1] :]
            new = out.tolist()
            stop = next((i for i, t in enumerate(new) if t in model.eos_ids), len(new))
            assert hf_tok.decode(new[:stop]) == ours, prompt
    shown = [str(w.message) for w in caught] + [capfd.readouterr().err]
    assert not any("token_id" in s or "token id" in s for s in shown), shown


@pytest.mark.parametrize("arch, kind", CASES)
def test_config_token_ids_are_the_model_own_and_in_the_vocabulary(exported, arch, kind):
    model, directory = exported[arch, kind]
    config = json.loads((directory / "config.json").read_text())
    eod = model.tokenizer.eod_id
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, eod, eod)
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eod, model.tokenizer.token_id("<|end|>")]
    assert all(0 <= i < config["vocab_size"] for i in generation["eos_token_id"])


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "the fox?"},
    {"role": "assistant", "content": "jumps 日本語"},
    {"role": "user", "content": "and\n\tthe dogs"},
]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_a_fine_tuned_model_chat_template_renders_sft_ids(exported, kind):
    model, directory = exported["gpt2", kind]
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    ids, _ = chat.encode(model.tokenizer, CHAT[:3])
    assert _ids(hf.apply_chat_template(CHAT[:3], tokenize=True)) == ids
    prompt, _ = chat.prompt_and_answer(model.tokenizer, CHAT[:3])
    assert _ids(hf.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)) == prompt


def test_a_hub_tokenizer_chat_template_is_exported_as_it_came(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(60)} | {"<s>": 60, "</s>": 61}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = {"eos_token": "</s>", "bos_token": "<s>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    model = random_model("llama", tokenizers.load(tmp_path))
    model.save_hf(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (written["chat_template"], written["eos_token"], written["bos_token"]) == (template, "</s>", "<s>")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["bos_token_id"] == 60


def test_a_hub_tokenizer_chat_template_renders_sft_ids_after_export(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hub = Tokenizer(models.BPE())
    hub.pre_tokenizer, hub.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hub.train_from_iterator([CORPUS], trainer)
    hub.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    model = random_model("llama", tokenizers.load(tmp_path))
    model.save_hf(tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids, _ = chat.encode(model.tokenizer, CHAT[:3])
    assert _ids(hf.apply_chat_template(CHAT[:3], tokenize=True)) == ids
    prompt, _ = chat.prompt_and_answer(model.tokenizer, CHAT[:3])
    assert _ids(hf.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)) == prompt


def test_the_export_loads_back_into_jaxllm_with_the_same_tokenizer(exported):
    import jaxllm

    model, directory = exported["llama", "bpe"]
    again = jaxllm.load(directory)
    assert again.tokenizer.special == model.tokenizer.special and again.tokenizer.chat_template is None
    assert again.tokenizer.encode(CORPUS) == model.tokenizer.encode(CORPUS)


def test_save_hf_onto_a_file_is_refused_and_leaves_it(exported, tmp_path):
    model, _ = exported["gpt2", "byte"]
    target = tmp_path / "model"
    target.write_text("keep me")
    with pytest.raises(ConfigError, match="is a file"):
        model.save_hf(target)
    assert target.read_text() == "keep me"
