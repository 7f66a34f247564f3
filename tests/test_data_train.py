"""Training on prepared data: a mixture with document masks trains, says how many epochs of each
source it has read, and the prefetch thread changes nothing but the timing."""

from __future__ import annotations

import json

import jax
import pytest
from conftest import TINY, corpus_text

from jaxllm.core.config import load_config
from jaxllm.data import corpus as data_lib
from jaxllm.data.prepare import prepare
from jaxllm.train import trainer


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    (root / "a.txt").write_text(corpus_text())
    (root / "b").mkdir()
    for i in range(200):  # a folder of short documents: end ids inside most windows
        (root / "b" / f"{i:03d}.txt").write_text(f"document {i} " + "lorem ipsum " * (i % 4))
    for name in ("a.txt", "b"):
        prepare(
            [str(root / name)],
            str(root / f"prepared_{name}"),
            tokenizer="byte",
            val_fraction=0.2,
            workers=1,
            progress=False,
        )
    return root / "prepared_a.txt", root / "prepared_b"


def run(tmp_path, name, *overrides):
    cfg = load_config(None, TINY + [f"run.dir={tmp_path / name}", "train.steps=3", *overrides])
    summary = trainer.train(cfg, jax.devices()[:1])
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if "loss" in r]


def test_a_masked_mixture_trains_and_records_epochs_and_prefetch_changes_nothing(tmp_path, two_sources):
    a, b = two_sources
    common = [f"data.mixture=0.75:{a},0.25:{b}", "data.document_mask=true", "eval.every=3"]
    ahead, rows = run(tmp_path, "ahead", *common, "data.prefetch=2")
    when_due, rows_due = run(tmp_path, "due", *common, "data.prefetch=0")
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_due]  # bitwise
    assert ahead["eval_loss"] == when_due["eval_loss"]
    epochs = rows[-1]["epochs"]
    assert set(epochs) == {str(a), str(b)}
    data = data_lib.load(load_config(None, TINY + common).data, seq_len=16, seed=0)
    n_windows = {src.name: n for src, n in zip(data.sources, data.n_windows)}
    rows_read = 3 * 8  # steps x batch
    total = sum(epochs[k] * n_windows[k] for k in epochs)
    assert total == pytest.approx(rows_read)
    assert epochs[str(a)] * n_windows[str(a)] == pytest.approx(0.75 * rows_read, abs=3)


def test_document_mask_changes_the_loss_of_windows_that_span_documents(tmp_path, two_sources):
    _, b = two_sources
    masked, _ = run(tmp_path, "masked", f"data.source={b}", "data.document_mask=true", "eval.every=3")
    plain, _ = run(tmp_path, "plain", f"data.source={b}", "eval.every=3")
    assert masked["eval_loss"] != plain["eval_loss"]


def test_document_mask_with_a_pipeline_is_refused(tmp_path, two_sources, capsys):
    import train

    a, _ = two_sources
    args = TINY + [f"data.source={a}", "data.document_mask=true", "mesh.pipe=2", f"run.dir={tmp_path / 'run'}"]
    assert train.main(args) == 2
    assert "data.document_mask=true is not supported with mesh.pipe > 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
