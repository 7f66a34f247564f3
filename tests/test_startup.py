"""Start-up: what a run imports, and the TensorBoard event files it writes without tensorboardX."""

from __future__ import annotations

import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT

from jaxllm.train.checkpoint import Checkpointer, fingerprint
from jaxllm.train.metrics_log import MetricsLog
from jaxllm.train.tb_events import ScalarWriter, crc32c, masked_crc


def read_records(path) -> list[bytes]:
    """The TFRecords of an event file, each frame's two checksums checked."""
    data, records, at = path.read_bytes(), [], 0
    while at < len(data):
        length_bytes = data[at : at + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        assert struct.unpack("<I", data[at + 8 : at + 12])[0] == masked_crc(length_bytes)
        payload = data[at + 12 : at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == masked_crc(payload)
        records.append(payload)
        at += 16 + length
    return records


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C (Castagnoli) catalogue's check value
    assert crc32c(b"") == 0


def test_event_file_decodes_as_tensorboard_events(tmp_path):
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX's protos decode the file")
    writer = ScalarWriter(tmp_path)
    writer.add_scalars({"loss": 2.5, "lr": 1e-3}, step=7)
    writer.add_scalars({"loss": 2.25}, step=300)
    writer.close()
    assert writer.path.name.startswith("events.out.tfevents.")
    events = [event_pb2.Event.FromString(r) for r in read_records(writer.path)]
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [7, 300]
    assert {v.tag: v.simple_value for v in events[1].summary.value} == pytest.approx({"loss": 2.5, "lr": 1e-3})
    assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("loss", 2.25)]


def test_metrics_log_writes_each_record_as_one_tensorboard_event(tmp_path):
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX's protos decode the file")
    log = MetricsLog(tmp_path / "metrics.jsonl", 0, True, tmp_path / "tb")
    log.write({"step": 10, "loss": 3.0, "grad_norm": 0.5, "layer_grad_norms": [0.25, 0.125], "sample": "text"})
    log.close()
    (path,) = (tmp_path / "tb").iterdir()
    (event,) = [event_pb2.Event.FromString(r) for r in read_records(path)][1:]
    assert event.step == 10
    assert {v.tag: v.simple_value for v in event.summary.value} == {
        "loss": 3.0,
        "grad_norm": 0.5,
        "layer_grad_norm/0": 0.25,
        "layer_grad_norm/1": 0.125,
    }


def test_training_imports_neither_torch_nor_tensorboardx(tmp_path):
    """PyTorch (installed for the parity tests) costs seconds to import: a training process whose
    trainer, metrics log and TensorBoard writer are set up has not imported it."""
    code = (
        "import sys; from pathlib import Path; import jaxllm.train.trainer, jaxllm.sft.finetune; "
        "from jaxllm.train.metrics_log import MetricsLog; "
        f"log = MetricsLog(Path({str(tmp_path)!r}) / 'm.jsonl', 0, True, Path({str(tmp_path)!r}) / 'tb'); "
        "log.write({'step': 1, 'loss': 1.0}); log.close(); "
        "print(sorted(m for m in ('torch', 'tensorboardX') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_first_checkpoint_of_a_small_replicated_state_compiles_nothing(tmp_path, caplog):
    """Orbax would split each replicated array's write among its replicas, compiling a slicing
    program per array: a second of CPU at a small model's first save, for nothing."""
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.ones((48, 40)), replicated), "b": jax.device_put(jnp.zeros((40,)), replicated)}
    fingerprint(state)  # the integrity check's own program, compiled once per state layout
    checkpointer = Checkpointer(tmp_path, keep=1)
    try:
        with jax.log_compiles(), caplog.at_level("WARNING"):
            checkpointer.save(1, state, {"step": 1})
            checkpointer.wait()
    finally:
        checkpointer.close()
    assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    assert checkpointer.steps() == [1]
