"""The depth study trains every variant at every depth and writes its table and figures."""

from __future__ import annotations

import csv
import fcntl
import json

import jax
import pytest
from conftest import TINY

import scaling
from jaxllm.core.config import load_config
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.scaling.depth import VARIANTS, DepthConfig, depth_plan, layer_norms, parse_layers, run_study, write_outputs

PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_crosses_every_depth_with_residual_and_norm_position():
    cfg = load_config(None, ["depth.layers=8,2,4"], cls=DepthConfig)
    runs = depth_plan(cfg)
    assert [r.n_layer for r in runs] == [2] * 4 + [4] * 4 + [8] * 4
    assert {(r.variant.residual, r.variant.norm_position) for r in runs} == {
        (True, "pre"),
        (True, "post"),
        (False, "pre"),
        (False, "post"),
    }


def test_layers_must_be_positive_counts():
    with pytest.raises(ConfigError, match="positive"):
        parse_layers("0,2")
    with pytest.raises(ConfigError, match="separated by commas"):
        parse_layers("2;4")


def test_layer_norms_average_the_early_logged_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0, "layer_grad_norms": [float(s), 2.0 * s]} for s in range(1, 11)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records + [{"step": 10, "eval_loss": 1.0}]))
    norms = layer_norms(path)
    assert norms["grad_early"] == [1.5, 3.0]  # the first 20% of 10 logged steps: steps 1 and 2
    assert norms["grad_last"] == [10.0, 20.0]


@pytest.mark.slow
def test_study_writes_csv_json_and_figures_with_per_layer_norms(tmp_path, corpus):
    overrides = [
        f"data.source={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=6",
        "log.every=2",
        "depth.layers=2",
    ]
    cfg = load_config(None, TINY + overrides, cls=DepthConfig)
    runs = depth_plan(cfg)[::3]  # pre-LN with residuals and post-LN without: two runs keep the test short
    rows = run_study(cfg, runs, tmp_path / "depth", devices=jax.devices()[:1])
    paths = write_outputs(rows, tmp_path / "depth")
    with (tmp_path / "depth" / "depth.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [VARIANTS[0].name, VARIANTS[3].name]
    assert all(len(r["grad_early"]) == 2 for r in rows)
    assert all(float(r["loss"]) > 0 for r in table)
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG


def test_a_second_study_into_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    cfg = load_config(None, ["depth.layers=2"], cls=DepthConfig)
    out = tmp_path / "depth"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # what the first study (or a sweep) holds while it trains
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"another depth study is writing to {out}"):
            run_study(cfg, depth_plan(cfg), out)
        assert not (out / "runs").exists()  # refused before writing anything


def test_unknown_override_key_exits_2_with_one_line(tmp_path, capsys):
    assert scaling.main(["depth", "depth.layer=2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "depth.layer" in err
    assert not any(tmp_path.iterdir())
