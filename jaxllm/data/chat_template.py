"""Hugging Face chat templates: the Jinja ``chat_template`` of a tokenizer rendered as ``transformers``'
``apply_chat_template`` renders it, and the loss mask of a rendered conversation.

Rendering: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the template's
helpers (``raise_exception``, ``tojson``, ``strftime_now``), ``messages``, ``add_generation_prompt``
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables; the text is then
tokenized whole with special tokens recognised and none added. Templates come with downloaded models
and are untrusted: the sandbox (Jinja >= 3.1.6) keeps them from reaching Python's internals.

Mask: an assistant message's characters are what rendering the conversation up to and including it
adds to rendering the conversation before it with the generation prompt (``<|im_start|>assistant\\n``,
``[/INST]``, ...): its content and the template's end of turn, which the model must learn to emit;
the generation prompt belongs to the prompt. A token is learned when it starts inside such a span.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxllm.core.errors import DataError
from jaxllm.data.tokenizer import HFTokenizer

Chat = list[dict[str, str]]


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the tokenizer's chat template does not parse (line {e.lineno}: {e.message})") from None


def render(tok: HFTokenizer, messages: Chat, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` in ``tok``'s chat template (``transformers``' ``apply_chat_template``,
    ``tokenize=False``)."""
    try:
        return _compiled(tok.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tok.roles
        )
    except jinja2.exceptions.TemplateError as e:
        raise DataError(
            f"the tokenizer's chat template refused a conversation: {' '.join(str(e).split())[:200]}"
        ) from None


def assistant_spans(tok: HFTokenizer, messages: Chat) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` characters of each assistant message."""
    text, spans = render(tok, messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(tok, messages[:i], add_generation_prompt=True), render(tok, messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                f"the chat template renders message {i} differently once the conversation goes on, so the "
                "assistant's tokens cannot be told apart; use the jaxllm markers (a tokenizer without one)"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode(tok: HFTokenizer, messages: Chat) -> tuple[list[int], list[int]]:
    """Token ids of a conversation in ``tok``'s template, and its loss mask (1 = an assistant token)."""
    text, spans = assistant_spans(tok, messages)
    ids, offsets = tok.encode_offsets(text)
    return ids, [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]


def prompt(tok: HFTokenizer, messages: Chat) -> list[int]:
    """Token ids of ``messages`` followed by the template's generation prompt."""
    return tok.encode_offsets(render(tok, messages, add_generation_prompt=True))[0]
