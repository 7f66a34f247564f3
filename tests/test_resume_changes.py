"""A resumed run keeps its trajectory: a change of a key that alters it is refused naming the keys,
or, with run.allow_changes=true, accepted and recorded; keys that leave it alone stay free; every
check comes before config.yaml is written; a finished run's rerun reports its own final loss."""

from __future__ import annotations

import hashlib
import shutil

import jax
import pytest
import yaml
from conftest import TINY, corpus_text

import train as train_cli
from jaxllm.core import fileio
from jaxllm.core.config import Config, load_config, to_dict
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.train import run_dir as run_dir_lib
from jaxllm.train import trainer


def one_device():
    return jax.devices()[:1]


def tiny_config(*overrides: str) -> Config:
    """The config a bare ``python train.py OVERRIDES`` runs (its default config file, then these)."""
    return load_config(None, list(overrides), default=str(train_cli.DEFAULT_CONFIG))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4, its arguments without run.dir, and its summary
    (trained once for the module)."""
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "corpus.txt").write_text(corpus_text())
    base = TINY + [f"data.source={tmp / 'corpus.txt'}", f"data.cache_dir={tmp / 'cache'}", "checkpoint.every=2"]
    summary = trainer.train(tiny_config(*base, f"run.dir={tmp / 'run'}", "eval.every=4"), one_device())
    return tmp / "run", base, summary


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run, and ``make(*overrides)``: its config with these changes."""
    shutil.copytree(finished[0], tmp_path / "run")

    def make(*overrides: str) -> Config:
        return tiny_config(*finished[1], f"run.dir={tmp_path / 'run'}", "eval.every=4", *overrides)

    return tmp_path / "run", make


def test_only_keys_that_change_the_trajectory_count_as_changes():
    saved = to_dict(Config())
    cfg = load_config(None, ["optim.lr=1e-2", "train.seed=3", "log.every=7"])
    cfg.mesh.data, cfg.model.remat, cfg.eval.every, cfg.checkpoint.every, cfg.train.steps = 2, True, 9, 9, 9
    changes = run_dir_lib.trajectory_changes(saved, cfg)
    assert changes == {"optim.lr": [Config().optim.lr, 1e-2], "train.seed": [0, 3]}
    cfg.model.dtype, cfg.model.moe.n_experts = "bfloat16", 4  # numerics and nested sections count too
    assert set(run_dir_lib.trajectory_changes(saved, cfg)) == {
        "optim.lr",
        "train.seed",
        "model.dtype",
        "model.moe.n_experts",
    }


@pytest.mark.slow
def test_resume_with_another_lr_seed_or_batch_size_exits_2_naming_the_keys(finished, run, capsys):
    run, _ = run
    before = {p: sha(p) for p in run.rglob("*") if p.is_file()}
    changed = ["optim.lr=1e-2", "train.seed=3", "train.batch_size=16"]  # 16: any device count divides it
    code = train_cli.main([*finished[1], f"run.dir={run}", "eval.every=4", *changed])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "optim.lr" in err and "train.seed" in err and "train.batch_size" in err and "run.allow_changes" in err
    assert {p: sha(p) for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_an_allowed_change_is_recorded_in_metrics_and_the_configs_history(run):
    run, make = run
    trainer.train(make("optim.lr=1e-2", "train.steps=5", "run.allow_changes=true"), one_device())
    records = fileio.read_jsonl(run / "metrics.jsonl")
    change = [r for r in records if "config_changes" in r]
    assert change == [{"step": 4, "config_changes": {"optim.lr": [tiny_config(*TINY).optim.lr, 1e-2]}}]
    history = yaml.safe_load((run / "config.yaml").read_text())["history"]
    assert history == [{"step": 4, "changes": change[0]["config_changes"]}]
    assert load_config(str(run / "config.yaml")).optim.lr == 1e-2  # the history is no config key


@pytest.mark.slow
def test_keys_that_leave_the_trajectory_alone_resume_freely(run):
    run, make = run
    summary = trainer.train(make("log.every=2", "eval.batches=1", "checkpoint.every=1", "train.steps=5"), one_device())
    assert (summary["start_step"], summary["step"]) == (4, 5)


@pytest.mark.slow
def test_a_damaged_metrics_file_is_refused_before_config_yaml_is_written(run):
    run, make = run
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    before = sha(run / "config.yaml")
    with pytest.raises(UserError):
        trainer.train(make("eval.every=2"), one_device())  # a free change: config.yaml would differ
    assert sha(run / "config.yaml") == before


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_its_final_eval_loss(finished, run):
    summary = trainer.train(run[1](), one_device())
    assert summary["step"] == summary["start_step"] == 4
    assert summary["eval_loss"] == finished[2]["eval_loss"]
    assert summary["loss"] == finished[2]["loss"]


def test_refusal_names_the_keys_in_one_line(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-2", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"optim\.lr: {Config().optim.lr!r} vs 0\.01") as e:
        run_dir_lib.check_resume(tmp_path, to_dict(Config()), cfg)
    assert "\n" not in str(e.value)
    cfg.run.allow_changes = True
    assert set(run_dir_lib.check_resume(tmp_path, to_dict(Config()), cfg)) == {"optim.lr"}
