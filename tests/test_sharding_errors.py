"""Every mesh error at the command line: ``train.main`` returns 2 with one line on stderr, before anything
is lowered to XLA (so nothing compiles) or written. The parameter check traces the model abstractly
(``jax.eval_shape``): tracing is not lowering. In-process, on the suite's 8 devices: ``test_cli.py``
shows that a returned 2 is the process's exit code."""

from __future__ import annotations

import jax
import pytest
from conftest import TINY
from jax._src.dispatch import JAXPR_TO_MLIR_MODULE_EVENT

import train


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mesh.data=3"], "mesh data=3*fsdp=1*tensor=1*pipe=1 = 3 devices but 8 are visible"),
        (["mesh.tensor=8"], "model.n_head=4 is not divisible by mesh.tensor=8"),
        (["model.arch=llama", "model.n_head=8", "model.n_kv_head=2", "mesh.tensor=4"], "model.n_kv_head=2 is not"),
        (["model.d_ff=66", "mesh.tensor=4"], "model.d_ff=66 is not divisible by mesh.tensor=4"),
        (["model.vocab_size=257", "mesh.tensor=2"], "pad it with model.vocab_size=258"),
        (["train.batch_size=12", "mesh.data=8"], "train.batch_size=12 is not divisible by the data axes"),
        (
            ["model.d_ff=36", "mesh.fsdp=8", "mesh.rules={mlp: fsdp}"],
            "its 'mlp' dimension 36 is not divisible by mesh fsdp=8",
        ),
    ],
    ids=["mesh_product", "n_head", "n_kv_head", "d_ff", "vocab", "batch", "rules_override"],
)
def test_mesh_error_exits_2_with_one_line_before_compiling(tmp_path, corpus, capsys, overrides, message):
    args = TINY + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]
    lowered = []

    def on_duration(event: str, duration: float, **kwargs) -> None:
        if event == JAXPR_TO_MLIR_MODULE_EVENT:
            lowered.append(kwargs)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        code = train.main([*args, *overrides])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert message in lines[0]
    assert lowered == []
    assert not (tmp_path / "run").exists()
