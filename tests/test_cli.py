"""train.py's contract with people: --help documents every key; bad input is one line and exit 2,
with nothing written."""

from __future__ import annotations

import jax
import pytest
from conftest import run_cli

from jaxllm.core.errors import ConfigError
from jaxllm.core.runtime import init_cpu_devices


def test_help_lists_keys_with_defaults_and_meanings():
    out = run_cli("train.py", "--help")
    assert out.returncode == 0
    assert "model.n_kv_head" in out.stdout and "grouped-query" in out.stdout
    assert "usage: python train.py [CONFIG.yaml]" in out.stdout


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    out = run_cli("train.py", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: config file {tmp_path / 'nope.yaml'} not found"


# dist.cpu_devices in a training process: without JAX_NUM_CPU_DEVICES it splits the host CPU (checked by
# test_runtime's compile-cache processes), with it the variable wins (checked by test_train's SIGTERM process).


def test_dist_cpu_devices_after_jax_started_must_match(monkeypatch):
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    count = len(jax.devices("cpu"))  # 8: conftest started JAX with them
    init_cpu_devices(count)  # the same count: accepted
    with pytest.raises(ConfigError, match=f"dist.cpu_devices=3 but JAX already started with {count} CPU devices"):
        init_cpu_devices(3)
