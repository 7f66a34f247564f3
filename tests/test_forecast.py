"""Forecasts: from a sweep's fit, the run a larger budget asks for, its loss with an interval, and the score."""

from __future__ import annotations

import importlib.util
import json
import math

import jax
import numpy as np
import pytest
from conftest import ROOT

from jaxllm.core.config import ModelConfig, load_config, to_dict
from jaxllm.core.fileio import write_json
from jaxllm.model import flops
from jaxllm.scaling import forecast
from jaxllm.scaling import laws as sl
from jaxllm.scaling import report as rl
from jaxllm.scaling.sweep import Shape, SweepConfig, parse_shapes, shape_model, vocab_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
spec = importlib.util.spec_from_file_location("scaling_cli", ROOT / "scaling.py")
scaling_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling_cli)

# A law of the size of the known-entropy sweep's (configs/scaling_markov.yaml): one-layer models of
# 1k-200k parameters, budgets 1e10-1e12 FLOPs, losses from ~3.1 down towards E.
LAW = sl.ChinchillaLaw(E=2.35, A=60.0, B=900.0, alpha=0.5, beta=0.42)
LADDER = parse_shapes("1x8,1x16,1x24,1x32,1x48,1x64,1x96,1x128")
BUDGETS = [1e10, 3e10, 1e11, 3e11, 1e12]
TOKENS_PER_STEP = 32 * 64


def count(shape: Shape) -> int:
    """N of the FLOP count for a 64-symbol, 64-position model of ``shape``."""
    return flops.param_counts(shape_model(ModelConfig(), shape, 64, 64))["matmul"]


def sweep_runs(law: sl.ChinchillaLaw, noise: float, seed: int) -> sl.Runs:
    """5 sizes per budget from N_opt/4 to 4 N_opt, D = C / 6N, final losses with lognormal noise."""
    rng = np.random.default_rng(seed)
    C = np.repeat(BUDGETS, 5)
    N = law.optimal_N(C) * np.tile(np.logspace(-0.6, 0.6, 5), len(BUDGETS))
    D = C / (6 * N)
    return sl.make_runs(N=N, D=D, loss=law.loss(N, D) * np.exp(rng.normal(0, noise, len(N))))


@pytest.mark.slow
def test_forecast_at_10x_the_largest_budget_covers_the_true_loss_of_its_run():
    runs = sweep_runs(LAW, noise=0.003, seed=0)  # seed noise of ~0.3%, as the CPU sweeps show
    settings = rl.FitSettings(csv="synthetic.csv", columns={}, resamples=12, starts="coarse")
    fit, found, draws = rl.fit_with_intervals(runs, settings)
    report = json.loads(json.dumps(rl.fit_report(fit, found, draws, runs, settings)))  # as fit.json holds it
    law, _ = rl.laws_from_report(report, "fit.json")
    p = forecast.plan(law, rl.approach3_draws(report, "fit.json"), 10 * max(BUDGETS), LADDER, count, TOKENS_PER_STEP)
    low, high = p.ci95
    truth = float(LAW.loss(p.N, p.D))
    assert low <= truth <= high
    assert high - low < 0.05 * truth  # narrow enough to be a forecast


def test_the_run_has_the_N_and_D_that_N_opt_and_D_opt_ask_for_within_the_rounding_of_shapes():
    for C in (1e11, 1e13, 1e17):  # N_opt inside the ladder, then past its largest model (the family extended)
        p = forecast.plan(LAW, [LAW], C, LADDER, count, TOKENS_PER_STEP)
        sizes = sorted(count(s) for s in forecast.shape_family(LADDER, count, p.N_opt))
        below = max((n for n in sizes if n <= p.N_opt), default=sizes[0])
        above = min((n for n in sizes if n >= p.N_opt), default=sizes[-1])
        assert p.N in (below, above)
        assert abs(math.log(p.N / p.N_opt)) <= min(abs(math.log(below / p.N_opt)), abs(math.log(above / p.N_opt)))
        assert p.N == count(p.shape) and p.shape.d_model % 8 == 0 and p.shape.n_layer == 1
        assert abs(p.D - C / (6 * p.N)) <= TOKENS_PER_STEP / 2  # D = C / 6N = D_opt N_opt / N, to whole steps
    assert p.shape.d_model > max(s.d_model for s in LADDER)


def test_the_family_continues_the_largest_shape_of_the_ladder_one_head_wider_at_a_time():
    ladder = [Shape(2, 16), Shape(4, 32), Shape(3, 24)]
    family = forecast.shape_family(ladder, count, count(Shape(4, 64)))
    assert family == ladder + [Shape(4, 40), Shape(4, 48), Shape(4, 56), Shape(4, 64)]
    assert forecast.shape_family(ladder, count, 10.0) == ladder


def test_the_family_fills_the_ladders_gaps_one_head_wider_at_a_time_at_the_smaller_rungs_depth():
    ladder = [Shape(1, 96), Shape(1, 128), Shape(3, 32), Shape(2, 64)]
    family = forecast.shape_family(ladder, count, 10.0)
    assert family[:4] == ladder
    assert set(family[4:]) == {Shape(3, 40), Shape(3, 48), Shape(1, 104), Shape(1, 112), Shape(1, 120)}
    # only shapes between the two rungs in N: 3x56 outgrows 2x64, and 2x72 outgrows 1x96
    assert count(Shape(3, 56)) > count(Shape(2, 64)) and count(Shape(2, 72)) > count(Shape(1, 96))


