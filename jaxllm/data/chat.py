"""Instruction and chat data: the chat template, loss masks, JSONL records, and packing.

Template: every message is ``<|role|>content<|end|>``, roles ``system``, ``user``, ``assistant``. The
four markers are special tokens appended to the tokenizer (:data:`SPECIAL`), and message content is
encoded without recognising them (``Tokenizer.encode_ordinary``), so no content can forge them.
A prompt for generation ends with ``<|assistant|>``; the model answers and closes with ``<|end|>``.

Loss mask: 1 on the assistant's content and its closing ``<|end|>`` (the model must learn to stop),
0 on everything else, including the ``<|assistant|>`` marker, which is part of the prompt. A tokenizer
with a ``bos_token`` starts every conversation with it (masked).

A Hugging Face tokenizer with a chat template uses that template instead of the markers, as the model
was trained (:mod:`jaxllm.data.chat_template`): the same mask, the template's end of turn in place of
``<|end|>``, its ``eos_token`` ending generation. Packing fills unused positions with its ``pad_token``.

Packing: examples are laid end to end in rows of ``seq_len`` positions. A packed batch is one int32
array ``[B, 5, T]`` whose rows are ``inputs, targets, loss mask, positions, segment ids``: positions
restart at 0 for every example, and segment ids (1, 2, ... per example, 0 for padding) keep attention
inside each example, so a packed example sees exactly what it would see alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxllm.core.errors import DataError
from jaxllm.core.fileio import read_jsonl_numbered
from jaxllm.data import chat_template
from jaxllm.data.tokenizer import HFTokenizer, Tokenizer

SPECIAL = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLES = ("system", "user", "assistant")
INPUTS, TARGETS, MASK, POSITIONS, SEGMENTS = range(5)
MAX_RECORD = 1 << 20  # characters of one JSONL record: far more than any training sequence holds

Chat = list[dict[str, str]]


def chat_tokenizer(tok: Tokenizer) -> Tokenizer:
    """``tok`` able to write chats: its own template if it has one, else with the jaxllm markers."""
    return tok if tok.chat_template else tok.with_special(SPECIAL)


def _role_id(tok: Tokenizer, role: str) -> int | None:
    return tok.role_id(role) if isinstance(tok, HFTokenizer) else None


def end_id(tok: Tokenizer) -> int:
    """The token that ends an answer: the template's ``eos_token``, or ``<|end|>``."""
    eos = _role_id(tok, "eos_token") if tok.chat_template else None
    if tok.chat_template and eos is None:
        raise DataError(
            "the tokenizer has a chat template but no eos_token in its tokenizer_config.json to end answers"
        )
    return tok.token_id("<|end|>") if eos is None else eos


def pad_id(tok: Tokenizer) -> int:
    pad = _role_id(tok, "pad_token")
    return 0 if pad is None else pad


def _marker(tok: Tokenizer, role: str) -> int:
    return tok.token_id(f"<|{role}|>")


def encode(tok: Tokenizer, messages: Chat) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (1 = an assistant token to learn)."""
    if tok.chat_template:
        return chat_template.encode(tok, messages)
    bos = _role_id(tok, "bos_token")
    ids, mask = ([bos], [0]) if bos is not None else ([], [])
    end = tok.token_id("<|end|>")
    for m in messages:
        content = tok.encode_ordinary(m["content"]) + [end]  # markers in the content stay text
        learn = int(m["role"] == "assistant")
        ids += [_marker(tok, m["role"])] + content
        mask += [0] + [learn] * len(content)
    return ids, mask


def prompt_and_answer(tok: Tokenizer, messages: Chat) -> tuple[list[int], str]:
    """Everything before the last assistant message, then ``<|assistant|>``; and that message's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if tok.chat_template:
        return chat_template.prompt(tok, messages[:last]), messages[last]["content"]
    ids, _ = encode(tok, messages[:last])
    return ids + [_marker(tok, "assistant")], messages[last]["content"]


# --------------------------------------------------------------------------- JSONL records


def record_to_chat(record: object, where: str) -> Chat:
    """An Alpaca record (``instruction``, optional ``input``, ``output``) or a chat (``messages``)."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise DataError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message to learn from")
        return messages
    if (
        isinstance(record, dict)
        and isinstance(record.get("instruction"), str)
        and isinstance(record.get("output"), str)
    ):
        user = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise DataError(f"{where}: a record needs 'instruction' and 'output' (Alpaca form) or 'messages' (chat form)")


def read_jsonl(path: str | Path) -> list[Chat]:
    """The records of an ``sft.data`` file, each line at most :data:`MAX_RECORD` characters."""
    numbered = read_jsonl_numbered(path, "sft.data file", max_line=MAX_RECORD)
    chats = [record_to_chat(record, f"{path}:{n}") for n, record in numbered]
    if not chats:
        raise DataError(f"{path} holds no records")
    return chats


# --------------------------------------------------------------------------- packing


def shift(ids: list[int], mask: list[int], prefix: int = 0) -> np.ndarray:
    """One example as next-token rows ``[5, n-1]`` (segment row left 1). ``prefix`` placeholder
    positions come first (prompt tuning's virtual tokens: positions 0..prefix-1, token id 0)."""
    ids, mask = [0] * prefix + list(ids), [0] * prefix + list(mask)
    n = len(ids) - 1
    return np.stack([ids[:-1], ids[1:], mask[1:], np.arange(n), np.ones(n, int)]).astype(np.int32)


def pack(examples: list[np.ndarray], seq_len: int, pad: int = 0) -> np.ndarray:
    """Examples from :func:`shift` laid end to end, in order, into ``[R, 5, seq_len]``; the inputs and
    targets of unused positions are ``pad``.

    An example longer than ``seq_len`` is cut to its first ``seq_len`` positions."""
    rows: list[list[np.ndarray]] = []
    free: list[int] = []
    for ex in examples:
        ex = ex[:, :seq_len]
        n = ex.shape[1]
        # first fit among the last few rows only: linear time, and rows fill nearly as well
        slot = next((i for i in range(max(len(free) - 8, 0), len(free)) if free[i] >= n), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        ex = ex.copy()
        ex[SEGMENTS] = len(rows[slot]) + 1
        rows[slot].append(ex)
        free[slot] -= n
    out = np.zeros((len(rows), 5, seq_len), np.int32)
    out[:, [INPUTS, TARGETS]] = pad
    for r, parts in enumerate(rows):
        row = np.concatenate(parts, axis=1)
        out[r, :, : row.shape[1]] = row
    return out
