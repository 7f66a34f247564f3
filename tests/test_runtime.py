"""Process set-up (``jaxllm/core/runtime.py``): the persistent compilation cache a rerun loads its programs from,
and the optimisation level of the programs that run once."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, run_cli

from jaxllm.core.config import resolve
from jaxllm.core.runtime import ONE_OFF_LEVEL, init_compile_cache, one_off_compiler_options
from jaxllm.parallel import sharding
from jaxllm.train import trainer

CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def no_cache_configured():
    """JAX's cache settings cleared for the test (conftest sets a directory for the suite), then restored."""
    saved = {k: getattr(jax.config, k) for k in CACHE_KEYS}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_compile_cache_key_sets_jax_cache_folder(tmp_path, no_cache_configured):
    assert init_compile_cache(str(tmp_path / "xla")) == tmp_path / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # small programs too


def test_empty_compile_cache_key_leaves_cache_off(no_cache_configured):
    assert init_compile_cache("") is None
    assert jax.config.jax_compilation_cache_dir is None


def test_jax_compilation_cache_dir_wins_over_the_key(tmp_path):
    suite_cache = jax.config.jax_compilation_cache_dir  # conftest's, through JAX_COMPILATION_CACHE_DIR
    assert suite_cache
    assert init_compile_cache(str(tmp_path / "elsewhere")) == Path(suite_cache)
    assert jax.config.jax_compilation_cache_dir == suite_cache


@pytest.mark.slow
def test_rerun_loads_every_program_from_the_compile_cache(tmp_path, corpus):
    """Two ``train.py`` processes with one ``run.compile_cache``: the second compiles nothing new (the
    folder gains no entry) and JAX logs a cache hit for the train step. With no JAX_NUM_CPU_DEVICES set,
    the config's ``dist.cpu_devices`` splits the host CPU (test_train's SIGTERM test: the variable wins)."""
    cache = tmp_path / "xla"
    args = TINY + [
        f"data.source={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=1",
        f"run.compile_cache={cache}",
        "dist.cpu_devices=2",
    ]
    env = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_LOG_COMPILES": "1"}  # the suite's cache set aside
    first = run_cli("train.py", *args, f"run.dir={tmp_path / 'a'}", devices=None, env_extra=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1, 'pipe': 1}" in first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_train_step") for name in entries)
    assert "cache hit for 'jit_train_step'" not in first.stderr
    second = run_cli("train.py", *args, f"run.dir={tmp_path / 'b'}", devices=None, env_extra=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_one_off_level_unless_xla_flags_choose_one(monkeypatch):
    assert one_off_compiler_options() == {}  # conftest's XLA_FLAGS compile every program at -O0
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")
    assert one_off_compiler_options() == ONE_OFF_LEVEL


# XLA's defaults for the flags conftest changes to compile the suite fast: the comparison is the one a run makes
XLA_DEFAULTS = {"xla_llvm_disable_expensive_passes": False, "xla_cpu_use_fusion_emitters": True}


@pytest.mark.slow
def test_initialisation_at_the_one_off_level_draws_the_bits_of_xlas_default_level(tiny_cfg):
    """The same lowered initialisation compiled at the one-off level and at XLA's default level (3): every
    parameter and optimizer leaf bitwise equal. One architecture: both draw their weights alike."""
    cfg = resolve(tiny_cfg(), 256)
    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    with setup.context():
        lowered = setup.init.lower()
        levels = (ONE_OFF_LEVEL, {"xla_backend_optimization_level": 3})
        one_off, default = (lowered.compile(compiler_options={**XLA_DEFAULTS, **o})() for o in levels)
    for a, b in zip(jax.tree.leaves(one_off), jax.tree.leaves(default), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
