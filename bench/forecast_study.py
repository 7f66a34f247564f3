"""Does a sweep of small runs forecast a 10x larger one? A study on two corpora.

    python bench/forecast_study.py [--corpus markov|stdlib|both] [--out-root runs] [--multiple 10] [--fix-E]

Per corpus, two commands of scaling.py (both resumable: finished runs are kept):

    python scaling.py sweep CONFIG --out DIR --fit
    python scaling.py forecast --fit DIR/fit.json --compute MULTIPLE x (the sweep's largest budget) --train

with CONFIG/DIR configs/scaling_markov.yaml/runs/scaling_markov (the known-entropy corpus) and
configs/scaling_cpu.yaml/runs/scaling (the stdlib corpus, the default `python scaling.py`). Prints
predicted and actual final loss, the relative error and whether the 95% interval covered the actual
loss, and one JSON line per corpus; exits 1 when an error exceeds its target (1% of the loss on the
known-entropy corpus, 2% on stdlib) or the interval misses, 2 when a command failed. With
``--fix-E`` the known-entropy sweep is refitted with approach 3's E fixed at the corpus's entropy
rate (``fit --entropy-rate RATE --fix-E``, into DIR/fixE) and the forecast made from that fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# corpus -> (sweep config, output folder under --out-root, largest accepted |predicted - actual| / actual)
STUDIES = {"markov": ("scaling_markov.yaml", "scaling_markov", 0.01), "stdlib": ("scaling_cpu.yaml", "scaling", 0.02)}


def run_study(corpus: str, out_root: Path, multiple: float, fix_E: bool) -> dict | None:
    """Sweep, fit, forecast and train one corpus; the score, or None if a command failed."""
    config, folder, target = STUDIES[corpus]
    out = out_root / folder
    scaling = [sys.executable, str(ROOT / "scaling.py")]
    sweep_cmd = [*scaling, "sweep", str(ROOT / "configs" / config), "--out", str(out), "--fit"]
    if subprocess.run(sweep_cmd, check=False).returncode:
        return None
    sweep = json.loads((out / "sweep.json").read_text())
    compute = multiple * max(float(b) for b in sweep["config"]["sweep"]["budgets"].split(","))
    fit_dir = out
    if fix_E and sweep["entropy_rate"] is not None:
        fit_dir = out / "fixE"
        refit = [
            *scaling,
            "fit",
            str(out / "results.csv"),
            "--out",
            str(fit_dir),
            "--bootstrap",
            "30",
            "--entropy-rate",
            repr(sweep["entropy_rate"]),
            "--fix-E",
        ]
        if subprocess.run(refit, check=False).returncode:
            return None
    forecast_dir = fit_dir / f"forecast-{multiple:g}x"
    forecast = [
        *scaling,
        "forecast",
        "--fit",
        str(fit_dir / "fit.json"),
        "--compute",
        repr(compute),
        "--out",
        str(forecast_dir),
        "--train",
    ]
    if subprocess.run(forecast, check=False).returncode:
        return None
    doc = json.loads((forecast_dir / "forecast.json").read_text())
    actual, predicted = doc["actual"], doc["predicted"]
    error = actual["relative_error"]
    return {
        "bench": "forecast_study",
        "corpus": corpus,
        "E_fixed": fit_dir != out,
        "compute": compute,
        "run": doc["run"],
        "predicted": predicted["loss"],
        "ci95": predicted["ci95"],
        "actual": actual["loss"],
        "relative_error": error,
        "in_ci95": actual["in_ci95"],
        "target": target,
        "passed": error is not None and abs(error) <= target and actual["in_ci95"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=[*STUDIES, "both"], default="both")
    parser.add_argument("--out-root", type=Path, default=Path("runs"))
    parser.add_argument("--multiple", type=float, default=10.0, help="forecast budget / the sweep's largest")
    parser.add_argument("--fix-E", action="store_true", help="known-entropy corpus: fix approach 3's E at its rate")
    args = parser.parse_args()
    scores = []
    for corpus in STUDIES if args.corpus == "both" else [args.corpus]:
        score = run_study(corpus, args.out_root, args.multiple, args.fix_E)
        if score is None:
            return 2
        scores.append(score)
        low, high = score["ci95"]
        error = "n/a (diverged)" if score["relative_error"] is None else f"{100 * score['relative_error']:+.2f}%"
        print(
            f"{corpus}: predicted {score['predicted']:.4f} [{low:.4f}, {high:.4f}], actual {score['actual']}, "
            f"error {error} (target {100 * score['target']:.0f}%), interval covers: {score['in_ci95']}"
        )
        print(json.dumps(score))
    return int(not all(s["passed"] for s in scores))


if __name__ == "__main__":
    sys.exit(main())
