"""Never lose a run: config changes refused, damage set aside, only finite state saved, torn metrics
trimmed, one writer per run directory, a failed save leaving the good checkpoints and one line."""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import signal
import sys

import jax
import pytest
from conftest import TINY, corpus_text

from jaxllm.core import fileio
from jaxllm.core.config import ModelConfig, load_config
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.train import checkpoint as ckpt
from jaxllm.train import trainer


def one_device():
    return jax.devices()[:1]


def listing(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def steps_logged(run_dir) -> list[int]:
    return [r["step"] for r in fileio.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of 4 steps with checkpoints 2 and 4 (trained once for the whole module)."""
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "corpus.txt").write_text(corpus_text())
    base = TINY + [f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}", f"run.dir={tmp / 'run'}"]
    trainer.train(load_config(None, [*base, "checkpoint.every=2", "checkpoint.keep=3"]), one_device())
    return tmp / "run"


@pytest.fixture
def tiny_cfg(finished_run, tmp_path):
    """``tiny_cfg(*overrides) -> Config``: ``finished_run``'s config with its run.dir under tmp_path
    (the same corpus, so a copy of that run resumes under it)."""

    def make(*overrides: str):
        corpus, cache, run = finished_run.parent / "corpus.txt", tmp_path / "cache", tmp_path / "run"
        return load_config(
            None, [*TINY, f"data.source={corpus}", f"data.cache_dir={cache}", f"run.dir={run}", *overrides]
        )

    return make


@pytest.fixture
def two_checkpoints(finished_run, tmp_path):
    """A copy of ``finished_run`` as this test's run directory (``tiny_cfg``'s run.dir)."""
    shutil.copytree(finished_run, tmp_path / "run")
    assert [n for n in listing(tmp_path / "run") if n.isdigit()] == ["2", "4"]
    return tmp_path / "run"


@pytest.mark.slow
def test_optimizer_change_is_refused_naming_the_keys_and_nothing_moves(two_checkpoints, tiny_cfg):
    before = {p: p.read_bytes() for p in two_checkpoints.rglob("*") if p.is_file()}
    with pytest.raises(
        ConfigError,
        match=r"checkpoint 4 .* another configuration \(only in the checkpoint: opt_state\.1\.0\.count.*"
        r"only in this run: opt_state\.0\.0\.count",
    ) as e:
        trainer.train(tiny_cfg("optim.clip_norm=0", "train.steps=6", "run.allow_changes=true"), one_device())
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in two_checkpoints.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("key", ["adapter_dim", "prompt_tokens"])
def test_shape_keys_include_the_fine_tuning_shapes(key, tmp_path):
    with pytest.raises(ConfigError, match=f"different model.*{key}: 0 vs 4"):
        ckpt.check_same_model({key: 0}, ModelConfig(**{key: 4}), tmp_path)


def damage(run_dir, step: int) -> None:
    """Flips 64 bytes in the middle of the largest data file of checkpoint ``step`` (its size unchanged)."""
    files = [p for p in (run_dir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    data = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    data.write_bytes(bytes(raw))


@pytest.mark.slow
def test_flipped_bytes_fail_the_checksums_and_the_previous_checkpoint_is_used(two_checkpoints, tiny_cfg, capsys):
    damage(two_checkpoints, 4)
    summary = trainer.train(tiny_cfg("checkpoint.every=2", "checkpoint.keep=3", "train.steps=5"), one_device())
    assert summary["start_step"] == 2
    assert "checkpoint 4 fails its integrity check" in capsys.readouterr().err
    assert "corrupt-4" in listing(two_checkpoints)


def test_set_aside_names_never_collide(two_checkpoints, tiny_cfg):
    (two_checkpoints / "checkpoints" / "corrupt-4").mkdir()  # left by an earlier fault
    damage(two_checkpoints, 4)
    trainer.train(tiny_cfg("checkpoint.every=2", "checkpoint.keep=3", "train.steps=5"), one_device())
    assert {"corrupt-4", "corrupt-4-2"} <= set(listing(two_checkpoints))


def test_no_intact_checkpoint_stops_the_run_instead_of_starting_over(two_checkpoints, tiny_cfg):
    damage(two_checkpoints, 2)
    damage(two_checkpoints, 4)
    metrics = (two_checkpoints / "metrics.jsonl").read_bytes()
    for _ in range(2):  # and the rerun after that does not start over either
        with pytest.raises(UserError, match="no intact checkpoint .*corrupt-"):
            trainer.train(tiny_cfg("checkpoint.every=2", "train.steps=6"), one_device())
    assert (two_checkpoints / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_divergence_between_log_steps_leaves_a_finite_newest_checkpoint_that_resumes(two_checkpoints, tiny_cfg):
    diverging = tiny_cfg(
        "train.steps=12",
        "optim.lr=1e30",
        "run.allow_changes=true",
        "log.every=10",
        "checkpoint.every=2",
        "checkpoint.keep=2",
    )
    with pytest.raises(trainer.TrainingDiverged, match=r"NaN or Inf by step 6 .*Last good checkpoint: step 4 in "):
        trainer.train(diverging, one_device())
    assert [n for n in listing(two_checkpoints) if n.isdigit()] == ["2", "4"]  # keep=2 deleted no finite one
    summary = trainer.train(tiny_cfg("train.steps=6", "checkpoint.every=2"), one_device())
    assert summary["start_step"] == 4 and math.isfinite(summary["loss"])


def test_torn_last_metrics_line_is_trimmed_with_a_warning(two_checkpoints, tiny_cfg, capsys):
    with (two_checkpoints / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a crash in the middle of a write
    trainer.train(tiny_cfg("train.steps=6", "checkpoint.every=2"), one_device())
    assert "was cut short" in capsys.readouterr().err
    assert steps_logged(two_checkpoints) == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_earlier_checkpoint_never_duplicates_steps(two_checkpoints, tiny_cfg):
    damage(two_checkpoints, 4)  # resumes at 2 while the log holds steps 3 and 4
    trainer.train(tiny_cfg("train.steps=6", "checkpoint.every=2", "checkpoint.keep=3"), one_device())
    assert steps_logged(two_checkpoints) == [1, 2, 3, 4, 5, 6]


def test_a_second_writer_of_a_run_directory_is_refused(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    with fileio.dir_lock(run_dir, "a running train.py"), pytest.raises(UserError, match=f"is writing to {run_dir}"):
        trainer.train(tiny_cfg(), one_device())
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_folder(tiny_cfg, tmp_path, monkeypatch):
    def no_space(*_args, **_kwargs):  # what tensorstore raises when a write hits ENOSPC
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 6761 bytes: '
            "No space left on device [os_error_code='28']\nmore detail"
        )

    monkeypatch.setattr(ckpt.ocp.CheckpointManager, "save", no_space)
    with pytest.raises(UserError) as e:
        trainer.train(tiny_cfg("checkpoint.every=1", "train.steps=1"), one_device())
    assert str(e.value) == f"cannot write checkpoints to {tmp_path / 'run' / 'checkpoints'}: No space left on device"


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` in any one file fail (EFBIG) as a full disk's do, for this process: a
    soft RLIMIT_FSIZE, SIGXFSZ ignored; both restored on the way out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_a_failed_save_keeps_the_good_checkpoints_and_leaves_nothing_half_written(tmp_path, capfd):
    state = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (64, 64)) for i in range(16)}
    saver = ckpt.Checkpointer(tmp_path, keep=3)
    saver.save(1, state, {"step": 1})
    saver.wait()
    capfd.readouterr()
    with file_size_limit(4096), pytest.raises(UserError, match="cannot write checkpoints to .*: File too large"):
        try:
            saver.save(2, state, {"step": 2})
        finally:
            saver.close()
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err, err
    assert listing(tmp_path) == ["1"]
    reader = ckpt.Checkpointer(tmp_path, keep=3)
    try:
        found = next(reader.newest_first(lambda step, meta: reader.restore_single_device(step)))
    finally:
        reader.close()
    assert (found.step, found.intact) == (1, True)


def test_only_the_closed_event_loop_reports_of_a_failed_save_are_dropped(tmp_path, capfd, monkeypatch):
    """tensorstore reports each write in flight when a failed save's event loop closed as an
    unraisable RuntimeError with no object; any other unraisable exception is still printed."""
    testcapi = pytest.importorskip("_testcapi", reason="CPython's test module raises an unraisable exception")
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    ckpt.Checkpointer(tmp_path, keep=1).close()
    testcapi.write_unraisable_exc(RuntimeError("Event loop is closed"), None, None)
    assert capfd.readouterr().err == ""
    testcapi.write_unraisable_exc(RuntimeError("something else"), None, None)
    assert "RuntimeError: something else" in capfd.readouterr().err


class Ticket:
    """A step's stand-in output: blocking on it marks that step (and so every earlier one) finished."""

    finished = 0

    def __init__(self, step: int):
        self.step = step

    def block_until_ready(self):
        Ticket.finished = max(Ticket.finished, self.step)
        return self


def test_the_loop_never_queues_more_than_two_steps(tmp_path):
    """Unbounded dispatch deadlocks XLA:CPU's collectives across CPU devices (bench/xla_cpu_flags.py
    --devices 2 aborted in 9 of 11 processes): the loop dispatches step k only once step k-2 is done,
    with logging, evaluation and checkpoints too rare to wait for it."""
    import contextlib

    from jaxllm.train import loop
    from jaxllm.train.metrics_log import MetricsLog

    Ticket.finished, queued = 0, []

    def step(state, _batch):
        queued.append(state + 1 - Ticket.finished)  # steps dispatched and not known finished, this one included
        return state + 1, {"loss": 1.0, "lr": 0.0, "grad_norm": 0.0, "layer_grad_norms": [], "done": Ticket(state + 1)}

    log = MetricsLog(tmp_path / "metrics.jsonl", 0, True, None)
    parts = loop.Parts(
        step=step,
        batch_at=lambda s: None,
        save=lambda s, st: None,
        checkpoint_dir=tmp_path,
        log=log,
        mfu=lambda tps: 0.0,
        tokens_per_step=1,
        context=contextlib.nullcontext,
        progress=False,
    )
    out = loop.run(parts, loop.Cadence(steps=30, log_every=1000, eval_every=1000, checkpoint_every=1000), 0, 0, None)
    log.close()
    assert out.step == 30 and len(queued) == 30
    assert max(queued) == 2  # the next step is always queued behind the running one, never more
