"""Scaling-law fits recover the laws that generated their data; the CLI turns bad input into one line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

import scaling as scaling_cli
from jaxllm.core.errors import ConfigError
from jaxllm.scaling import laws as sl
from jaxllm.scaling.bootstrap import bootstrap_allocation
from jaxllm.scaling.csv_io import load_runs
from jaxllm.scaling.report import FitSettings

CHINCHILLA_CSV = SHARED_DATA / "chinchilla_epoch_svg_extracted.csv"
needs_shared = pytest.mark.skipif(
    not CHINCHILLA_CSV.is_file(), reason=f"{CHINCHILLA_CSV} is absent (the ../shared checkout)"
)
CHINCHILLA_COLUMNS = ["--params-column", "Model Size", "--flops-column", "Training FLOP"]
# The Chinchilla paper's fit (approach 3), used as the law to recover.
PAPER_LAW = sl.ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def isoflop_sweep(law: sl.ChinchillaLaw, seed: int, noise: float) -> sl.Runs:
    """10 budgets from 1e18 to 1e22 FLOPs, 12 model sizes each from N_opt/10 to 10 N_opt, lognormal noise."""
    rng = np.random.default_rng(seed)
    C = np.repeat(np.logspace(18, 22, 10), 12)
    N = law.optimal_N(C) * np.tile(np.logspace(-1, 1, 12), 10)
    D = C / (6 * N)
    return sl.make_runs(N=N, D=D, loss=law.loss(N, D) * np.exp(rng.normal(0, noise, len(N))))


def scaling(*args: str) -> subprocess.CompletedProcess:
    """``python scaling.py ARGS`` run in-process (its ``main``): the exit status and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = scaling_cli.main(list(args))
        except SystemExit as e:  # argparse's --help
            code = e.code
    return subprocess.CompletedProcess(["scaling.py", *args], code, out.getvalue(), err.getvalue())


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_approach3_recovers_known_law_parameters_within_5_percent():
    # 0.1% noise: A and B move ~20x as much as alpha and beta (d ln A ~ ln N d alpha), so noise
    # much larger than this leaves them undetermined by 120 runs, by any fit.
    runs = isoflop_sweep(PAPER_LAW, seed=0, noise=0.001)
    law, _ = sl.fit_chinchilla(runs, sl.BOOTSTRAP_STARTS)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(PAPER_LAW, name), rel=0.05), name


def test_approach3_with_E_fixed_recovers_the_other_parameters_and_keeps_E():
    runs = isoflop_sweep(PAPER_LAW, seed=0, noise=0.001)
    law, _ = sl.fit_chinchilla(runs, sl.BOOTSTRAP_STARTS, E=PAPER_LAW.E)
    assert law.E == pytest.approx(PAPER_LAW.E, rel=1e-12)
    for name in ("A", "B", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(PAPER_LAW, name), rel=0.05), name
    wrong, _ = sl.fit_chinchilla(runs, sl.BOOTSTRAP_STARTS, E=0.9 * PAPER_LAW.E)  # E is not refitted
    assert wrong.E == pytest.approx(0.9 * PAPER_LAW.E, rel=1e-12)


def test_fixing_E_without_a_known_entropy_rate_is_refused():
    with pytest.raises(ConfigError, match="--entropy-rate"):
        FitSettings(csv="r.csv", columns={}, fix_E=True)
    assert FitSettings(csv="r.csv", columns={}, fix_E=True, entropy_rate=2.0).fixed_E == 2.0


def test_approach3_optimal_N_minimises_the_law_at_fixed_compute():
    C = 1e21
    N = np.geomspace(1e8, 1e11, 20001)
    brute_force = N[np.argmin(PAPER_LAW.loss(N, C / (6 * N)))]
    assert PAPER_LAW.optimal_N(C) == pytest.approx(brute_force, rel=1e-3)
    assert PAPER_LAW.a == pytest.approx(0.28 / 0.62)


def test_approach2_recovers_known_exponents_from_isoflop_parabolas():
    a_true, k = 0.46, 0.08  # N_opt = k C^a, so D_opt = C / (6 k C^a) ~ C^(1-a)
    rng = np.random.default_rng(1)
    budgets = np.logspace(18, 21, 7)
    C = np.repeat(budgets, 9) * 10 ** rng.uniform(-0.02, 0.02, 63)  # published budgets are not exact
    N_opt = k * np.repeat(budgets, 9) ** a_true
    N = N_opt * np.tile(np.logspace(-0.8, 0.9, 9), 7)
    loss = 2 + 30 * np.repeat(budgets, 9) ** -0.05 + 0.05 * np.log(N / N_opt) ** 2 + rng.normal(0, 0.002, 63)
    alloc = sl.fit_approach2(sl.fit_profiles(sl.make_runs(N=N, C=C, loss=loss)))
    assert len(alloc.C) == len(budgets)
    assert alloc.a == pytest.approx(a_true, abs=0.01)
    assert alloc.b == pytest.approx(1 - a_true, abs=0.01)


def test_allocation_intervals_resample_budgets_and_cover_the_true_exponent():
    C = np.logspace(10, 12, 5)  # a CPU sweep's handful of budgets, one optimum each
    exact = sl._allocation(C, 0.3 * C**0.45, C / (6 * 0.3 * C**0.45), "approach 2")
    iv = bootstrap_allocation(exact, "approach2", 200, seed=0)
    assert iv["approach2.a"].low == pytest.approx(0.45) and iv["approach2.a"].high == pytest.approx(0.45)
    assert iv["approach2.b"].low == pytest.approx(0.55) and iv["approach2.b"].high == pytest.approx(0.55)
    two = sl._allocation(C[:2], exact.N[:2], exact.D[:2], "approach 2")
    assert 50 < bootstrap_allocation(two, "approach2", 200, seed=0)["approach2.a"].samples < 150  # one budget: skipped
    noisy_N = 0.3 * C**0.45 * np.exp(np.random.default_rng(0).normal(0, 0.1, 5))
    noisy = sl._allocation(C, noisy_N, C / (6 * noisy_N), "approach 2")
    a = bootstrap_allocation(noisy, "approach2", 200, seed=0)["approach2.a"]
    assert a.low < noisy.a < a.high and a.low < 0.45 < a.high and a.high - a.low > 0.02


