"""The one-line error contract for scaling.py: bad arguments and hostile fit.json files exit 2 with
one line and change no file (no half-written forecast folder); no command writes into a folder that
holds another kind of run; every budget is bounded before any work; and what predict and forecast
print is finite, with a warning where a forecast goes below the corpus's known entropy rate."""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY, corpus_text
from hostile_kit import MAINS, Case, W, check_case, params

from jaxllm.core.config import load_config, to_dict
from jaxllm.core.fileio import write_json
from jaxllm.scaling import laws as sl
from jaxllm.scaling import report as rl
from jaxllm.scaling.sweep import SweepConfig

LAW = sl.ChinchillaLaw(E=1.0, A=10.0, B=10.0, alpha=0.5, beta=0.5)  # N_opt = (C / 6)^0.5


def make_sweep(folder, entropy_rate=None, **law_values) -> None:
    """A sweep folder as `scaling.py sweep --fit` leaves it (sweep.json, results.csv, fit.json), its
    fit a known law (``law_values`` replace stored values, verbatim) and draws around it."""
    folder.mkdir()
    (folder / "corpus.txt").write_text(corpus_text()[:4000])
    sweep = ["model.n_layer=1", "train.seq_len=16", "train.batch_size=4", "sweep.shapes=1x8,1x16,1x32"]
    cfg = load_config(None, [*sweep, "sweep.budgets=1e8,2e8", f"data.source={folder / 'corpus.txt'}"], cls=SweepConfig)
    write_json(folder / "sweep.json", {"config": to_dict(cfg), "entropy_rate": entropy_rate})
    rows = [(n, c / (6 * n), c) for c in (1e8, 2e8) for n in (5e3, 1e4, 2e4)]
    csv = "".join(f"{n},{d},{c},{float(LAW.loss(n, d))}\n" for n, d, c in rows)
    (folder / "results.csv").write_text("N,D,C,loss\n" + csv)
    approach3 = {k: {"value": law_values.get(k, getattr(LAW, k))} for k in rl.LAW_KEYS}
    draws = {k: [getattr(LAW, k) * s for s in (0.98, 1.0, 1.02)] for k in rl.LAW_KEYS}
    draws.update(law_values.pop("draws", {}))
    fit = {"data": {"csv": str(folder / "results.csv")}, "approach3": {**approach3, "bootstrap_draws": draws}}
    (folder / "fit.json").write_text(json.dumps(fit))  # json, not write_json: NaN must reach the file


def with_sweep(**law_values):
    """``args(w)`` maker: a sweep folder ``w.tmp/s`` of ``law_values``, then ``make(w, fit.json)``."""

    def wrap(make):
        def args(w: W) -> list[str]:
            make_sweep(w.tmp / "s", **law_values)
            return make(w, str(w.tmp / "s" / "fit.json"))

        return args

    return wrap


def training_run(w: W) -> str:
    """A folder holding what a training run leaves: config.yaml, metrics.jsonl, checkpoints/."""
    run = w.tmp / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {steps: 4}\n")
    (run / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0}\n')
    return str(run)


def predict(fit: str, compute: str = "1e9") -> list[str]:
    return ["predict", "--fit", fit, "--compute", compute]


def forecast(fit: str, *extra: str) -> list[str]:
    return ["forecast", "--fit", fit, "--compute", "5e8", *extra]


