"""What the hostile-input tests share: the scripts' ``main`` functions, a tiny saved run to damage,
a case's paths, and the contract every case checks (exit 2, exactly one ``error:`` line on stderr,
no traceback, every file on disk unchanged: its kind, mode and SHA-256)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, TINY, corpus_text

import jaxllm
from jaxllm.core.config import load_config, resolve_model, save_config, to_dict
from jaxllm.core.config_schema import DataConfig
from jaxllm.core.errors import exit_on_user_error
from jaxllm.data import corpus as data
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.infer import generate as generate_cli
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAINS: dict[str, Callable[[list[str]], int]] = {
    "train": script("train").main,
    "sft": script("sft").main,
    "scaling": script("scaling").main,
    "generate": generate_cli.main,
    "load": exit_on_user_error(lambda argv: bool(jaxllm.load(*argv))),
}


def make_base(root: Path) -> Path:
    """A corpus with its tokens already cached (byte and char), and ``saved``: a jaxllm run directory of
    a random tiny gpt2 with checkpoints at steps 1 and 2 (no training needed to test the plumbing)."""
    (root / "corpus.txt").write_text(corpus_text())
    for tokenizer in ("byte", "char"):
        data.prepare_into_cache(
            DataConfig(source=str(root / "corpus.txt"), tokenizer=tokenizer, cache_dir=str(root / "cache"))
        )
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
        """Overrides that read a copy of the corpus cache whose train shards lost their last byte."""
        shutil.copytree(self.base / "cache", self.tmp / "cache")
        for train_bin in (self.tmp / "cache").rglob("train-*.bin"):
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


def garble_state(step: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")

    return damage


def all_flipped(run: Path) -> None:
    """64 bytes flipped in the largest data file of each checkpoint: they restore, but to wrong values."""
    for step in (1, 2):
        files = [p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
        data = max(files, key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
        data.write_bytes(bytes(raw))


def all_garbled(run: Path) -> None:
    garble_state(1)(run)
    garble_state(2)(run)


def write(name: str, content: bytes) -> Callable[[Path], None]:
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


def params(cases: list[Case]) -> list:
    """``cases`` as pytest parameters named by their ids (an ``xfail`` reason marks a known failure)."""
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in cases
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


def assert_one_line(status: int, err: str, message: str = "", code: int = 2) -> None:
    """Exit ``code``, stderr exactly one ``error: ...`` line holding ``message``, no traceback."""
    assert status == code, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    assert message in err, err


def check_case(case: Case, w: W, capfd) -> None:
    """Runs ``case`` in-process and checks the contract, every file under ``w``'s folders unchanged."""
    argv = case.args(w)
    before = snapshot(w.tmp, w.base)
    capfd.readouterr()
    status = MAINS[case.script](argv)
    assert_one_line(status, capfd.readouterr().err, case.message)
    assert snapshot(w.tmp, w.base) == before
