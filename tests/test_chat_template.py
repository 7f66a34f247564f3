"""Hugging Face tokenizers in fine-tuning: the chat template of a tokenizer_config.json
renders conversations to the very ids transformers' apply_chat_template gives, the loss mask covers the
assistant's tokens only, and the special tokens (bos, eos, pad) are the ones the config names."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxllm.core.errors import DataError
from jaxllm.data import chat, chat_template, tokenizer

transformers = pytest.importorskip(
    "transformers", reason="the reference rendering is transformers' apply_chat_template"
)

SPECIAL = [
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
BLOCKS = """{% for message in messages %}
{% if message['role'] == 'system' %}
sys {{ message['content'] | tojson }}
{% else %}
{{ message['role'] }}: {{ message['content'] }}</s>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
assistant:{% endif %}"""  # trim_blocks / lstrip_blocks decide every newline here
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3, "blocks": BLOCKS}
# What each template's loss mask learns of CHAT: the answers and the template's end of turn
LEARNED = {
    "chatml": "ba<|im_end|>\n5<|im_end|>\n",
    "llama2": " ba </s> 5 </s>",
    "llama3": "ba<|eot_id|>5<|eot_id|>",
    "blocks": " ba</s>\n 5</s>\n",
}
CHAT = [
    {"role": "user", "content": "rev ab"},
    {"role": "assistant", "content": "ba"},
    {"role": "user", "content": "2+3 is what"},
    {"role": "assistant", "content": "5"},
]


def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator(
        ["reverse ab is ba; what is 2+3? the answer is 5, said the assistant to the user"] * 20, trainer
    )
    return tok


@pytest.fixture(scope="module", params=list(TEMPLATES))
def saved(request, tmp_path_factory):
    """``(name, transformers' tokenizer, its directory)`` as transformers saves it, with one template."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe(), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf.chat_template = TEMPLATES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, directory


def hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_a_conversation_encodes_to_transformers_ids(saved):
    _, hf, directory = saved
    tok = chat.chat_tokenizer(tokenizer.load(directory))
    assert tok.vocab_size == len(hf)  # the template's own markers: no jaxllm ones appended
    assert chat.encode(tok, CHAT)[0] == hf_ids(hf, CHAT)


def test_a_prompt_ends_in_transformers_generation_prompt(saved):
    _, hf, directory = saved
    ids, answer = chat.prompt_and_answer(tokenizer.load(directory), CHAT)
    assert ids == hf_ids(hf, CHAT[:3], add_generation_prompt=True) and answer == "5"


def test_the_loss_mask_covers_the_answers_and_their_end_of_turn_only(saved):
    name, _, directory = saved
    tok = tokenizer.load(directory)
    ids, mask = chat.encode(tok, CHAT)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == LEARNED[name]


def test_special_tokens_come_from_tokenizer_config(saved):
    _, hf, directory = saved
    tok = tokenizer.load(directory)
    assert (chat.end_id(tok), chat.pad_id(tok)) == (hf.eos_token_id, hf.pad_token_id)
    rows = chat.pack([chat.shift(*chat.encode(tok, CHAT))], 64, chat.pad_id(tok))
    unused = rows[0, chat.SEGMENTS] == 0
    assert unused.any() and (rows[0, chat.INPUTS][unused] == hf.pad_token_id).all()


def test_a_saved_tokenizer_keeps_its_special_tokens_and_template(saved, tmp_path):
    _, hf, directory = saved
    tokenizer.load(directory).save(tmp_path)
    again = tokenizer.load(tmp_path)
    assert again.roles == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    assert chat.encode(again, CHAT)[0] == hf_ids(hf, CHAT)


def test_without_a_template_a_bos_token_starts_each_conversation_before_the_markers(tmp_path):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe(), bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(tmp_path)
    tok = chat.chat_tokenizer(tokenizer.load(tmp_path))
    ids, mask = chat.encode(tok, CHAT[:2])
    assert ids[0] == hf.bos_token_id and mask[0] == 0
    assert ids[1] == tok.token_id("<|user|>") and chat.end_id(tok) == tok.token_id("<|end|>")


def test_a_template_that_raises_is_one_data_error(tmp_path):
    tok = tokenizer.HFTokenizer(bpe(), roles={"bos_token": "<s>", "eos_token": "</s>"}, chat_template=LLAMA2)
    with pytest.raises(DataError, match="chat template refused a conversation: Conversation roles must alternate"):
        chat.encode(tok, [CHAT[1], CHAT[0]])


def test_a_template_cannot_reach_python_internals():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = tokenizer.HFTokenizer(bpe(), roles={"eos_token": "</s>"}, chat_template=evil)
    with pytest.raises(DataError, match="chat template refused"):
        chat_template.render(tok, CHAT)
