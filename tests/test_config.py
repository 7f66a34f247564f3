"""The config contract: YAML + dotted overrides, typed, every key documented, mistakes named."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import ROOT

from jaxllm.config import Config, help_text, load_config, validate
from jaxllm.errors import ConfigError


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
