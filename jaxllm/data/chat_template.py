"""Hugging Face chat templates: the Jinja ``chat_template`` of a tokenizer rendered as ``transformers``'
``apply_chat_template`` renders it, and the loss mask of a rendered conversation.

Rendering: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the template's
helpers (``raise_exception``, ``tojson``, ``strftime_now``), ``messages``, ``add_generation_prompt``
and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables; the text is then
tokenized whole with special tokens recognised and none added. Templates come with downloaded models
and are untrusted: the sandbox (Jinja >= 3.1.6) keeps them from reaching Python's internals, and
each render is bounded: :data:`RENDER_SECONDS` of time (a trace of the template's own lines),
:data:`MAX_OUTPUT` characters, no number above :data:`MAX_NUMBER` passed to ``*``, ``**`` or a
function (``'x' * 10**12`` would fill memory before any check could run), and Python's recursion
limit for recursive macros; each overrun is a one-line DataError.

Mask: an assistant message's characters are what rendering the conversation up to and including it
adds to rendering the conversation before it with the generation prompt (``<|im_start|>assistant\\n``,
``[/INST]``, ...): its content and the template's end of turn, which the model must learn to emit;
the generation prompt belongs to the prompt. A token is learned when it starts inside such a span.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from jaxllm.core.errors import DataError
from jaxllm.data.tokenizer import HFTokenizer

Chat = list[dict[str, str]]

RENDER_SECONDS = 2.0  # one conversation; real templates take milliseconds
MAX_OUTPUT = 1 << 20  # characters of one rendered conversation
MAX_NUMBER = MAX_OUTPUT  # the largest repeat count or width a template may ask for


class _Overrun(Exception):
    """A render went past one of its budgets; the message says which."""


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, refusing repetitions, powers and call arguments that would build a value
    larger than a render may produce (they run in C, where no time check can stop them)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _power_bits(left, right) > 8 * MAX_NUMBER:
            raise SecurityError(f"{left!r} ** {right!r} is too large a number")
        if operator == "*" and _repeat_size(left, right) > MAX_OUTPUT:
            raise SecurityError(f"a repetition of more than {MAX_OUTPUT} items")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        if any(_big_int(a) for a in (*args, *kwargs.values())):
            raise SecurityError(f"a function called with a number above {MAX_NUMBER}")
        return super().call(context, obj, *args, **kwargs)


def _big_int(x) -> bool:
    return isinstance(x, int) and abs(x) > MAX_NUMBER


def _power_bits(left, right) -> float:
    """About how many bits ``left ** right`` has (0 when it is not an integer power that grows)."""
    if not (isinstance(left, int) and isinstance(right, int)) or right <= 1 or abs(left) <= 1:
        return 0
    return right * math.log2(abs(left))


def _repeat_size(left, right) -> int:
    """The length of ``left * right`` when it repeats a string or list (0 otherwise)."""
    for seq, count in ((left, right), (right, left)):
        if isinstance(count, int) and hasattr(seq, "__len__"):
            return len(seq) * count
    return 0


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(f) for name, f in env.filters.items()})
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the tokenizer's chat template does not parse (line {e.lineno}: {e.message})") from None


def _bounded_filter(f):
    """``f`` refusing a number above MAX_NUMBER among its arguments (``center(10**12)``, ``indent``)."""

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        if any(_big_int(a) for a in (*args[1:], *kwargs.values())):
            raise SecurityError(f"filter {f.__name__} given a number above {MAX_NUMBER}")
        return f(*args, **kwargs)

    return bounded


def _generate_bounded(template: jinja2.Template, variables: dict) -> str:
    """``template.render(**variables)`` within RENDER_SECONDS and MAX_OUTPUT characters: a trace
    function on the template's own frames checks the clock at every line, so a loop with no output
    is stopped too."""
    deadline = time.monotonic() + RENDER_SECONDS

    def line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Overrun(f"ran longer than {RENDER_SECONDS:g} s on one conversation")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None

    previous, chunks, size = sys.gettrace(), [], 0
    sys.settrace(call)
    try:
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _Overrun(f"rendered more than {MAX_OUTPUT} characters for one conversation")
            chunks.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(chunks)


def render(tok: HFTokenizer, messages: Chat, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` in ``tok``'s chat template (``transformers``' ``apply_chat_template``,
    ``tokenize=False``), within the render budgets."""
    variables = {"messages": messages, "add_generation_prompt": add_generation_prompt, **tok.roles}
    try:
        return _generate_bounded(_compiled(tok.chat_template), variables)
    except _Overrun as e:
        raise DataError(f"the tokenizer's chat template {e}; refusing it (an endless loop?)") from None
    except RecursionError:
        raise DataError("the tokenizer's chat template recursed too deeply (a macro calling itself?)") from None
    except MemoryError:
        raise DataError("the tokenizer's chat template built a value larger than memory; refusing it") from None
    except jinja2.exceptions.TemplateError as e:  # SecurityError included
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
