"""Test set-up: 8 faked CPU devices for every in-process test (sharding tests need them; single-device
tests build their mesh from ``jax.devices()[:1]``), tiny configs, a tiny corpus, and a CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Many tests (and their subprocesses, which inherit the environment) compile the very same programs:
# a persistent XLA cache shared by all of them compiles each once. Set before JAX is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jaxllm-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# No Python stack frames in the compiled programs' locations: XLA carries less metadata through its
# passes, so it compiles faster, and nothing here reads them.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
# Compile fast rather than run fast: the suite's programs are tiny and run for a few steps, so LLVM's
# optimisation passes and XLA CPU's fusion emitters cost far more than they save. Fast math stays
# off, so the equalities and the golden loss hold at their tolerances. XLA:CPU splits a module's code
# generation over threads, which only adds work when every core already runs a test worker.
# Subprocesses inherit the flags (and share the cache, whose key includes them). The measurements:
# bench/results/test-suite_*.md.
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()

# 8 faked CPU devices. The variable too, not only JAX's flag: it overrides a config's
# dist.cpu_devices (a config may ask for 2) in the in-process runs.
os.environ["JAX_NUM_CPU_DEVICES"] = "8"

import jax

jax.config.update("jax_num_cpu_devices", 8)

import pytest

from jaxllm.core.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=4",
    "train.seq_len=16",
    "train.batch_size=8",
    "train.steps=4",
    "optim.warmup_steps=1",
    "eval.every=1000",
    "eval.batches=2",
    "eval.sample_tokens=0",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=1000",
]


def corpus_text() -> str:
    """~40 kB of varied, deterministic text: enough for train/val splits at seq_len 16."""
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "self", "(x)", "import"]
    lines = []
    for i in range(2000):
        lines.append(" ".join(words[(i * k + k * k) % len(words)] for k in range(1, 5)) + f" {i % 97}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text())
    return path


@pytest.fixture
def tiny_cfg(tmp_path, corpus):
    """A factory: ``tiny_cfg(*overrides) -> Config`` on the tiny corpus, its run dir under tmp_path."""

    def make(*overrides: str) -> Config:
        base = TINY + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]
        return load_config(None, base + list(overrides))

    return make


def run_cli(script: str, *args: str, devices: int | None = 1, cwd: Path = ROOT, timeout: int = 300, env_extra=None):
    """Runs ``python SCRIPT ARGS`` in a subprocess with ``devices`` faked CPU devices (None: JAX_NUM_CPU_DEVICES
    unset, so the config's ``dist.cpu_devices`` decides)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    env.pop("JAX_NUM_CPU_DEVICES", None)  # set above for this process
    if devices is not None:
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kill_after_checkpoint(script: str, args: list[str], run_dir: Path, step: int) -> None:
    """Runs ``python SCRIPT ARGS run.dir=RUN_DIR`` on one faked CPU device and SIGKILLs it as soon as
    checkpoint ``step`` is on disk (or after 120 s): a crash that gives the process no chance to save."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args, f"run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / str(step)).is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
