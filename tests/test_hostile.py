"""The one-line error contract under hostile input, for train.py and sft.py: for each bad input or
fault they exit 2 with exactly one line on stderr, and every file on disk, run directory included, is
byte-for-byte what it was before (the contract and the harness: ``hostile_kit``).

Most cases call the scripts' ``main(argv)`` in-process (it is what ``python SCRIPT`` runs, wrapped by
``exit_on_user_error``); a handful run as real processes, where only a process can show the exit
status and what reaches the terminal (tensorstore, absl and libtpu write to the file descriptor)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli
from hostile_kit import (
    NOT_UTF8,
    PYTHON_TAG,
    SELF_ALIAS,
    Case,
    W,
    all_garbled,
    check_case,
    make_base,
    params,
    snapshot,
    write,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("hostile_base"))


CASES = [
    # ---- train.py: config values
    Case("lr_nan", "train", lambda w: w.train("optim.lr=nan"), "optim.lr must be a finite number"),
    Case("lr_inf", "train", lambda w: w.train("optim.lr=inf"), "optim.lr must be a finite number"),
    Case("steps_zero", "train", lambda w: w.train("train.steps=0"), "train.steps must be positive"),
    Case("batch_negative", "train", lambda w: w.train("train.batch_size=-8"), "train.batch_size must be positive"),
    Case("seq_len_zero", "train", lambda w: w.train("train.seq_len=0"), "train.seq_len must be positive"),
    Case("seq_len_one", "train", lambda w: w.train("train.seq_len=1", "eval.sample_tokens=4"), "train.seq_len=1"),
    Case(
        "seed_beyond_64_bits",
        "train",
        lambda w: w.train(f"train.seed={2**70}"),
        "train.seed=1180591620717411303424 is too large",
    ),
    Case(
        "steps_beyond_32_bits", "train", lambda w: w.train(f"train.steps={2**40}"), "is too large; at most 2147483647"
    ),
    Case("log_every_zero", "train", lambda w: w.train("log.every=0"), "log.every must be positive"),
    Case("eval_batches_zero", "train", lambda w: w.train("eval.batches=0"), "eval.batches must be positive"),
    Case(
        "bpe_vocab_zero",
        "train",
        lambda w: w.train("data.tokenizer=bpe", "data.bpe_vocab_size=0"),
        "data.bpe_vocab_size must be positive",
    ),
    Case("keep_zero", "train", lambda w: w.train("checkpoint.keep=0"), "checkpoint.keep must be positive"),
    Case(
        "eval_temperature_nan", "train", lambda w: w.train("eval.temperature=nan"), "eval.temperature must be a finite"
    ),
    Case("dropout_above_one", "train", lambda w: w.train("model.dropout=1.5"), "model.dropout must be in [0, 1)"),
    Case("typo_key", "train", lambda w: w.train("model.n_layers=2"), "did you mean 'n_layer'"),
    Case("section_as_value", "train", lambda w: w.train("model=3"), "model is a section"),
    Case("override_without_equals", "train", lambda w: [*w.train(), "train.steps"], "must look like section.key=value"),
    Case("heads_do_not_divide", "train", lambda w: w.train("model.d_model=30"), "not divisible by model.n_head"),
    Case("mesh_too_big", "train", lambda w: w.train("mesh.tensor=3"), "does not divide the 8 visible devices"),
    Case(
        "kv_heads_do_not_divide", "train", lambda w: w.train("model.n_kv_head=3"), "not divisible by model.n_kv_head=3"
    ),
    Case("lr_negative", "train", lambda w: w.train("optim.lr=-1"), "optim.lr must be positive"),
    Case("mesh_more_than_the_devices", "train", lambda w: w.train("mesh.data=16"), "16 devices but 8 are visible"),
    Case("corpus_empty", "train", lambda w: w.train(w.key("data.source", "empty.txt", b"")), "holds no documents"),
    Case("cached_tokens_damaged", "train", lambda w: w.train(*w.damaged_cache()), "the index says"),
    Case("seq_len_beyond_corpus", "train", lambda w: w.train("train.seq_len=4000"), "fewer than train.seq_len+2"),
    # ---- train.py: config files
    Case("config_missing", "train", lambda w: [str(w.tmp / "nope.yaml")], "not found"),
    Case("config_self_alias", "train", lambda w: [str(w.file("c.yaml", SELF_ALIAS))], "refers to itself"),
    Case("config_not_utf8", "train", lambda w: [str(w.file("c.yaml", NOT_UTF8))], "is not UTF-8 text (byte 23"),
    Case("config_a_list", "train", lambda w: [str(w.file("c.yaml", b"- 1\n- 2\n"))], "must hold a mapping"),
    Case("config_bad_yaml", "train", lambda w: [str(w.file("c.yaml", b"train: {steps: [\n"))], "is not valid YAML"),
    Case("config_python_tag", "train", lambda w: [str(w.file("c.yaml", PYTHON_TAG))], "is not valid YAML"),
    Case("config_is_a_folder", "train", lambda w: [str(w.tmp)], "is a folder, not a file"),
    # ---- train.py: data and the file system
    Case("source_missing", "train", lambda w: w.train(f"data.source={w.tmp / 'none.txt'}"), "no such file or folder"),
    Case(
        "corpus_not_utf8",
        "train",
        lambda w: w.train(w.key("data.source", "c.txt", b"abc" * 400 + b"\xff" + b"z" * 900)),
        "is not UTF-8 text (byte 1200",
    ),
    Case(
        "jsonl_corpus_bad_line",
        "train",
        lambda w: w.train(w.key("data.source", "c.jsonl", b'{"text": 1}\n')),
        "c.jsonl: the line at byte 0 has no string field 'text'",
    ),
    Case(
        "jsonl_corpus_not_json",
        "train",
        lambda w: w.train(w.key("data.source", "c.jsonl", b'{"text": "a"}\n{oops\n')),
        "c.jsonl: the line at byte 14 is not valid JSON",
    ),
    Case(
        "jsonl_corpus_not_utf8",
        "train",
        lambda w: w.train(w.key("data.source", "c.jsonl", b'{"text": "\xe9"}\n')),
        "is not UTF-8 text",
    ),
    Case(
        "tokenizer_json_garbage",
        "train",
        lambda w: w.train(w.key("data.tokenizer", "t.json", b'{"model": 3}')),
        "is not a valid tokenizer.json",
    ),
    Case(
        "tokenizer_json_not_utf8",
        "train",
        lambda w: w.train(w.key("data.tokenizer", "t.json", b'{"a": "\xff"}')),
        "is not UTF-8 text",
    ),
    Case(
        "sample_prompt_not_encodable",
        "train",
        lambda w: w.train("data.tokenizer=char", "eval.sample_tokens=4", "eval.sample_prompt=\u20ac"),
        "eval.sample_prompt='\u20ac' cannot be encoded",
    ),
    Case("run_dir_is_a_file", "train", lambda w: w.train(f"run.dir={w.file('f', b'x')}"), "is a file, not a folder"),
    Case(
        "run_dir_under_a_file",
        "train",
        lambda w: w.train(f"run.dir={w.file('f', b'x') / 'run'}"),
        "a file, not a folder",
    ),
    Case(
        "compile_cache_is_a_file",
        "train",
        lambda w: w.train(w.key("run.compile_cache", "cc", b"x")),
        "run.compile_cache=",
    ),
    Case(
        "plan_dropless_moe_pipelined_on_tpu",
        "train",
        lambda w: [*w.train("model.moe.n_experts=4", "model.moe.top_k=2", "mesh.pipe=2"), "--plan", "v5p-8"],
        "dropless MoE layers (model.moe.capacity_factor=0) under mesh.pipe=2 do not compile for TPU",
    ),
    # ---- sft.py
    Case("sft_log_every_zero", "sft", lambda w: w.sft("log.every=0"), "log.every must be positive"),
    Case("sft_lr_nan", "sft", lambda w: w.sft("optim.lr=nan"), "optim.lr must be a finite number"),
    Case("sft_steps_zero", "sft", lambda w: w.sft("train.steps=0"), "train.steps must be positive"),
    Case("sft_lora_lr_inf", "sft", lambda w: w.sft("lora.lr=inf"), "lora.lr must be a finite number"),
    Case("sft_config_self_alias", "sft", lambda w: [str(w.file("c.yaml", SELF_ALIAS))], "refers to itself"),
    Case("sft_init_missing", "sft", lambda w: w.sft(f"init.from={w.tmp / 'none'}"), "does not exist"),
    Case("sft_unknown_method", "sft", lambda w: w.sft("sft.method=magic"), "magic"),
    Case(
        "sft_data_not_utf8",
        "sft",
        lambda w: w.sft(w.key("sft.data", "d.jsonl", b'{"instruction": "\xe9"}\n')),
        "is not UTF-8 text",
    ),
    Case(
        "sft_data_not_json",
        "sft",
        lambda w: w.sft(w.key("sft.data", "d.jsonl", b'{"instruction": "a", \n')),
        "d.jsonl:1 is not valid JSON",
    ),
    Case(
        "sft_data_not_an_object",
        "sft",
        lambda w: w.sft(w.key("sft.data", "d.jsonl", b"[1, 2]\n")),
        "d.jsonl:1 must be a JSON object",
    ),
    Case(
        "sft_data_no_assistant",
        "sft",
        lambda w: w.sft(w.key("sft.data", "d.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n')),
        "has no assistant message",
    ),
    Case(
        "sft_init_config_not_utf8",
        "sft",
        lambda w: w.sft(f"init.from={w.damaged_run(write('config.yaml', NOT_UTF8))}"),
        "is not UTF-8 text",
    ),
    Case("sft_run_dir_is_a_file", "sft", lambda w: w.sft(w.key("run.dir", "f", b"x")), "/f"),  # R1's lock names it
    Case("sft_run_dir_is_init_from", "sft", lambda w: w.sft(f"run.dir={w.base / 'saved'}"), "init.from"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_input_exits_2_with_one_line_and_changes_no_file(case, base, tmp_path, capfd):
    check_case(case, W(tmp_path, base), capfd)


def test_the_table_holds_at_least_40_cases_of_both_scripts():
    assert len(CASES) >= 40
    assert {c.script for c in CASES} == {"train", "sft"}


# --------------------------------------------------------------------------- as real processes


PROCESS_CASES = {  # name: (what runs, its arguments)
    "train_lr_nan": ("train.py", lambda w: w.train("optim.lr=nan")),
    "sft_log_every_zero": ("sft.py", lambda w: w.sft("log.every=0")),
    "generate_every_checkpoint_corrupt": (
        "-m jaxllm.generate",
        lambda w: [w.damaged_run(all_garbled), "--prompt", "ab", "--max-new-tokens", "2"],
    ),
    "scaling_predict_missing_fit": (
        "scaling.py",
        lambda w: ["predict", "--fit", str(w.tmp / "f.json"), "--compute", "1e20"],
    ),
}


def _run_process(what: str, args: list[str]) -> subprocess.CompletedProcess:
    if not what.startswith("-m "):
        return run_cli(what, *args)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    return subprocess.run(
        [sys.executable, "-m", what[3:], *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROCESS_CASES))
def test_as_a_process_hostile_input_exits_2_with_one_line_and_changes_no_file(name, base, tmp_path):
    what, make_args = PROCESS_CASES[name]
    args = make_args(W(tmp_path, base))
    before = snapshot(tmp_path, base)
    result = _run_process(what, args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert snapshot(tmp_path, base) == before
