"""sft.py: bad input exits 2 with one line naming the problem; a tiny end-to-end run writes eval.json
and a run directory that jaxllm.load reads."""

from __future__ import annotations

import importlib.util
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, kill_after_checkpoint

import jaxllm
from jaxllm.core.config import SFTConfig, load_config, resolve_model, save_config
from jaxllm.core.fileio import dir_lock, read_jsonl
from jaxllm.data.tokenizer import ByteTokenizer
from jaxllm.model.transformer import Transformer
from jaxllm.sft.finetune import finetune
from jaxllm.train import checkpoint as ckpt

spec = importlib.util.spec_from_file_location("sft_cli", ROOT / "sft.py")
sft_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sft_cli)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A jaxllm run directory holding a random tiny gpt2 (no training needed to test the plumbing)."""
    run_dir = tmp_path_factory.mktemp("base")
    cfg = load_config(None, ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "train.seq_len=32"])
    cfg.model = resolve_model(cfg.model, 256, 32)
    save_config(cfg, run_dir / "config.yaml")
    ByteTokenizer().save(run_dir)
    init = jax.jit(Transformer(cfg.model).init)  # one compile, not one per operation
    params = nn.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    saver = ckpt.Checkpointer(run_dir, keep=1)
    saver.save(1, {"params": params}, {"step": 1})
    saver.close()
    return run_dir


def run(capsys, *args: str) -> tuple[int, str]:
    code = sft_cli.main(["train.seq_len=32", *args])  # the base model's context
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    for f in fragments:
        assert f in err, err


def test_missing_default_model_exits_2_saying_to_run_train_py(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default config's init.from, runs/tiny, is relative
    code, err = sft_cli.main([]), capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "python train.py" in err


def test_malformed_jsonl_names_its_line(tmp_path, base_run, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n')
    assert_one_line_error(*run(capsys, f"init.from={base_run}", f"sft.data={data}"), "d.jsonl:2", "not valid JSON")


def test_record_without_its_fields_is_refused(tmp_path, base_run, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "x"}\n'
    )
    assert_one_line_error(
        *run(capsys, f"init.from={base_run}", f"sft.data={data}"), "d.jsonl:2", "'instruction' and 'output'"
    )


def test_unknown_method_is_refused(base_run, capsys):
    assert_one_line_error(*run(capsys, f"init.from={base_run}", "sft.method=qlora"), "sft.method='qlora'")


def test_lora_target_that_does_not_exist_is_refused(base_run, capsys):
    assert_one_line_error(*run(capsys, f"init.from={base_run}", "sft.method=lora", "lora.targets=q,gate"), "'gate'")


def test_method_learning_rate_sets_the_peak_and_scales_the_floor():
    from jaxllm.sft.finetune import method_optim

    cfg = load_config(
        None, ["sft.method=prompt", "prompt.lr=3e-2", "optim.lr=1e-3", "optim.min_lr=1e-4", "lora.lr=9"], cls=SFTConfig
    )
    assert (method_optim(cfg).lr, method_optim(cfg).min_lr) == pytest.approx((3e-2, 3e-3))
    cfg.sft.method = "full"  # optim as given
    assert (method_optim(cfg).lr, method_optim(cfg).min_lr) == (1e-3, 1e-4)


def test_bin_only_model_directory_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    assert_one_line_error(*run(capsys, f"init.from={tmp_path}"), "safetensors")


def test_init_from_neither_run_nor_hf_directory_is_refused(tmp_path, capsys):
    assert_one_line_error(*run(capsys, f"init.from={tmp_path}"), "neither a jaxllm run directory", "nor a Hugging Face")


@pytest.mark.slow
def test_data_parallel_lora_run_writes_eval_json_and_a_loadable_merged_model(tmp_path, base_run, capsys):
    run_dir = tmp_path / "sft"
    code, err = run(
        capsys,
        f"init.from={base_run}",
        f"run.dir={run_dir}",
        "sft.method=lora",
        "sft.n_train=20",
        "sft.n_eval=4",
        "sft.max_new_tokens=4",
        "train.steps=2",
        "train.batch_size=8",
        "mesh.data=-1",
        "log.every=1",
    )
    assert code == 0, err
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result) == {"before", "after"}
    assert set(result["after"]) == {"overall", "reverse", "upper", "sort", "add", "repeat", "lookup"}
    loaded = jaxllm.load(run_dir)
    assert loaded.tokenizer.special == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert "lora_a" not in str(jax.tree_util.tree_structure(loaded.params))
    assert "new_tokens" not in loaded.params and loaded.params["wte"]["embedding"].shape[0] == 256 + 4  # merged
    assert np.isfinite(np.asarray(loaded.logits(np.zeros((1, 4), np.int32)))).all()


@pytest.mark.slow
def test_prompt_tuned_run_loads_with_its_prompt_in_front_of_every_input(tmp_path, base_run, capsys):
    run_dir = tmp_path / "sft"
    code, err = run(
        capsys,
        f"init.from={base_run}",
        f"run.dir={run_dir}",
        "sft.method=prompt",
        "prompt.n_virtual_tokens=4",
        "sft.n_train=20",
        "sft.n_eval=4",
        "sft.max_new_tokens=4",
        "train.steps=2",
        "train.batch_size=8",
        "log.every=1",
    )
    assert code == 0, err
    loaded = jaxllm.load(run_dir)
    assert loaded.config.model.prompt_tokens == 4 and loaded.params["prompt"].shape == (4, 32)
    tokens = np.arange(1, 7, dtype=np.int32)[None]
    prefixed = Transformer(loaded.config.model).apply({"params": loaded.params}, np.pad(tokens, ((0, 0), (4, 0))))
    np.testing.assert_allclose(loaded.logits(tokens), prefixed[:, 4:], rtol=1e-5, atol=1e-6)  # jitted vs eager
    without = loaded.params | {"prompt": jnp.zeros_like(loaded.params["prompt"])}  # the prompt does matter
    assert not np.allclose(
        loaded.logits(tokens),
        Transformer(loaded.config.model).apply({"params": without}, np.pad(tokens, ((0, 0), (4, 0))))[:, 4:],
    )
    assert len(loaded.generate("ab", max_new_tokens=3, temperature=0)) > 0
    with pytest.raises(jaxllm.core.errors.ConfigError, match="prompt-tuned model has no Hugging Face form"):
        loaded.save_hf(tmp_path / "hf")


# --------------------------------------------------------------------------- the run directory


SMALL = ["sft.n_train=20", "sft.n_eval=4", "sft.max_new_tokens=4", "train.steps=2", "train.batch_size=8", "log.every=1"]


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_sft_into_its_own_init_from_is_refused_and_changes_nothing(base_run, capsys):
    before = snapshot(base_run)
    assert_one_line_error(*run(capsys, f"init.from={base_run}", f"run.dir={base_run}", *SMALL), "is init.from")
    assert snapshot(base_run) == before


def test_sft_into_a_pretraining_run_directory_is_refused(base_run, tmp_path, capsys):
    other = tmp_path / "pretrained"
    shutil.copytree(base_run, other)
    before = snapshot(other)
    assert_one_line_error(*run(capsys, f"init.from={base_run}", f"run.dir={other}", *SMALL), "no fine-tuning run")
    assert snapshot(other) == before


@pytest.fixture(scope="module")
def finished_sft(base_run, tmp_path_factory):
    """A finished fine-tuning run of SMALL (run once for the module); copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    assert sft_cli.main(["train.seq_len=32", f"init.from={base_run}", f"run.dir={run_dir}", *SMALL]) == 0
    return run_dir


