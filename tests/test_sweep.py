"""The IsoFLOP sweep plans D = C / 6N per run, writes results.csv with train.py's losses, and resumes."""

from __future__ import annotations

import csv
import fcntl
import math

import jax
import pytest

import scaling
from jaxllm.core.config import ModelConfig, load_config
from jaxllm.core.errors import ConfigError, UserError
from jaxllm.model import flops
from jaxllm.scaling.sweep import Shape, SweepConfig, plan, run_sweep, shape_model, size_window, sweep_plan
from jaxllm.train import trainer

TINY_SWEEP = [
    "train.seq_len=16",
    "train.batch_size=8",
    "eval.batches=2",
    "log.every=5",
    "optim.warmup_steps=2",
    "sweep.shapes=1x16,2x16,1x32,3x16,2x32",
    "sweep.sizes=5",
]


def ladder(shapes: list[Shape], seq_len: int = 16) -> list[tuple[Shape, ModelConfig]]:
    return [(s, shape_model(ModelConfig(), s, vocab_size=256, seq_len=seq_len)) for s in shapes]


SHAPES = [Shape(1, 16), Shape(2, 16), Shape(1, 32), Shape(3, 16), Shape(2, 32), Shape(2, 48), Shape(3, 64)]


def test_every_run_trains_on_C_over_6N_tokens_with_N_of_the_flop_count():
    specs = plan([3e9, 1e10], ladder(SHAPES), sizes=5, tokens_per_param=20, tokens_per_step=128, seq_len=16)
    assert len(specs) == 10
    for s in specs:
        model = shape_model(ModelConfig(), s.shape, 256, 16)
        assert s.N == flops.param_counts(model)["matmul"]
        assert s.N_nonembed == flops.param_counts(model)["non_embedding"]
        assert s.D == s.steps * 128
        assert s.C == 6 * s.N * s.D
        assert abs(math.log10(s.C / s.budget)) < 0.05  # rounding to whole steps keeps each run in its budget


def test_size_window_is_centred_on_the_optimum_and_slides_at_the_ladder_ends():
    N = [1, 2, 4, 8, 16, 32, 64]
    assert list(size_window(N, centre=8, sizes=5)) == [1, 2, 3, 4, 5]
    assert list(size_window(N, centre=0.1, sizes=5)) == [0, 1, 2, 3, 4]
    assert list(size_window(N, centre=1e6, sizes=5)) == [2, 3, 4, 5, 6]


def test_larger_budgets_get_larger_models():
    specs = plan([1e9, 1e11], ladder(SHAPES), sizes=5, tokens_per_param=20, tokens_per_step=128, seq_len=16)
    small, large = ([s.N for s in specs if s.budget == b] for b in (1e9, 1e11))
    assert max(small) < max(large) and min(small) < min(large)


def test_fewer_than_five_sizes_per_budget_is_refused():
    with pytest.raises(ConfigError, match="at least 5 sizes"):
        plan([1e10], ladder(SHAPES), sizes=4, tokens_per_param=20, tokens_per_step=128, seq_len=16)


def test_a_budget_too_small_for_its_models_is_refused_before_training():
    with pytest.raises(ConfigError, match="only .* steps"):
        plan([1e6], ladder(SHAPES), sizes=5, tokens_per_param=20, tokens_per_step=128, seq_len=16)


@pytest.mark.slow
def test_sweep_writes_results_csv_then_skips_finished_runs(tmp_path, corpus, monkeypatch):
    cfg = load_config(
        None,
        TINY_SWEEP + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", "sweep.budgets=6e8"],
        cls=SweepConfig,
    )
    specs = sweep_plan(cfg)[-2:]  # the two largest sizes, fewest steps: the plan is tested above
    out = tmp_path / "sweep"
    rows = run_sweep(cfg, specs, out, devices=jax.devices()[:1])
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {"N", "N_nonembed", "D", "C", "loss"} <= set(table[0])
    assert [r["name"] for r in table] == [s.name for s in specs]
    for r in table:
        assert float(r["C"]) == pytest.approx(6 * float(r["N"]) * float(r["D"]), rel=1e-12)
        assert 0 < float(r["loss"]) < math.log(256) + 1

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train", must_not_train)
    assert run_sweep(cfg, specs, out, devices=jax.devices()[:1]) == rows


def test_a_second_sweep_into_the_same_folder_is_refused_while_the_first_writes(tmp_path, corpus):
    cfg = load_config(None, TINY_SWEEP + [f"data.source={corpus}", "sweep.budgets=6e8"], cls=SweepConfig)
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # what the first sweep holds while it trains
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match=f"another sweep is writing to {out}"):
            run_sweep(cfg, [], out)
        assert not (out / "sweep.json").exists()  # refused before writing anything
    assert run_sweep(cfg, [], out) == []  # released: the folder is free again


def test_unknown_override_key_exits_2_with_one_line(tmp_path, capsys):
    assert scaling.main(["sweep", "sweep.budget=1e9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "sweep.budget" in err and "budgets" in err
    assert not any(tmp_path.iterdir())
