"""Does approach 3 find the irreducible loss? A sweep on a corpus whose entropy rate is known.

    python bench/known_entropy.py [--out runs/scaling_markov] [--tolerance 0.05] [extra key=value ...]

Runs ``python scaling.py sweep configs/scaling_markov.yaml --out DIR --fit`` (resumable: finished
runs are kept), then reads DIR/fit.json and compares approach 3's E with the chain's true entropy
rate. Prints E, its bootstrap interval, the rate and the relative gap, and one JSON line; exits 1 when
|E - rate| / rate exceeds ``--tolerance`` (the figure the README quotes), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/scaling_markov"))
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest accepted |E - rate| / rate")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cmd = [
        sys.executable,
        str(ROOT / "scaling.py"),
        "sweep",
        str(ROOT / "configs" / "scaling_markov.yaml"),
        *args.overrides,
        "--out",
        str(args.out),
        "--fit",
    ]
    if subprocess.run(cmd, check=False).returncode:
        return 2
    a3 = json.loads((args.out / "fit.json").read_text())["approach3"]
    E, (low, high) = a3["E"]["value"], a3["E"]["ci95"]
    rate = a3["true_entropy_rate"]
    gap = (E - rate) / rate
    print(
        f"approach 3: E = {E:.4f} [{low:.4f}, {high:.4f}]; true entropy rate = {rate:.4f}; "
        f"(E - rate) / rate = {100 * gap:+.2f}%"
    )
    print(
        json.dumps(
            {
                "bench": "known_entropy",
                "E": E,
                "E_ci95": [low, high],
                "entropy_rate": rate,
                "relative_gap": gap,
                "rate_in_interval": low <= rate <= high,
                "tolerance": args.tolerance,
            }
        )
    )
    return int(abs(gap) > args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
