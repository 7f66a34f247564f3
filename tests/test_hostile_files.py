"""The one-line error contract for the files a user hands over: run directories read by
``jaxllm.load`` and ``python -m jaxllm.generate``, Hugging Face safetensors whose headers lie, chat
templates that would run forever, fill memory or recurse, and oversized records in ``sft.data``."""

from __future__ import annotations

import json
import re
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hostile_kit import (
    NOT_UTF8,
    SELF_ALIAS,
    Case,
    W,
    all_flipped,
    all_garbled,
    check_case,
    make_base,
    params,
    write,
)

from jaxllm.core.errors import DataError
from jaxllm.data import chat, chat_template
from jaxllm.hf import safetensors_io


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("hostile_base"))


def vocab_size_zero(run) -> None:
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^  vocab_size: \d+$", "  vocab_size: 0", config.read_text()))


CASES = [
    # ---- jaxllm.load and python -m jaxllm.generate
    Case("load_every_checkpoint_corrupt", "load", lambda w: [w.damaged_run(all_garbled)], "has no readable checkpoint"),
    Case("load_every_checkpoint_flipped", "load", lambda w: [w.damaged_run(all_flipped)], "fails its checksums"),
    Case(
        "load_config_self_alias",
        "load",
        lambda w: [w.damaged_run(write("config.yaml", SELF_ALIAS))],
        "refers to itself",
    ),
    Case(
        "load_config_not_utf8", "load", lambda w: [w.damaged_run(write("config.yaml", NOT_UTF8))], "is not UTF-8 text"
    ),
    Case(
        "load_config_unknown_key",
        "load",
        lambda w: [w.damaged_run(write("config.yaml", b"model:\n  layers: 2\n"))],
        "unknown config key 'model.layers'",
    ),
    Case(
        "load_config_shape_disagrees",
        "load",
        lambda w: [
            w.damaged_run(write("config.yaml", b"model: {d_model: 64, vocab_size: 256}\ntrain: {seq_len: 16}\n"))
        ],
        "the weights and the config disagree",
    ),
    Case(
        "load_config_vocab_size_zero",
        "load",
        lambda w: [w.damaged_run(vocab_size_zero)],
        "gives model.vocab_size=0, but a saved run records the size it was trained with",
    ),
    Case(
        "load_tokenizer_garbage",
        "load",
        lambda w: [w.damaged_run(write("tokenizer.json", b"\x00\x01"))],
        "is not valid JSON",
    ),
    Case(
        "load_no_checkpoint",
        "load",
        lambda w: [w.damaged_run(lambda run: shutil.rmtree(run / "checkpoints"))],
        "has no checkpoint yet",
    ),
    Case("load_not_a_model", "load", lambda w: [str(w.tmp)], "is neither a jaxllm run directory"),
    Case(
        "load_hf_not_safetensors",
        "load",
        lambda w: [w.hf_dir(b'{"model_type": "gpt2"}', b"PK\x03\x04")],
        "is not a readable safetensors file",
    ),
    Case(
        "load_hf_config_a_list",
        "load",
        lambda w: [str(w.file("config.json", b"[1]").parent)],
        "must hold a JSON object",
    ),
    Case(
        "generate_top_p_zero",
        "generate",
        lambda w: [w.damaged_run(lambda run: None), "--prompt", "ab", "--max-new-tokens", "2", "--top-p", "0"],
        "top_p must be in (0, 1]",
    ),
    Case(
        "generate_temperature_nan",
        "generate",
        lambda w: [w.damaged_run(lambda run: None), "--prompt", "ab", "--max-new-tokens", "2", "--temperature", "nan"],
        "temperature must be a finite number",
    ),
    Case(
        "generate_top_k_negative",
        "generate",
        lambda w: [w.damaged_run(lambda run: None), "--prompt", "ab", "--max-new-tokens", "2", "--top-k", "-1"],
        "top_k must be an integer >= 0",
    ),
    Case(
        "generate_without_prompt", "generate", lambda w: [str(w.base / "saved")], "the following arguments are required"
    ),
    Case(
        "generate_max_new_tokens_not_a_number",
        "generate",
        lambda w: [str(w.base / "saved"), "--prompt", "a", "--max-new-tokens", "many"],
        "invalid int value: 'many'",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_file_exits_2_with_one_line_and_changes_no_file(case, base, tmp_path, capfd):
    check_case(case, W(tmp_path, base), capfd)


# --------------------------------------------------------------------------- safetensors headers that lie


def safetensors(entries: dict[str, tuple[str, list[int], int, int]], data_bytes: int) -> bytes:
    """A safetensors file whose header claims ``entries`` (name: dtype, shape, begin, end) over
    ``data_bytes`` bytes of data, whatever those bytes hold."""
    tree = {k: {"dtype": d, "shape": s, "data_offsets": [b, e]} for k, (d, s, b, e) in entries.items()}
    raw = json.dumps(tree).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(range(256)) * (data_bytes // 256) + b"\1" * (data_bytes % 256)


GPT2 = b'{"model_type": "gpt2"}'
LYING_HEADERS = {  # name: (the file, a fragment of the one line)
    "truncated": (safetensors({"w": ("F32", [4, 4], 0, 64)}, 10), "ends at byte 64 of data, past the 10"),
    "offset_past_the_data": (safetensors({"w": ("F32", [4], 100, 116)}, 16), "past the 16"),
    "overlapping": (
        safetensors({"a": ("F32", [4], 0, 16), "b": ("F32", [4], 8, 24)}, 24),
        "tensors 'a' and 'b' overlap",
    ),
    "dtype_size_disagrees": (safetensors({"w": ("F32", [4], 0, 8)}, 8), "F32 [4] is 16 bytes but its span is 8"),
    "unknown_dtype": (safetensors({"w": ("Q3", [4], 0, 8)}, 8), "has dtype 'Q3'"),
    "negative_offset": (safetensors({"w": ("F16", [4], -8, 0)}, 8), "integers >= 0"),
    "header_longer_than_the_file": ((10**6).to_bytes(8, "little") + b"{}", "header length 1000000 in a file of 10"),
}


@pytest.mark.parametrize("name", list(LYING_HEADERS))
def test_a_lying_safetensors_header_is_refused_in_one_line_before_any_read(name, base, tmp_path, capfd):
    weights, message = LYING_HEADERS[name]
    case = Case(name, "load", lambda w: [w.hf_dir(GPT2, weights)], message)
    check_case(case, W(tmp_path, base), capfd)


def test_an_honest_header_reads_back_its_tensors(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    safetensors_io.write(tmp_path, {"w": (3, 4), "b": (4,)}, lambda k: values if k == "w" else values[0])
    entries = safetensors_io.catalog(tmp_path)
    np.testing.assert_array_equal(safetensors_io.read_block(entries["w"], (slice(1, 3),)), values[1:])
    np.testing.assert_array_equal(safetensors_io.read_block(entries["b"], (slice(None),)), values[0])


# --------------------------------------------------------------------------- chat templates and sft.data

HOSTILE_TEMPLATES = {  # name: (a template, a fragment of the refusal)
    "nested_loops_without_output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        f"ran longer than {chat_template.RENDER_SECONDS:g} s",
    ),
    "huge_output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}0123456789{% endfor %}{% endfor %}",
        f"rendered more than {chat_template.MAX_OUTPUT}",
    ),
    "huge_repetition": ("{{ 'x' * 10**12 }}", "a repetition of more than"),
    "huge_power": ("{{ 7 ** 1000000000 }}", "is too large a number"),
    "huge_filter_width": ("{{ 'x' | center(10**12) }}", "given a number above"),
    "huge_method_width": ("{{ 'x'.ljust(10**12) }}", "a function called with a number above"),
    "recursive_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
}
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_refused_in_one_line_within_its_budget(name):
    template, message = HOSTILE_TEMPLATES[name]
    tok = SimpleNamespace(chat_template=template, roles={})
    start = time.monotonic()
    with pytest.raises(DataError, match=re.escape(message)) as refused:
        chat_template.render(tok, CHAT)
    assert time.monotonic() - start < chat_template.RENDER_SECONDS + 3
    assert "\n" not in str(refused.value)


def test_the_budgets_leave_an_ordinary_template_its_text():
    tok = SimpleNamespace(chat_template="{% for m in messages %}{{ m.role * 2 }}{{ m.content }}{% endfor %}", roles={})
    assert chat_template.render(tok, CHAT) == "useruserhiassistantassistantyo"


def test_an_sft_record_above_the_size_limit_is_refused_in_one_line(base, tmp_path, capfd):
    record = b'{"instruction": "' + b"a" * chat.MAX_RECORD + b'", "output": "b"}\n'
    case = Case("sft_record_too_large", "sft", lambda w: w.sft(w.key("sft.data", "d.jsonl", record)), "d.jsonl:1 holds")
    check_case(case, W(tmp_path, base), capfd)
