"""Two processes (4 CPU devices each, gloo on 127.0.0.1) feeding one global batch from a prepared
dataset: each reads only the windows of the rows its devices hold, and together they assemble the
batch one process of 8 devices builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, corpus_text
from test_sharding import free_port, wait_all

from jaxllm.data import open_dataset
from jaxllm.data.batches import Source, TrainData
from jaxllm.data.prepare import prepare

SEQ, BATCH, ACCUM, SEED, STEPS = 16, 8, 2, 0, 3
MESHES = {"data_over_processes": "mesh.data=2 mesh.fsdp=2 mesh.tensor=2", "replicated": "mesh.tensor=8"}

WORKER = """
import json, sys
from jaxllm.core import runtime
from jaxllm.core.config import load_config

dataset, coordinator, process, out, seq, batch, accum, seed, steps, meshes = sys.argv[1:]
dist = [f"dist.coordinator={coordinator}", "dist.num_processes=2", f"dist.process_id={process}"]
runtime.init_distributed(load_config(None, dist))

import jax, numpy as np
from jax.experimental import multihost_utils
from jaxllm.data.batches import Source, TrainData
from jaxllm.data.shards import open_dataset
from jaxllm.parallel import sharding
from jaxllm.train import trainer

ds = open_dataset(dataset)
reads = []
windows = ds.windows


def recorded_windows(split, starts, length):
    reads.append(np.asarray(starts).tolist())
    return windows(split, starts, length)


ds.windows = recorded_windows
data = TrainData([Source(dataset, ds)], int(seq), int(seed))
result = {}
for name, mesh_keys in json.loads(meshes).items():
    train = [f"train.seq_len={seq}", f"train.batch_size={batch}", f"train.grad_accum={accum}"]
    cfg = load_config(None, [*dist, *train, *mesh_keys.split()])
    batch_sh = sharding.batch_sharding(sharding.make_mesh(cfg.mesh, jax.devices()), leading=1)
    reads.clear()
    gathered = []
    for step in range(int(steps)):
        global_batch = trainer.batch_at(data, cfg, batch_sh, step)
        gathered.append(np.asarray(multihost_utils.process_allgather(global_batch, tiled=True)).tolist())
    result[name] = {"reads": list(reads), "batches": gathered}
with open(out, "w") as f:
    json.dump(result, f)
"""


class Recording:
    """A dataset that records the starts of every window read."""

    def __init__(self, ds):
        self.ds, self.starts = ds, []

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def windows(self, split, starts, length):
        self.starts += np.asarray(starts).tolist()
        return self.ds.windows(split, starts, length)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The prepared dataset and what each of the two processes read and assembled, per mesh."""
    root = tmp_path_factory.mktemp("multiprocess")
    (root / "corpus.txt").write_text(corpus_text())
    prepare([str(root / "corpus.txt")], str(root / "ds"), val_fraction=0.1, workers=1, progress=False)
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "PYTHONPATH": str(ROOT)}
    logs, procs = [], []
    for p in range(2):
        args = [str(root / "ds"), coordinator, str(p), str(root / f"out{p}.json")]
        args += [str(v) for v in (SEQ, BATCH, ACCUM, SEED, STEPS)] + [json.dumps(MESHES)]
        logs.append(open(root / f"log{p}.txt", "w"))  # noqa: SIM115  (closed below, after the processes end)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, stdout=logs[-1], stderr=logs[-1]))
    codes = wait_all(procs, timeout=300)
    for log in logs:
        log.close()
    assert codes == [0, 0], "\n".join((root / f"log{p}.txt").read_text()[-2000:] for p in range(2))
    return root / "ds", [json.loads((root / f"out{p}.json").read_text()) for p in range(2)]


def one_process(dataset) -> tuple[list[np.ndarray], list[list[int]]]:
    """Each step's global batch as one process builds it, and the starts it reads for it."""
    recording = Recording(open_dataset(dataset))
    data = TrainData([Source(str(dataset), recording)], SEQ, SEED)
    batches, starts = [], []
    for step in range(STEPS):
        recording.starts = []
        batches.append(data.rows(step, ACCUM, BATCH))
        starts.append(sorted(recording.starts))
    return batches, starts


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_assemble_the_one_process_batch(two_processes, mesh):
    dataset, outs = two_processes
    batches, _ = one_process(dataset)
    for out in outs:
        np.testing.assert_array_equal(np.array(out[mesh]["batches"]), np.stack(batches))


@pytest.mark.slow
def test_each_process_reads_only_the_windows_of_its_own_rows(two_processes):
    dataset, outs = two_processes
    _, starts = one_process(dataset)
    for step in range(STEPS):
        per_process = [sorted(outs[p]["data_over_processes"]["reads"][step]) for p in range(2)]
        assert [len(r) for r in per_process] == [ACCUM * BATCH // 2] * 2  # half the rows each
        assert sorted(per_process[0] + per_process[1]) == starts[step]  # together: the global batch
        replicated = [sorted(outs[p]["replicated"]["reads"][step]) for p in range(2)]
        assert replicated == [starts[step]] * 2  # a batch that every process holds whole, each reads whole
