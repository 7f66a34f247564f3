"""The tokenizer side of a Hugging Face export: which ids are bos/eos/pad, and ``tokenizer_config.json``.

``transformers`` reads a tokenizer from three places: ``tokenizer.json`` (the model and its added
tokens, :meth:`jaxllm.data.tokenizer.Tokenizer.save` writes it), ``tokenizer_config.json`` (the
tokenizer class, the special tokens' roles, the chat template) and the model's ``config.json`` /
``generation_config.json`` (the same roles as ids, the ids that end a generation). This module
decides the roles once, from the tokenizer and the model's end-of-sequence ids, so that every file,
and the evaluation harness (:mod:`jaxllm.infer.harness`), names the same tokens:

    eos   the tokenizer's own end token (its ``eos_token``, else ``<|endoftext|>`` and the like),
          else the first end-of-sequence id that is a token of its own
    bos   the tokenizer's ``bos_token`` (jaxllm's tokenizers have none: they add nothing in front)
    pad   the tokenizer's ``pad_token``, else eos (what ``transformers`` pads with otherwise, warning)

A fine-tuned model's chat template is its base's Jinja template, or the jaxllm markers written as
one: ``<|role|>content<|end|>`` per message and ``<|assistant|>`` as the generation prompt, which is
:func:`jaxllm.data.chat.encode`'s rendering, so ``apply_chat_template`` gives the ids sft.py trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jaxllm.core.errors import UserError
from jaxllm.core.fileio import atomic_write
from jaxllm.data import chat
from jaxllm.data import tokenizer as tokenizers
from jaxllm.model import decode

TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # the generic class: tokenizer.json alone, nothing added to inputs


@dataclass(frozen=True)
class Roles:
    """The special tokens' ids (None where the tokenizer has none) and the ids that end a generation."""

    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    stop: tuple[int, ...]

    def config_ids(self) -> dict:
        """The ``*_token_id`` keys of ``config.json``: always all three, so that no default leaks in."""
        return {"bos_token_id": self.bos, "eos_token_id": self.eos, "pad_token_id": self.pad}

    def generation_ids(self) -> dict:
        """The ``*_token_id`` keys of ``generation_config.json`` (those that exist)."""
        ids = {"bos_token_id": self.bos, "eos_token_id": list(self.stop) or None, "pad_token_id": self.pad}
        return {k: v for k, v in ids.items() if v is not None}


def token_text(tok: tokenizers.Tokenizer, i: int | None) -> str | None:
    """The text of token ``i`` if it encodes back to that one token (a special token's name), else None."""
    if i is None:
        return None
    text = tok.decode([i])
    try:
        return text if text and tok.encode(text) == [i] else None
    except UserError:  # a char tokenizer that cannot encode the text
        return None


def _role(tok: tokenizers.Tokenizer, role: str) -> int | None:
    return tok.role_id(role) if isinstance(tok, tokenizers.HFTokenizer) else None


def roles(tok: tokenizers.Tokenizer, eos_ids: tuple[int, ...], vocab_size: int) -> Roles:
    """The roles of ``tok``'s tokens in a model that ends generations at ``eos_ids`` (ids outside
    the model's ``vocab_size`` dropped); a chat model also stops at the end of an answer."""
    own = [i for i in (decode.eos_id(tok), *eos_ids) if token_text(tok, i) is not None]
    eos = own[0] if own else None
    stop = [*eos_ids, *([eos] if eos is not None else [])]
    if not tok.chat_template and all(m in tok.special for m in chat.SPECIAL):
        stop.append(tok.token_id(chat.SPECIAL[-1]))  # <|end|>: where sft.py's answers end
    pad = _role(tok, "pad_token")
    in_vocab = [i for i in dict.fromkeys(stop) if 0 <= i < vocab_size]
    return Roles(_role(tok, "bos_token"), eos, eos if pad is None else pad, _role(tok, "unk_token"), tuple(in_vocab))


def chat_template(tok: tokenizers.Tokenizer) -> str | None:
    """The Jinja chat template of a model fine-tuned with ``tok``: its own, or the jaxllm markers'."""
    if tok.chat_template:
        return tok.chat_template
    if not all(m in tok.special for m in chat.SPECIAL):
        return None
    bos = "{{ bos_token }}" if _role(tok, "bos_token") is not None else ""
    return (
        bos + "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )


def tokenizer_config(tok: tokenizers.Tokenizer, r: Roles, max_len: int) -> dict:
    """``tokenizer_config.json``: the generic fast tokenizer (it adds no bos or eos to inputs, as
    jaxllm adds none), no clean-up of spaces when decoding, the roles as token strings."""
    config: dict = {
        "tokenizer_class": TOKENIZER_CLASS,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    for name, i in (("bos_token", r.bos), ("eos_token", r.eos), ("pad_token", r.pad), ("unk_token", r.unk)):
        if (text := token_text(tok, i)) is not None:
            config[name] = text
    if (template := chat_template(tok)) is not None:
        config["chat_template"] = template
    return config


def write(tok: tokenizers.Tokenizer, r: Roles, directory: Path, max_len: int) -> None:
    """The tokenizer files of an export: ``tokenizer.json`` (+ jaxllm's side file) and ``tokenizer_config.json``."""
    tok.save(directory)
    atomic_write(Path(directory) / tokenizers.CONFIG, json.dumps(tokenizer_config(tok, r, max_len), indent=2))
