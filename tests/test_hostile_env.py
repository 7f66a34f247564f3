"""The one-line error contract for the process environment JAX reads at start-up: a device count it
cannot parse or start, and libtpu's own lines on a host without a TPU. Each process case is bounded
by a timeout, so a hang fails the test rather than the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_cli
from hostile_kit import MAINS, assert_one_line, snapshot

from jaxllm.core import environment

HANG = 60  # seconds: each case refuses in a few; JAX would spend far longer


def base_args(tmp_path: Path) -> list[str]:
    (tmp_path / "c.txt").write_text("hostile environment " * 400)
    return [
        *TINY,
        f"data.source={tmp_path / 'c.txt'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.dir={tmp_path / 'run'}",
    ]


ARGS = {  # arguments each script would otherwise refuse quickly, or run in seconds
    "train": lambda tmp: [*base_args(tmp), "train.steps=1"],
    "sft": lambda tmp: [f"init.from={tmp / 'none'}"],
    "scaling": lambda tmp: ["predict", "--fit", str(tmp / "f.json"), "--compute", "1e20"],
}


@pytest.mark.parametrize("value", ["abc", "4.0", "0", "-3", str(environment.MAX_CPU_DEVICES + 1)])
@pytest.mark.parametrize("script", list(ARGS))
def test_a_bad_jax_num_cpu_devices_is_one_line_before_jax_reads_it(script, value, tmp_path, monkeypatch, capfd):
    args = ARGS[script](tmp_path)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", value)
    capfd.readouterr()
    status = MAINS[script](args)
    assert_one_line(status, capfd.readouterr().err, "JAX_NUM_CPU_DEVICES")


@pytest.mark.slow
def test_generate_with_an_unparsable_device_count_is_one_line_not_jaxs_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "abc"}
    result = subprocess.run(
        [sys.executable, "-m", "jaxllm.generate", str(tmp_path), "--prompt", "a"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert_one_line(result.returncode, result.stderr, "JAX_NUM_CPU_DEVICES='abc' must be a whole number")


@pytest.mark.slow
def test_more_cpu_devices_than_jax_can_start_is_refused_before_starting_them(tmp_path):
    args = [*base_args(tmp_path), "dist.cpu_devices=100000"]
    before = snapshot(tmp_path)
    result = run_cli("train.py", *args, devices=None, timeout=HANG)
    assert_one_line(result.returncode, result.stderr, "dist.cpu_devices=100000 asks for more CPU devices")
    assert snapshot(tmp_path) == before


def test_a_plan_for_more_cpu_devices_than_jax_can_start_is_refused(capfd):
    status = MAINS["train"](["--plan", f"cpu:{environment.MAX_CPU_DEVICES + 1}"])
    assert_one_line(status, capfd.readouterr().err, "--plan cpu:N with N=1025 asks for more CPU devices")


# --------------------------------------------------------------------------- libtpu's start-up lines


def no_platform_env() -> dict[str, str]:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
    for key in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT", "TPU_STDERR_LOG_LEVEL", "TPU_MIN_LOG_LEVEL"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.skipif(
    environment.tpu_present() or environment.gpu_present(), reason="a host with an accelerator starts its backend"
)
def test_a_refusal_after_jax_starts_is_one_line_with_libtpu_installed(tmp_path):
    pytest.importorskip("libtpu", reason="the tpu extra is what prints libtpu's lines")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *base_args(tmp_path), "mesh.data=16"],
        cwd=ROOT,
        env=no_platform_env(),
        capture_output=True,
        text=True,
        timeout=HANG,
        check=False,
    )
    assert_one_line(result.returncode, result.stderr, "16 devices but 1 are visible")


def test_a_platform_the_user_chose_is_left_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "")
    environment.skip_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == ""


def test_an_accelerator_on_the_host_is_left_to_jax(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(environment, "gpu_present", lambda: True)
    environment.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in os.environ
