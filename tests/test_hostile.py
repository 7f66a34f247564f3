"""The one-line error contract under hostile input (issue 12): for each bad input or fault, train.py,
sft.py, scaling.py, ``python -m jaxllm.generate`` and ``jaxllm.load`` exit 2 (or raise a UserError)
with exactly one line on stderr, and every file on disk, run directory included, is byte-for-byte
what it was before.

Most cases call the scripts' ``main(argv)`` in-process (it is what ``python SCRIPT`` runs, wrapped by
``exit_on_user_error``); a handful run as real processes, where only a process can show the exit
status and what reaches the terminal (tensorstore and absl write to the file descriptor)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, TINY, corpus_text, run_cli

import jaxllm
from jaxllm.core.config import load_config, resolve_model, save_config, to_dict
from jaxllm.core.errors import exit_on_user_error
from jaxllm.data import corpus as data
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import generate as generate_cli
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAINS: dict[str, Callable[[list[str]], int]] = {
    "train": _script("train").main,
    "sft": _script("sft").main,
    "scaling": _script("scaling").main,
    "generate": generate_cli.main,
    "load": exit_on_user_error(lambda argv: bool(jaxllm.load(*argv))),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A corpus with its tokens already cached (byte and char), and ``saved``: a jaxllm run directory of
    a random tiny gpt2 with checkpoints at steps 1 and 2 (no training needed to test the plumbing)."""
    root = tmp_path_factory.mktemp("hostile_base")
    (root / "corpus.txt").write_text(corpus_text())
    for tokenizer in ("byte", "char"):
        data.prepare(str(root / "corpus.txt"), tokenizer, 0.02, 4096, str(root / "cache"))
    cfg = load_config(None, [*TINY, f"run.dir={root / 'saved'}", "checkpoint.keep=2", "model.max_seq_len=64"])
    cfg.model = resolve_model(cfg.model, 256, cfg.train.seq_len)
    (root / "saved").mkdir()
    save_config(cfg, root / "saved" / "config.yaml")
    ByteTokenizer().save(root / "saved")
    init = jax.jit(Transformer(cfg.model).init)  # one compile, not one per operation
    params = nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    saver = ckpt.Checkpointer(root / "saved", keep=2)
    for step in (1, 2):
        saver.save(step, {"params": params}, {"step": step, "model": to_dict(cfg.model)})
    saver.close()
    return root


@dataclass
class W:
    """One case's paths: its own folder ``tmp`` and the shared, read-only ``base``."""

    tmp: Path
    base: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def train(self, *extra: str) -> list[str]:
        """train.py arguments on the cached corpus, writing to ``run``."""
        corpus, cache = self.base / "corpus.txt", self.base / "cache"
        return [*TINY, f"data.source={corpus}", f"data.cache_dir={cache}", f"run.dir={self.run}", *extra]

    def sft(self, *extra: str) -> list[str]:
        return [
            f"init.from={self.base / 'saved'}",
            f"run.dir={self.run}",
            "train.seq_len=16",
            "train.steps=2",
            "sft.n_train=4",
            "sft.n_eval=2",
            "sft.max_new_tokens=4",
            "log.progress=false",
            *extra,
        ]

    def key(self, key: str, name: str, content: bytes) -> str:
        """``key=PATH`` of a new file ``name`` holding ``content``."""
        return f"{key}={self.file(name, content)}"

    def damaged_cache(self) -> list[str]:
        """Overrides that read a copy of the corpus cache whose train.bin lost its last byte."""
        shutil.copytree(self.base / "cache", self.tmp / "cache")
        for train_bin in (self.tmp / "cache").rglob("train.bin"):
            train_bin.write_bytes(train_bin.read_bytes()[:4095])
        return [f"data.cache_dir={self.tmp / 'cache'}"]

    def hf_dir(self, config: bytes, weights: bytes) -> str:
        self.file("config.json", config)
        self.file("model.safetensors", weights)
        return str(self.tmp)

    def damaged_run(self, damage: Callable[[Path], object]) -> str:
        """A copy of the saved run, damaged by ``damage(copy)``."""
        shutil.copytree(self.base / "saved", self.run)
        damage(self.run)
        return str(self.run)


