"""``python -m jaxllm.evaluate``: lm-evaluation-harness on jaxllm's forward pass and KV-cache decoding
scores a run as the harness's own ``hf`` backend scores its export, request by request; bad input is
one line and exit 2, with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxllm import evaluate as cli
from jaxllm.core.config import load_config, resolve_model, save_config
from jaxllm.data import tokenizer as tokenizers
from jaxllm.model.transformer import Transformer
from jaxllm.train import checkpoint as ckpt

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra eval")
TASKS_DIR = str(Path(__file__).parent / "data" / "lm_eval_tasks")
TASKS = ["jaxllm_tiny_mc", "jaxllm_tiny_gen", "jaxllm_tiny_ppl"]


def make_run(run_dir: Path, seq_len: int = 48) -> Path:
    """A jaxllm run of a random tiny gpt2 with the byte tokenizer (no training: scores need only weights)."""
    tok = tokenizers.build("byte", [], 0)
    cfg = load_config(None, ["model.n_layer=2", "model.d_model=32", "model.n_head=4", f"train.seq_len={seq_len}"])
    cfg.model = resolve_model(cfg.model, tok.vocab_size, seq_len)
    save_config(cfg, run_dir / "config.yaml")
    tok.save(run_dir)
    params = nn.unbox(jax.jit(Transformer(cfg.model).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    params = jax.tree.map(lambda x: x * 4, params["params"])  # sharper predictions than the init's
    saver = ckpt.Checkpointer(run_dir, keep=1)
    saver.save(1, {"params": params}, {"step": 1})
    saver.close()
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_jaxllm_backend_scores_as_the_hf_backend_on_the_export(run_dir, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="lm_eval's hf backend needs accelerate")
    import jaxllm
    from jaxllm.evals import lm as eval_lm
    from jaxllm.evals import tasks as eval_tasks
    from jaxllm.infer import harness

    code, out, _ = run_cli(capsys, str(run_dir), "--tasks", ",".join(TASKS), "--include-path", TASKS_DIR,
                           "--batch-size", "4", "--out", str(tmp_path / "ours.json"))  # fmt: skip
    assert code == 0 and "jaxllm_tiny_mc" in out and "exact_match" in out
    ours = json.loads((tmp_path / "ours.json").read_text())
    from lm_eval.models.huggingface import HFLM

    jaxllm.load(run_dir).save_hf(tmp_path / "hf")
    hf = HFLM(pretrained=str(tmp_path / "hf"), batch_size=4, device="cpu", dtype="float32")
    manager = eval_tasks.task_manager(TASKS, TASKS_DIR)
    theirs = eval_tasks.evaluate(hf, TASKS, manager, log_samples=True)
    assert eval_tasks.scores(ours) == pytest.approx(eval_tasks.scores(theirs), rel=1e-5)
    _, backend = harness.load(str(run_dir))
    again = eval_tasks.evaluate(eval_lm.JaxllmLM(backend, 4), TASKS, manager, log_samples=True)
    for task in TASKS:
        mine, hfs = again["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in hfs]
        for a, b in zip(mine, hfs, strict=True):
            if task == "jaxllm_tiny_gen":
                assert a["resps"] == b["resps"]  # the same greedy text
                continue
            for (x,), (y,) in zip(a["resps"], b["resps"], strict=True):
                x, y = (x, y) if task == "jaxllm_tiny_ppl" else (x[0], y[0])
                assert x == pytest.approx(y, abs=1e-4)


def test_a_context_longer_than_the_model_is_cut_from_the_left_and_said_once(tmp_path, capsys):
    from jaxllm.evals import lm as eval_lm
    from jaxllm.infer import harness

    _, backend = harness.load(str(make_run(tmp_path, seq_len=16)))
    lm = eval_lm.JaxllmLM(backend, 2)
    long_ctx = "x" * 40
    scores = lm._loglikelihood_tokens([(None, lm.tok_encode(long_ctx), lm.tok_encode(" y"))] * 3)
    tail = lm._loglikelihood_tokens([(None, lm.tok_encode(long_ctx[-15:]), lm.tok_encode(" y"))])
    assert scores[0][0] == pytest.approx(tail[0][0], abs=1e-5)  # the last 17 tokens: 15 of context, 2 scored
    err = capsys.readouterr().err
    assert err.count("truncated") == 1 and len(err.strip().splitlines()) == 1


def _bad_yaml(d: Path) -> str:
    (d / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    return str(d)


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(  # the registry's scan: seconds
            lambda r, d: [r, "--tasks", "no_such_task_anywhere", "--include-path", TASKS_DIR],
            "unknown task",
            marks=pytest.mark.slow,
        ),
        (lambda r, d: [r, "--tasks", "broken", "--include-path", _bad_yaml(d)], "does not parse"),
        (lambda r, d: [str(d), "--tasks", "jaxllm_tiny_mc", "--include-path", TASKS_DIR], "neither a jaxllm run"),
        (lambda r, d: [r, "--tasks", "jaxllm_tiny_mc", "--include-path", TASKS_DIR, "--limit", "0"], "--limit"),
    ],
    ids=["unknown_task", "unparsable_task_file", "not_a_model", "limit_0"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    before = sorted(p.name for p in run_dir.iterdir())
    code, _, err = run_cli(capsys, *args(str(run_dir), tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.slow
def test_a_task_whose_data_set_cannot_be_fetched_is_one_line_before_the_model_loads(run_dir, tmp_path):
    (tmp_path / "hub.yaml").write_text(
        "task: hub_only\ndataset_path: jaxllm-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm.evaluate", str(run_dir), "--tasks", "hub_only", "--include-path", str(tmp_path),
         "--out", str(tmp_path / "r.json")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "could not be fetched" in lines[0], result.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_token_id_only_hugging_face_directory_is_refused(run_dir, tmp_path, capsys):
    import jaxllm

    jaxllm.load(run_dir).save_hf(tmp_path / "hf")
    for name in (tokenizers.FILENAME, tokenizers.SIDE, tokenizers.CONFIG):
        (tmp_path / "hf" / name).unlink()
    code, _, err = run_cli(capsys, str(tmp_path / "hf"), "--tasks", "jaxllm_tiny_mc", "--include-path", TASKS_DIR)
    assert code == 2 and "has no tokenizer.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf" / cli.RESULTS).exists()


def test_without_lm_eval_the_command_says_how_to_install_it(run_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    code, _, err = run_cli(capsys, str(run_dir), "--tasks", "hellaswag")
    assert code == 2 and 'pip install -e ".[eval]"' in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_shipped_local_task_runs_offline_without_the_harness_cli_hint(run_dir, tmp_path, capfd, caplog):
    local = Path(__file__).parents[1] / "configs" / "tasks"
    code = cli.main([str(run_dir), "--tasks", "python_idioms", "--include-path", str(local), "--limit", "3",
                     "--out", str(tmp_path / "r.json")])  # fmt: skip
    out, err = capfd.readouterr()
    results = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and "python_idioms" in out
    assert results["n-samples"]["python_idioms"] == {"original": 24, "effective": 3}
    assert "Custom kwargs" not in err + caplog.text