def test_a_run_between_two_rungs_is_within_half_a_head_step_of_N_opt_not_the_rungs_gap():
    C = 1.5e14  # N_opt ~ 8e4, between the ladder's 1x64 (53k) and 1x96 (117k)
    p = forecast.plan(LAW, [LAW], C, LADDER, count, TOKENS_PER_STEP)
    assert count(Shape(1, 64)) < p.N_opt < count(Shape(1, 96))
    step = math.log(count(Shape(1, p.shape.d_model + 8)) / count(Shape(1, p.shape.d_model - 8))) / 2
    assert abs(math.log(p.N / p.N_opt)) <= step / 2 + 1e-9
    assert p.shape not in LADDER


# --- the command, on a tiny sweep ----------------------------------------------------------------------

TINY_SWEEP = [
    "train.seq_len=16",
    "train.batch_size=8",
    "eval.batches=2",
    "log.every=5",
    "optim.warmup_steps=2",
    "sweep.shapes=1x16,2x16,1x32,3x16,2x32",
    "sweep.budgets=1e8,2e8",
]
# N_opt = (C / 6)^0.5: about 9k parameters at the 5e8 FLOPs forecast, the ladder's small end.
TINY_LAW = sl.ChinchillaLaw(E=1.0, A=10.0, B=10.0, alpha=0.5, beta=0.5)


@pytest.fixture
def tiny_sweep(tmp_path, corpus):
    """A sweep folder as `scaling.py sweep --fit` leaves it: sweep.json, results.csv and fit.json (here a
    known law and bootstrap draws around it, not a fit)."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    cfg = load_config(
        None, TINY_SWEEP + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"], cls=SweepConfig
    )
    write_json(folder / "sweep.json", {"config": to_dict(cfg)})
    N = np.array([5e3, 1e4, 2e4] * 2)
    C = np.repeat([1e8, 2e8], 3)
    rows = [f"{n},{c / (6 * n)},{c},{float(TINY_LAW.loss(n, c / (6 * n)))}" for n, c in zip(N, C)]
    (folder / "results.csv").write_text("N,D,C,loss\n" + "\n".join(rows) + "\n")
    scale = np.linspace(0.98, 1.02, 9)
    draws = {k: list(getattr(TINY_LAW, k) * scale) for k in rl.LAW_KEYS}
    approach3 = {k: {"value": getattr(TINY_LAW, k), "ci95": None} for k in rl.LAW_KEYS}
    write_json(
        folder / "fit.json",
        {"data": {"csv": str(folder / "results.csv")}, "approach3": {**approach3, "bootstrap_draws": draws}},
    )
    return folder


@pytest.mark.slow
def test_forecast_writes_a_config_that_trains_and_scores_it(tiny_sweep):
    f = forecast.prepare(tiny_sweep / "fit.json", 5e8, None)
    result = forecast.train_run(f, devices=jax.devices()[:1])
    paths = forecast.write(f, forecast.document(f, result))
    doc = json.loads((f.out / "forecast.json").read_text())
    assert {"compute", "config", "predicted", "actual"} <= doc.keys() and doc["compute"] == 5e8
    assert load_config(str(f.out / "config.yaml")) == f.run_cfg  # train.py runs it as planned
    trained = json.loads((f.out / "runs" / doc["run"]["name"] / "result.json").read_text())["config"]
    assert (trained["model"]["n_layer"], trained["model"]["d_model"]) == (f.plan.shape.n_layer, f.plan.shape.d_model)
    assert trained["train"]["steps"] == f.plan.steps
    cfg = f.sweep.cfg
    assert f.plan.N == flops.param_counts(shape_model(cfg.model, f.plan.shape, vocab_size(cfg), 16))["matmul"]
    loss = doc["actual"]["loss"]
    assert loss < math.log(256)  # it learned: below a uniform guess over bytes
    assert doc["actual"]["relative_error"] == pytest.approx((doc["predicted"]["loss"] - loss) / loss)
    assert paths[-1].read_bytes()[:8] == PNG_MAGIC


def forecast_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = scaling_cli.main(["forecast", *args])
    return code, capsys.readouterr().err.splitlines()


def test_a_budget_at_or_below_the_sweeps_smallest_exits_2_with_one_line(tiny_sweep, capsys):
    code, err = forecast_cli(capsys, "--fit", str(tiny_sweep / "fit.json"), "--compute", "1e8")
    assert code == 2 and len(err) == 1 and "smallest budget" in err[0]
    assert not (tiny_sweep / "forecast-C1e08").exists()


def test_a_fit_without_approach_3_exits_2_with_one_line(tiny_sweep, capsys):
    report = json.loads((tiny_sweep / "fit.json").read_text())
    del report["approach3"]
    write_json(tiny_sweep / "fit.json", report)
    code, err = forecast_cli(capsys, "--fit", str(tiny_sweep / "fit.json"), "--compute", "1e9")
    assert code == 2 and len(err) == 1 and "approach3" in err[0]


def test_a_missing_fit_file_exits_2_with_one_line(tmp_path, capsys):
    code, err = forecast_cli(capsys, "--fit", str(tmp_path / "fit.json"), "--compute", "1e9")
    assert code == 2 and err == [f"error: fit file {tmp_path / 'fit.json'} not found"]
