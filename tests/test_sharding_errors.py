"""Every mesh error at the command line: ``python train.py`` exits 2 with one line on stderr, before
anything compiles (``JAX_LOG_COMPILES`` would add a line per compilation) or is written. The
parameter check traces the model abstractly (``jax.eval_shape``), which that flag logs as
"Finished tracing": tracing is not compiling, so those lines are set aside."""

from __future__ import annotations

import pytest
from conftest import TINY, run_cli


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mesh.data=3"], "mesh data=3*fsdp=1*tensor=1*pipe=1 = 3 devices but 8 are visible"),
        (["mesh.tensor=8"], "model.n_head=4 is not divisible by mesh.tensor=8"),
        (["model.arch=llama", "model.n_head=8", "model.n_kv_head=2", "mesh.tensor=4"], "model.n_kv_head=2 is not"),
        (["model.d_ff=66", "mesh.tensor=4"], "model.d_ff=66 is not divisible by mesh.tensor=4"),
        (["model.vocab_size=257", "mesh.tensor=2"], "pad it with model.vocab_size=258"),
        (["train.batch_size=12", "mesh.data=8"], "train.batch_size=12 is not divisible by the data axes"),
        (["model.d_ff=36", "mesh.fsdp=8", "mesh.rules={mlp: fsdp}"],
         "its 'mlp' dimension 36 is not divisible by mesh fsdp=8"),
    ],
    ids=["mesh_product", "n_head", "n_kv_head", "d_ff", "vocab", "batch", "rules_override"],
)
def test_mesh_error_exits_2_with_one_line_before_compiling(tmp_path, corpus, overrides, message):
    args = TINY + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]
    result = run_cli("train.py", *args, *overrides, devices=8, env_extra={"JAX_LOG_COMPILES": "1"}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "Finished tracing" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert message in lines[0]
    assert not (tmp_path / "run").exists()