@pytest.mark.slow
def test_the_same_sft_twice_into_one_directory_resumes_and_rewrites_nothing(base_run, finished_sft, tmp_path, capsys):
    shutil.copytree(finished_sft, tmp_path / "sft")
    args = [f"init.from={base_run}", f"run.dir={tmp_path / 'sft'}", *SMALL]
    first = snapshot(tmp_path / "sft" / "checkpoints")
    eval_json = (tmp_path / "sft" / "eval.json").read_text()
    code, err = run(capsys, *args)
    assert code == 0, err
    assert "resuming at step 2" in err
    assert snapshot(tmp_path / "sft" / "checkpoints") == first
    assert (tmp_path / "sft" / "eval.json").read_text() == eval_json
    steps = [r["step"] for r in read_jsonl(tmp_path / "sft" / "metrics.jsonl")]
    assert steps == [1, 2]


@pytest.mark.slow
def test_sft_of_another_config_into_an_existing_run_is_refused(base_run, finished_sft, tmp_path, capsys):
    shutil.copytree(finished_sft, tmp_path / "sft")
    args = [f"init.from={base_run}", f"run.dir={tmp_path / 'sft'}", *SMALL]
    before = snapshot(tmp_path / "sft")
    assert_one_line_error(*run(capsys, *args, "sft.n_train=30"), "another config", "sft.n_train: 20 vs 30")
    assert snapshot(tmp_path / "sft") == before


def test_a_second_sft_on_one_run_directory_is_refused(base_run, tmp_path, capsys):
    with dir_lock(tmp_path / "sft", "a running sft.py"):
        assert_one_line_error(
            *run(capsys, f"init.from={base_run}", f"run.dir={tmp_path / 'sft'}", *SMALL), "is writing to"
        )
    assert [p.name for p in (tmp_path / "sft").iterdir()] == [".lock"]


def sft_losses(run_dir) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(run_dir / "metrics.jsonl", torn_tail_ok=True)]


@pytest.mark.slow
def test_sft_sigkill_after_a_checkpoint_then_rerun_gives_bitwise_identical_losses(base_run, tmp_path, capsys):
    """Only the killed run needs a process of its own; the uninterrupted reference and the rerun fine-tune
    in this one, on one device and from sft.py's default config as the process does."""
    args = [
        f"init.from={base_run}",
        "train.seq_len=32",
        *SMALL,
        "train.steps=16",
        "checkpoint.every=4",
        "checkpoint.keep=10",
        "sft.method=lora",
        "log.progress=false",
        "log.tensorboard=false",
    ]

    def run_here(run_dir):
        finetune(
            load_config(None, [*args, f"run.dir={run_dir}"], cls=SFTConfig, default=str(sft_cli.DEFAULT_CONFIG)),
            jax.devices()[:1],
        )

    run_here(tmp_path / "ref")
    killed = tmp_path / "killed"
    kill_after_checkpoint("sft.py", args, killed, 8)
    capsys.readouterr()
    run_here(killed)
    assert "resuming at step" in capsys.readouterr().err
    assert sft_losses(killed) == sft_losses(tmp_path / "ref")  # exact float equality, every step


def test_a_model_override_that_changes_the_base_shape_exits_2(base_run, capsys):
    assert_one_line_error(
        *run(capsys, f"init.from={base_run}", "model.d_model=64"), "model.d_model=64 would change init.from's model"
    )