CASES = [
    Case("fit_missing_csv", "scaling", lambda w: ["fit", str(w.tmp / "absent.csv")], "no such file"),
    Case("unknown_command", "scaling", lambda w: ["fly"], "invalid choice"),
    Case(
        "sweep_lr_nan",
        "scaling",
        lambda w: ["sweep", "optim.lr=nan", "--out", str(w.tmp / "out")],
        "optim.lr must be a finite number",
    ),
    # ---- fit.json values
    Case("predict_fit_nan", "scaling", with_sweep(alpha=math.nan)(lambda w, f: predict(f)), "alpha is nan"),
    Case("forecast_fit_nan", "scaling", with_sweep(E=math.inf)(lambda w, f: forecast(f)), "E is inf"),
    Case("predict_negative_exponent", "scaling", with_sweep(beta=-0.5)(lambda w, f: predict(f)), "beta = -0.5"),
    Case("forecast_negative_exponent", "scaling", with_sweep(alpha=-1)(lambda w, f: forecast(f)), "outside"),
    Case("forecast_string_value", "scaling", with_sweep(A="10")(lambda w, f: forecast(f)), "A is '10'"),
    Case("forecast_boolean_value", "scaling", with_sweep(B=True)(lambda w, f: forecast(f)), "B is True"),
    Case(
        "forecast_string_draw",
        "scaling",
        with_sweep(draws={"E": ["x", 1.0, 1.0]})(lambda w, f: forecast(f)),
        "a bootstrap draw is 'x'",
    ),
    # ---- fit arguments
    Case(
        "fit_entropy_rate_negative",
        "scaling",
        with_sweep()(lambda w, f: ["fit", str(w.tmp / "s" / "results.csv"), "--entropy-rate", "-1"]),
        "--entropy-rate must be a loss in nats/token > 0, got -1",
    ),
    Case(
        "fit_entropy_rate_above_every_loss",
        "scaling",
        with_sweep()(lambda w, f: ["fit", str(w.tmp / "s" / "results.csv"), "--entropy-rate", "5", "--fix-E"]),
        "is at or above the lowest loss",
    ),
    # ---- budgets bounded before any work
    Case(
        "forecast_compute_1e40",
        "scaling",
        with_sweep()(lambda w, f: ["forecast", "--fit", f, "--compute", "1e40"]),
        "beyond train.steps' limit",
    ),
    # ---- folders: never another kind of run's
    Case("forecast_out_a_file", "scaling", with_sweep()(lambda w, f: forecast(f, "--out", f)), "is a file"),
    Case(
        "forecast_into_a_training_run",
        "scaling",
        with_sweep()(lambda w, f: forecast(f, "--out", training_run(w))),
        "holds a training run, not a forecast",
    ),
    Case(
        "forecast_into_the_sweep",
        "scaling",
        with_sweep()(lambda w, f: forecast(f, "--out", str(w.tmp / "s"))),
        "holds a sweep, not a forecast",
    ),
    Case(
        "fit_into_a_training_run",
        "scaling",
        with_sweep()(lambda w, f: ["fit", str(w.tmp / "s" / "results.csv"), "--out", training_run(w)]),
        "holds a training run, not a fit",
    ),
    Case(
        "sweep_into_a_training_run",
        "scaling",
        lambda w: ["sweep", *TINY[:2], "--out", training_run(w)],
        "holds a training run, not a sweep",
    ),
    Case(
        "depth_into_a_sweep",
        "scaling",
        with_sweep()(lambda w, f: ["depth", "--out", str(w.tmp / "s")]),
        "holds a sweep, not a depth study",
    ),
    Case(
        "train_into_a_sweep",
        "train",
        with_sweep()(lambda w, f: [*TINY, f"data.source={w.tmp / 's' / 'corpus.txt'}", f"run.dir={w.tmp / 's'}"]),
        "holds a sweep, not a training run",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_scaling_input_exits_2_with_one_line_and_changes_no_file(case, tmp_path, capfd):
    (tmp_path / "base").mkdir()
    check_case(case, W(tmp_path, tmp_path / "base"), capfd)


def test_predict_prints_strict_json(tmp_path, capfd):
    make_sweep(tmp_path / "s")
    assert MAINS["scaling"](predict(str(tmp_path / "s" / "fit.json"), "1e12")) == 0
    out = json.loads(capfd.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in predict's JSON"))
    assert out["N_opt"] == pytest.approx(float(LAW.optimal_N(1e12)))


def test_a_forecast_below_the_known_entropy_rate_says_so(tmp_path, capfd):
    make_sweep(tmp_path / "s", entropy_rate=1.5)  # the law's E is 1.0: its forecasts all lie below 1.5
    assert MAINS["scaling"](forecast(str(tmp_path / "s" / "fit.json"), "--out", str(tmp_path / "f"))) == 0
    warning = [line for line in capfd.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "below the corpus's entropy rate 1.5000" in warning[0]
    assert json.loads((tmp_path / "f" / "forecast.json").read_text())["entropy_rate"] == 1.5


def test_a_forecast_above_the_known_entropy_rate_warns_of_nothing(tmp_path, capfd):
    make_sweep(tmp_path / "s", entropy_rate=0.5)
    assert MAINS["scaling"](forecast(str(tmp_path / "s" / "fit.json"), "--out", str(tmp_path / "f"))) == 0
    assert "warning" not in capfd.readouterr().out