def test_kaplan_fit_recovers_known_exponent():
    rng = np.random.default_rng(2)
    N = np.logspace(6, 10, 20)
    loss = (8.8e13 / N) ** 0.076 * np.exp(rng.normal(0, 0.002, 20))
    law = sl.fit_kaplan(N, loss, "L(N)")
    assert law.alpha == pytest.approx(0.076, rel=0.05)


@needs_shared
def test_loader_reads_shared_chinchilla_csv_deriving_tokens_from_flops():
    runs = load_runs(CHINCHILLA_CSV, "Model Size", flops_column="Training FLOP")
    assert len(runs) == 245
    np.testing.assert_allclose(runs.D, runs.C / (6 * runs.N))
    trimmed = load_runs(CHINCHILLA_CSV, "Model Size", flops_column="Training FLOP", drop_highest=5)
    assert len(trimmed) == 240
    assert trimmed.loss.max() == np.sort(runs.loss)[-6]


def test_cli_missing_column_exits_2_with_one_line(tmp_path):
    csv = write_csv(tmp_path / "r.csv", ["N,D,los", "1e8,1e9,3.0"])
    result = scaling("fit", str(csv))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and "'loss'" in result.stderr


def test_cli_too_few_points_exits_2_saying_how_many_are_needed(tmp_path):
    csv = write_csv(tmp_path / "r.csv", ["N,D,loss", "1e8,1e9,3.0", "2e8,1e9,2.9", "4e8,1e9,2.8"])
    result = scaling("fit", str(csv))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and f"at least {sl.MIN_LAW_RUNS}" in result.stderr


def test_cli_non_positive_value_exits_2_with_one_line(tmp_path):
    csv = write_csv(tmp_path / "r.csv", ["N,D,loss", "1e8,1e9,3.0", "2e8,0,2.9"])
    result = scaling("fit", str(csv))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and "line 3" in result.stderr and "> 0" in result.stderr


def test_cli_missing_file_exits_2_with_one_line(tmp_path):
    result = scaling("fit", str(tmp_path / "absent.csv"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no such file: {tmp_path / 'absent.csv'}"


@pytest.fixture(scope="module")
def chinchilla_fit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit")
    result = scaling(
        "fit",
        str(CHINCHILLA_CSV),
        "--out",
        str(out),
        *CHINCHILLA_COLUMNS,
        "--drop-highest-loss",
        "5",
        "--bootstrap",
        "3",
        "--starts",
        "coarse",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow  # the chinchilla_fit fixture: ~8 CPU seconds
@needs_shared
def test_fit_on_chinchilla_csv_writes_fit_json_and_plots(chinchilla_fit):
    report = json.loads((chinchilla_fit / "fit.json").read_text())
    for approach in ("approach1", "approach2", "approach3"):
        assert {"a", "b"} <= report[approach].keys()
        assert report[approach]["a"]["ci95"] is not None
    assert 0.3 < report["approach3"]["alpha"]["value"] < 0.4  # published data: about 0.35
    for png in ("isoflop_profiles.png", "loss_fits.png", "compute_optimal.png"):
        assert (chinchilla_fit / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # the chinchilla_fit fixture: ~8 CPU seconds
@needs_shared
def test_predict_prints_compute_optimal_json(chinchilla_fit):
    result = scaling("predict", "--fit", str(chinchilla_fit / "fit.json"), "--compute", "5.76e23")
    assert result.returncode == 0, result.stderr
    prediction = json.loads(result.stdout)
    assert {"N_opt", "D_opt", "loss"} <= prediction.keys()
    assert prediction["N_opt"] * prediction["D_opt"] * 6 == pytest.approx(5.76e23)
    assert 1e10 < prediction["N_opt"] < 2e11  # Chinchilla itself: 70B parameters at this budget
    assert {"N_opt", "D_opt"} <= prediction["approach2"].keys()


def test_help_lists_every_command():
    # Without arguments scaling.py runs the default sweep (minutes), so the command list is checked via --help.
    result = scaling("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("sweep", "fit", "predict", "forecast", "depth"))


def test_huber_objective_gradient_equals_central_differences_in_both_regimes():
    """Runs with residuals inside and beyond delta: the analytic gradient [5] against (f(x+h) - f(x-h)) / 2h."""
    rng = np.random.default_rng(0)
    log_N, log_D = rng.uniform(15, 22, 12), rng.uniform(18, 25, 12)
    law = sl.ChinchillaLaw(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
    noise = rng.normal(0, 2 * sl.HUBER_DELTA, 12)
    log_loss = np.log(law.loss(np.exp(log_N), np.exp(log_D))) + noise
    theta = np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])  # residuals: -noise
    noise = np.abs(noise)
    assert (noise < sl.HUBER_DELTA).any() and (noise > sl.HUBER_DELTA).any()
    _, grad = sl.huber_objective(theta, log_N, log_D, log_loss)
    h = 1e-7
    numeric = [
        (
            sl.huber_objective(theta + h * e, log_N, log_D, log_loss)[0]
            - sl.huber_objective(theta - h * e, log_N, log_D, log_loss)[0]
        )
        / (2 * h)
        for e in np.eye(5)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
