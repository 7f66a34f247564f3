"""The one-line error contract for scaling.py: bad arguments and hostile fit.json files exit 2 with
one line and change no file; a forecast never writes into a folder holding another kind of run; and
the numbers it reads or prints are finite and inside the law's domain."""

from __future__ import annotations

import pytest
from hostile_kit import Case, W, check_case, params

CASES = [
    Case("scaling_fit_missing_csv", "scaling", lambda w: ["fit", str(w.tmp / "absent.csv")], "no such file"),
    Case("scaling_unknown_command", "scaling", lambda w: ["fly"], "invalid choice"),
    Case(
        "scaling_sweep_lr_nan",
        "scaling",
        lambda w: ["sweep", "optim.lr=nan", "--out", str(w.tmp / "out")],
        "optim.lr must be a finite number",
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_scaling_input_exits_2_with_one_line_and_changes_no_file(case, tmp_path, capfd):
    (tmp_path / "base").mkdir()
    check_case(case, W(tmp_path, tmp_path / "base"), capfd)
