"""``eval.tasks``: a training run scores lm-evaluation-harness tasks on its own parameters at each
evaluation, into metrics.jsonl and TensorBoard, the very scores ``python -m jaxllm.evaluate`` gives on
the saved run; without lm_eval, or with a task file that does not parse, it refuses before training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra eval")

from test_evaluate import TASKS, TASKS_DIR, make_run

from jaxllm import evaluate as cli
from jaxllm.core.config import SFTConfig, load_config
from jaxllm.evals import during_training
from jaxllm.evals import tasks as eval_tasks
from jaxllm.sft.finetune import finetune
from jaxllm.train.trainer import train

LIMIT = 3


def task_keys(run_dir: Path, out: Path, capsys) -> dict[str, float]:
    """``jaxllm.evaluate``'s scores of the saved run, as the training records name them."""
    assert cli.main([str(run_dir), "--tasks", ",".join(TASKS), "--include-path", TASKS_DIR, "--limit", str(LIMIT),
                     "--batch-size", "8", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    return {during_training.PREFIX + k: v for k, v in eval_tasks.scores(json.loads(out.read_text())).items()}


def recorded(run_dir: Path) -> dict[str, float]:
    """The task scores of the run's last evaluation record."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if any(k.startswith(during_training.PREFIX) for k in r)]
    assert scored, "no evaluation record holds task scores"
    return {k: v for k, v in scored[-1].items() if k.startswith(during_training.PREFIX)}


def declared_metrics() -> set[str]:
    """``task/metric`` for every metric the task files' ``metric_list`` names."""
    names = set()
    for task in TASKS:
        text = (Path(TASKS_DIR) / f"{task}.yaml").read_text()
        names |= {f"{task}/{m}" for m in re.findall(r"- metric: (\w+)", text)}
    return names


TASK_KEYS = [
    f"eval.tasks={','.join(TASKS)}",
    f"eval.tasks_include_path={TASKS_DIR}",
    f"eval.tasks_limit={LIMIT}",
    "eval.tasks_batch_size=8",
]


@pytest.mark.slow
def test_a_training_run_records_the_scores_jaxllm_evaluate_gives_on_the_saved_run(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(*TASK_KEYS, "eval.every=4", "log.tensorboard=true")
    train(cfg)
    ours = recorded(Path(cfg.run.dir))
    assert {k.split("/")[1] for k in ours} == set(TASKS)
    assert {k.split("/", 1)[1] for k in ours} == declared_metrics()  # no counts, no standard errors
    assert ours == pytest.approx(task_keys(Path(cfg.run.dir), tmp_path / "results.json", capsys), rel=1e-5)
    events = b"".join(p.read_bytes() for p in (Path(cfg.run.dir) / "tb").iterdir())
    assert all(k.encode() in events for k in ours)  # TensorBoard's scalars beside the eval loss


@pytest.mark.slow
def test_a_fine_tuning_run_records_the_scores_of_its_merged_model(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    base = make_run(tmp_path / "base", seq_len=32)
    run_dir = tmp_path / "sft"
    overrides = [f"init.from={base}", f"run.dir={run_dir}", "sft.method=lora", "sft.n_train=20", "sft.n_eval=4",
                 "sft.max_new_tokens=4", "train.seq_len=32", "train.steps=2", "train.batch_size=8", "eval.every=2",
                 "log.progress=false", "log.tensorboard=false", *TASK_KEYS]  # fmt: skip
    finetune(load_config(None, overrides, cls=SFTConfig))
    ours = recorded(run_dir)
    assert ours == pytest.approx(task_keys(run_dir, tmp_path / "results.json", capsys), rel=1e-5)


def _broken_tasks(d: Path) -> str:
    (d / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    return str(d)


@pytest.mark.parametrize(
    "without_lm_eval, include, message",
    [(True, lambda d: TASKS_DIR, 'pip install -e ".[eval]"'), (False, _broken_tasks, "does not parse")],
    ids=["lm_eval_missing", "unparsable_task_file"],
)
def test_bad_eval_tasks_are_refused_before_training(tiny_cfg, tmp_path, monkeypatch, without_lm_eval, include, message):
    from jaxllm.core.errors import UserError

    if without_lm_eval:
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    cfg = tiny_cfg("eval.tasks=jaxllm_tiny_mc,broken", f"eval.tasks_include_path={include(tmp_path)}")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")) as e:
        train(cfg)
    assert "\n" not in str(e.value) and not Path(cfg.run.dir).exists()
