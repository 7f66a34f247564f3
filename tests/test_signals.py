"""SIGINT and SIGTERM at every moment of start-up end train.py and sft.py with exit 130 / 143 and one
line, no traceback: while the data is tokenized, while the first programs compile, at the first step.
Each case starts the script, waits for a marker of that moment (a file in run.dir or the cache, a
line on stderr) and sends the signal; a process that does not end is a failure, not a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, corpus_text
from hostile_kit import W, make_base

from jaxllm.core import signals


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("signals_base"))


def signalled(script: str, args: list[str], signum: int, ready, cold_cache: Path | None = None) -> tuple[int, str]:
    """Runs ``python SCRIPT ARGS``, sends ``signum`` once ``ready(stderr so far)`` holds (or after 120 s),
    and returns ``(exit status, stderr)``; the process must end within 90 s of the signal. With
    ``cold_cache`` (an empty folder for JAX's compilation cache) every program really compiles, so
    the moment a marker announces lasts as long as a compilation, not a cache read."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    if cold_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cold_cache)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while not ready("".join(lines)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signum)
    try:
        status = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not end within 90 s of the signal")
    reader.join(timeout=10)
    return status, "".join(lines)


def assert_stopped(status: int, err: str, signum: int, where: str) -> None:
    """Exit 128 + ``signum``, stderr ending in the one line saying so (naming ``where``), no traceback."""
    name = signal.Signals(signum).name
    assert status == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    stops = [line for line in err.splitlines() if "stopped by" in line]
    assert stops == [err.splitlines()[-1]], err[-3000:]
    assert stops[0].startswith(f"stopped by {name} {where}"), stops[0]


def exists(root: Path, pattern: str):
    return lambda _err: any(root.glob(pattern))


def logged(run: Path):
    """Whether the run's metrics.jsonl holds a record: its first step is done."""
    return lambda _err: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0


def unwritten(run: Path) -> bool:
    """Nothing of a run written: no config, no metrics, no checkpoint (orbax may have made the empty folder)."""
    return not any(p.is_file() for p in run.rglob("*") if p.name != ".lock")


@pytest.mark.slow
def test_sigint_while_tokenizing_stops_before_any_shard_or_run_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text() * 400)  # 20 MB: seconds of tokenizing
    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [*TINY, f"data.source={corpus}", f"data.cache_dir={cache}", f"run.dir={run}"]
    status, err = signalled("train.py", args, signal.SIGINT, exists(cache, "prepared/*/parts"))
    assert_stopped(status, err, signal.SIGINT, "while preparing the data")
    assert not list(cache.rglob("*.bin")) and not list(cache.rglob("index.json"))
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "sft.py"])
def test_sigterm_while_the_state_compiles_stops_with_143_and_writes_no_run_file(script, base, tmp_path):
    w = W(tmp_path, base)
    args = w.train() if script == "train.py" else w.sft()
    status, err = signalled(script, args, signal.SIGTERM, exists(w.run, "checkpoints"), tmp_path / "xla")
    assert_stopped(status, err, signal.SIGTERM, "while initialising the state")
    assert unwritten(w.run)


@pytest.mark.slow
def test_sigint_once_the_banner_is_out_stops_after_the_first_step_with_its_checkpoint(base, tmp_path):
    """The banner comes just before the first step compiles: the step completes and is saved."""
    w = W(tmp_path, base)
    banner = lambda err: "from scratch" in err
    status, err = signalled("train.py", w.train("train.steps=1000"), signal.SIGINT, banner, tmp_path / "xla")
    assert_stopped(status, err, signal.SIGINT, "at step 1; checkpoint saved")
    assert [p.name for p in (w.run / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


@pytest.mark.slow
def test_sigint_at_sfts_first_step_stops_with_130_and_its_checkpoint(base, tmp_path):
    w = W(tmp_path, base)
    status, err = signalled("sft.py", w.sft("train.steps=1000", "log.every=1"), signal.SIGINT, logged(w.run))
    assert_stopped(status, err, signal.SIGINT, "at step")
    assert (w.run / "checkpoints").is_dir()


def test_a_deferred_signal_is_raised_at_the_next_check_only(monkeypatch):
    with signals.deferred():
        signals.check("before")  # nothing received: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert signals.received() == signal.SIGTERM
        with pytest.raises(signals.Interrupted, match="stopped by SIGTERM while compiling"):
            signals.check("compiling")
    assert signals.received() is None
    assert signal.getsignal(signal.SIGTERM) is not signals._record