def _garble_state(step: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")

    return damage


def _all_flipped(run: Path) -> None:
    """64 bytes flipped in the largest data file of each checkpoint: they restore, but to wrong values."""
    for step in (1, 2):
        files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
        data = max(files, key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
        data.write_bytes(bytes(raw))


def _all_garbled(run: Path) -> None:
    _garble_state(1)(run)
    _garble_state(2)(run)


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes(content)


SELF_ALIAS = b"train: &t {steps: 2, again: *t}\n"
NOT_UTF8 = b"train:\n  steps: 2 # caf\xe9\n"
PYTHON_TAG = b"train: !!python/object/apply:os.system ['echo pwned']\n"


@dataclass
class Case:
    id: str
    script: str
    args: Callable[[W], list[str]]
    message: str  # a fragment of the one line
    xfail: str = ""


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
    Case("corpus_empty", "train", lambda w: w.train(w.key("data.source", "empty.txt", b"  \n")), "the corpus is empty"),
    Case("cached_tokens_damaged", "train", lambda w: w.train(*w.damaged_cache()), "are damaged (4095 bytes"),
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
        "c.jsonl:1: each line needs a string field 'text'",
    ),
    Case(
        "jsonl_corpus_not_json",
        "train",
        lambda w: w.train(w.key("data.source", "c.jsonl", b'{"text": "a"}\n{oops\n')),
        "c.jsonl:2 is not valid JSON",
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
        lambda w: w.sft(f"init.from={w.damaged_run(_write('config.yaml', NOT_UTF8))}"),
        "is not UTF-8 text",
    ),
    Case("sft_run_dir_is_a_file", "sft", lambda w: w.sft(w.key("run.dir", "f", b"x")), "/f"),  # R1's lock names it
    Case("sft_run_dir_is_init_from", "sft", lambda w: w.sft(f"run.dir={w.base / 'saved'}"), "init.from"),
    # ---- jaxllm.load and python -m jaxllm.generate
    Case(
        "load_every_checkpoint_corrupt", "load", lambda w: [w.damaged_run(_all_garbled)], "has no readable checkpoint"
    ),
    Case("load_every_checkpoint_flipped", "load", lambda w: [w.damaged_run(_all_flipped)], "fails its checksums"),
    Case(
        "load_config_self_alias",
        "load",
        lambda w: [w.damaged_run(_write("config.yaml", SELF_ALIAS))],
        "refers to itself",
    ),
    Case(
        "load_config_not_utf8", "load", lambda w: [w.damaged_run(_write("config.yaml", NOT_UTF8))], "is not UTF-8 text"
    ),
    Case(
        "load_config_unknown_key",
        "load",
        lambda w: [w.damaged_run(_write("config.yaml", b"model:\n  layers: 2\n"))],
        "unknown config key 'model.layers'",
    ),
    Case(
        "load_config_shape_disagrees",
        "load",
        lambda w: [
            w.damaged_run(_write("config.yaml", b"model: {d_model: 64, vocab_size: 256}\ntrain: {seq_len: 16}\n"))
        ],
        "the weights and the config disagree",
    ),
    Case(
        "load_tokenizer_garbage",
        "load",
        lambda w: [w.damaged_run(_write("tokenizer.json", b"\x00\x01"))],
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
    # ---- scaling.py (its fit/results files are another item; these already pass)
    Case("scaling_fit_missing_csv", "scaling", lambda w: ["fit", str(w.tmp / "absent.csv")], "no such file"),
    Case("scaling_unknown_command", "scaling", lambda w: ["fly"], "invalid choice"),
    Case(
        "scaling_sweep_lr_nan",
        "scaling",
        lambda w: ["sweep", "optim.lr=nan", "--out", str(w.tmp / "out")],
        "optim.lr must be a finite number",
    ),
]


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every entry under ``folders``: its kind and mode, and a file's SHA-256."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p)] = (st.st_mode, digest)
    return out


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ],
)
def test_hostile_input_exits_2_with_one_line_and_changes_no_file(case, base, tmp_path, capfd):
    w = W(tmp_path, base)
    argv = case.args(w)
    before = snapshot(tmp_path, base)
    capfd.readouterr()
    status = MAINS[case.script](argv)
    err = capfd.readouterr().err
    assert status == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
    assert case.message in err, err
    assert snapshot(tmp_path, base) == before


def test_the_table_holds_at_least_40_cases_across_every_entry_point():
    assert len(CASES) >= 40
    assert {c.script for c in CASES} == set(MAINS)


# --------------------------------------------------------------------------- as real processes


PROCESS_CASES = {  # name: (what runs, its arguments)
    "train_lr_nan": ("train.py", lambda w: w.train("optim.lr=nan")),
    "sft_log_every_zero": ("sft.py", lambda w: w.sft("log.every=0")),
    "generate_every_checkpoint_corrupt": (
        "-m jaxllm.generate",
        lambda w: [w.damaged_run(_all_garbled), "--prompt", "ab", "--max-new-tokens", "2"],
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
