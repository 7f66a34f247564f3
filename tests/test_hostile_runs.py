"""Damaged run directories handed to train.py and sft.py: a ``checkpoints`` that is a file, a file
under a step's name among the checkpoints. Each is refused in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from hostile_kit import Case, W, check_case, make_base, params, snapshot

from jaxllm.core.config import SFTConfig, load_config, save_config
from jaxllm.core.errors import ConfigError
from jaxllm.train import run_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("hostile_runs_base"))


def checkpoints_a_file(run: Path) -> None:
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "checkpoints").write_text("notes the user keeps here\n")


def step_a_file(step: int):
    def damage(run: Path) -> None:
        run.mkdir(exist_ok=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / str(step)).write_text("notes the user keeps here\n")

    return damage


def as_finetuning_run(w: W, damage):
    """``damage`` on a fine-tuning run directory of ``w.sft()``'s own config (its sft.yaml written)."""

    def make(run: Path) -> None:
        run.mkdir()
        save_config(load_config(str(ROOT / "configs" / "sft_tiny.yaml"), w.sft(), cls=SFTConfig), run / "sft.yaml")
        damage(run)

    return make


def damaged(w: W, damage) -> W:
    damage(w.run)
    return w


CASES = [
    Case(
        "train_checkpoints_a_file",
        "train",
        lambda w: damaged(w, checkpoints_a_file).train(),
        "holds a file named checkpoints where its checkpoints folder belongs",
    ),
    Case(
        "train_checkpoint_step_a_file",
        "train",
        lambda w: damaged(w, step_a_file(4)).train(),  # step 4: the final checkpoint of TINY's 4 steps
        "checkpoints/4 is a file, not a checkpoint: saving step 4 would replace it",
    ),
    Case(
        "sft_checkpoints_a_file",
        "sft",
        lambda w: damaged(w, as_finetuning_run(w, checkpoints_a_file)).sft(),
        "holds a file named checkpoints where its checkpoints folder belongs",
    ),
    Case(
        "sft_checkpoint_step_a_file",
        "sft",
        lambda w: damaged(w, as_finetuning_run(w, step_a_file(2))).sft(),  # the last of w.sft()'s 2 steps
        "checkpoints/2 is a file, not a checkpoint: saving step 2 would replace it",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_a_damaged_run_directory_is_refused_in_one_line_and_left_unchanged(case, base, tmp_path, capfd):
    check_case(case, W(tmp_path, base), capfd)


def test_a_file_among_real_step_folders_is_named_and_kept(tmp_path):
    for step in (100, 300):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "200").write_text("notes")
    with pytest.raises(ConfigError, match=r"checkpoints/200 is a file, not a checkpoint"):
        run_dir.check_checkpoints(tmp_path)
    assert (tmp_path / "checkpoints" / "200").read_text() == "notes"


def test_step_folders_and_files_under_other_names_pass(tmp_path):
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    (tmp_path / "checkpoints" / "README").write_text("what these are")
    run_dir.check_checkpoints(tmp_path)
    run_dir.check_checkpoints(tmp_path / "new")


def test_train_py_with_checkpoints_a_file_exits_at_once(base, tmp_path):
    """The process ends (exit 2, one line) rather than training, writing and never exiting."""
    w = W(tmp_path, base)
    checkpoints_a_file(w.run)
    before = snapshot(w.tmp)
    out = run_cli("train.py", *w.train(), timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "holds a file named checkpoints" in out.stderr
    assert snapshot(w.tmp) == before
