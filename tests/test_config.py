"""The config contract: YAML + dotted overrides, typed, every key documented, mistakes named."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT

from jaxllm.core.config import Config, SFTConfig, help_text, load_config, validate
from jaxllm.core.errors import ConfigError, UserError


def test_overrides_are_typed_and_applied_over_yaml():
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), ["model.n_layer=3", "optim.lr=5e-4", "model.residual=false"])
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 5e-4
    assert cfg.model.residual is False
    assert cfg.data.source == "stdlib"


def test_mistyped_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'model.n_layers'.*did you mean 'n_layer'"):
        load_config(None, ["model.n_layers=2"])


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        load_config(None, ["modle.n_layer=2"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(None, ["train.steps=ten"])


def test_help_lists_every_key_with_a_meaning():
    text = help_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            line = next(line for line in text.splitlines() if line.strip().startswith(f"{section.name}.{f.name} "))
            assert len(line.split("  ")[-1].strip()) > 5, line


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_model=130", "not divisible by model.n_head"),
        ("model.n_kv_head=3", "not divisible by model.n_kv_head"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("train.steps=0", "train.steps must be positive"),
        ("train.seq_len=-1", "train.seq_len must be positive"),
        ("model.arch=bert", "model.arch='bert' is unknown"),
        ("model.scan_unroll=0", "model.scan_unroll must be positive"),
        ("dist.cpu_devices=-1", "dist.cpu_devices must be >= 0"),
    ],
)
def test_invalid_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("model.rope_theta=-inf", "model.rope_theta must be a finite number"),
        ("log.every=0", "log.every must be positive, got 0"),
        ("eval.batches=0", "eval.batches must be positive, got 0"),
        ("data.bpe_vocab_size=0", "data.bpe_vocab_size must be positive, got 0"),
        ("eval.temperature=-1", "eval.temperature must be >= 0, got -1.0"),
        ("train.seed=-3", "train.seed must be >= 0, got -3"),
        ("train.seq_len=1", "train.seq_len=1 leaves no room for the evaluation sample"),
    ],
)
def test_values_are_refused_before_anything_is_written(override, message):
    """Issue 12 item 9: these were accepted and failed at step 2 or at the first evaluation."""
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override]))


def test_signs_are_checked_as_a_yaml_value_is_set_for_every_config_class(tmp_path):
    """sft.py's config never goes through validate(): the check happens when the key is set."""
    path = tmp_path / "c.yaml"
    path.write_text("log:\n  every: 0\n")
    with pytest.raises(ConfigError, match="log.every must be positive, got 0"):
        load_config(str(path), cls=SFTConfig)


def test_a_config_built_in_code_is_checked_by_validate():
    cfg = Config()
    cfg.optim.lr = float("nan")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        validate(cfg)


@pytest.mark.parametrize(
    "text, message",
    [
        (b"a: &x {b: *x}\n", "refers to itself"),
        (b"train:\n  steps: \xff\n", r"is not UTF-8 text \(byte 16"),
        (b"- 1\n- 2\n", "must hold a mapping"),
        (b"train: {steps: [\n", "is not valid YAML"),
        (b"model: 3\n", "model is a section"),
    ],
)
def test_a_bad_config_file_is_one_user_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError, match=message):
        load_config(str(path))


def test_run_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="lies under .*, a file, not a folder"):
        validate(load_config(None, [f"run.dir={tmp_path / 'f' / 'run'}"]))
    with pytest.raises(UserError, match="is a file, not a folder"):
        validate(load_config(None, [f"run.dir={tmp_path / 'f'}"]))


def test_help_marks_each_keys_sign():
    text = help_text()
    assert "train.steps = 1000          optimizer steps (positive)" in text
    assert "optim.clip_norm = 1.0           clip the global gradient norm to this; 0 = no clipping (>= 0)" in text
    assert "model.arch = 'gpt2'" in text and "(positive)" not in next(x for x in text.splitlines() if ".arch =" in x)


def test_train_help_shows_the_values_a_bare_run_uses(capsys):
    import train

    tiny = load_config(str(ROOT / "configs" / "tiny.yaml"))
    assert tiny.optim.lr != Config().optim.lr  # else the test could not tell the two apart
    assert train.main(["--help"]) == 0
    assert f"optim.lr = {tiny.optim.lr!r}" in capsys.readouterr().out
