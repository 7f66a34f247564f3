"""Typed configuration: dataclasses, loaded from YAML, then dotted ``section.key=value`` overrides.

Every key has a default and a one-line meaning (``python train.py --help`` prints them all).
Validation that needs no devices happens in :func:`validate`, before anything compiles or writes.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from jaxllm.core.config_schema import (  # the schema, re-exported: callers import its sections from here
    INT32_MAX,
    NON_NEGATIVE,
    POSITIVE,
    AdapterConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    DistillConfig,
    EvalConfig,
    InitConfig,
    LogConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    PipelineConfig,
    PromptConfig,
    RunConfig,
    SFTConfig,
    SFTSection,
    TrainConfig,
    option,
)
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import atomic_write, check_folder_path, read_yaml

__all__ = [  # the public face of the configuration: schema, loading, validation
    "ARCHS",
    "ATTENTIONS",
    "DTYPES",
    "INT32_MAX",
    "NON_NEGATIVE",
    "POSITIVE",
    "SCHEDULES",
    "AdapterConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DistConfig",
    "DistillConfig",
    "EvalConfig",
    "InitConfig",
    "LoRAConfig",
    "LogConfig",
    "MeshConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "PromptConfig",
    "RunConfig",
    "SFTConfig",
    "SFTSection",
    "TrainConfig",
    "check_fields",
    "from_dict",
    "help_text",
    "load_config",
    "option",
    "read_history",
    "resolve",
    "resolve_model",
    "save_config",
    "set_key",
    "to_dict",
    "validate",
    "validate_distill",
    "validate_model",
    "validate_pipeline",
]

# --------------------------------------------------------------------------- loading


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Converts a YAML or command-line value to the dataclass field's type, or says why not."""
    if typ == dict | None:
        if isinstance(value, str):  # a command-line override such as mesh.rules="{embed: null}"
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: cannot parse {value!r}") from None
        if value is None or isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    if isinstance(value, str) and typ is float:
        try:
            return float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {value!r}") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _fields(obj: Any) -> dict[str, tuple[Any, str]]:
    hints = get_type_hints(type(obj))
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(obj)}


def _check_value(key: str, value: Any, sign: str | None) -> None:
    """Refuses a non-finite number anywhere, an integer beyond 32 bits (JAX's step counter, seeds and
    sizes are int32), and a value of the wrong sign where the key declares one."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if isinstance(value, int) and abs(value) > INT32_MAX:
        raise ConfigError(f"{key}={value} is too large; at most {INT32_MAX}")
    if (sign == POSITIVE and value <= 0) or (sign == NON_NEGATIVE and value < 0):
        raise ConfigError(f"{key} must be {sign}, got {value}")


def check_fields(node: Any, prefix: str) -> None:
    """:func:`_check_value` on every key of a config tree, for configs built in code rather than by
    :func:`set_key` (a Hugging Face config.json, ``dataclasses.replace``)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_value(key, value, f.metadata.get("sign"))


def _suggest(name: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(options))}"


def set_key(cfg: Any, dotted: str, value: Any) -> None:
    """Sets ``section.key`` (any depth) on a config tree, converting and checking the type."""
    *path, leaf = dotted.split(".")
    node, walked = cfg, []
    for part in path:
        if not dataclasses.is_dataclass(node) or part not in _fields(node):
            options = list(_fields(node)) if dataclasses.is_dataclass(node) else []
            where = ".".join(walked) or "config"
            raise ConfigError(
                f"unknown config section {'.'.join(walked + [part])!r} in {where}{_suggest(part, options)}"
            )
        node, walked = getattr(node, part), walked + [part]
    fields_ = _fields(node) if dataclasses.is_dataclass(node) else {}
    if leaf in fields_ and dataclasses.is_dataclass(getattr(node, leaf)):
        raise ConfigError(f"{dotted} is a section: give its keys ({dotted}.KEY), not a value")
    if leaf not in fields_:
        raise ConfigError(f"unknown config key {dotted!r}{_suggest(leaf, list(fields_))}")
    typ, _ = fields_[leaf]
    value = _coerce(value, typ, dotted)
    _check_value(dotted, value, next(f for f in dataclasses.fields(node) if f.name == leaf).metadata.get("sign"))
    setattr(node, leaf, value)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.endswith("mesh.rules"):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


# A saved run config's record of the changes a resumed run was allowed (``run.allow_changes``): not a key
HISTORY = "history"


def load_config(path: str | None, overrides: list[str] = (), cls: type = Config, default: str | None = None) -> Any:
    """Builds a config from an optional YAML file (else ``default``) and ``key=value`` overrides."""
    cfg = cls()
    path = path or default
    if path:
        tree = read_yaml(path, "config file")
        for key, value in _flatten({k: v for k, v in tree.items() if k != HISTORY}):
            set_key(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict, cls: type = Config) -> Any:
    """Rebuilds a config saved with :func:`save_config` (unknown keys are an error)."""
    cfg = cls()
    for key, value in _flatten({k: v for k, v in tree.items() if k != HISTORY}):
        set_key(cfg, key, value)
    return cfg


def save_config(cfg: Any, path: Path, history: list[dict] = ()) -> None:
    """Writes ``cfg`` as YAML, with the ``history`` of allowed changes (a list of records) after it."""
    tree = to_dict(cfg) | ({HISTORY: list(history)} if history else {})
    atomic_write(path, yaml.safe_dump(tree, sort_keys=False))


def read_history(path: Path) -> list[dict]:
    """The ``history`` saved with a config file (empty when there is no file or no history)."""
    if not Path(path).is_file():
        return []
    history = read_yaml(path, "run config").get(HISTORY) or []
    valid = isinstance(history, list) and all(
        isinstance(h, dict) and isinstance(h.get("step"), int) and isinstance(h.get("changes"), dict) for h in history
    )
    if not valid:
        raise ConfigError(f"{path}: {HISTORY} must be a list of {{step: int, changes: {{...}}}} records")
    return history


def help_text(cls: type = Config, values: Any = None) -> str:
    """Every key with its default (or its value in ``values``, a config of ``cls``) and meaning (and the
    sign it must have, if any), one per line, grouped by section; a subsection (``model.moe``) is a
    line, then its keys."""

    def keys(obj: Any, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value, sign = getattr(obj, f.name), f" ({f.metadata['sign']})" if f.metadata.get("sign") else ""
            shown = "{...}" if dataclasses.is_dataclass(value) else repr(value)
            out.append(f"  {prefix}.{f.name} = {shown:<12}  {f.metadata.get('help', '')}{sign}")
            if dataclasses.is_dataclass(value):
                out += keys(value, f"{prefix}.{f.name}")
        return out

    lines = []
    for section in dataclasses.fields(cls):
        node = getattr(values, section.name) if values is not None else section.default_factory()
        lines += [f"{section.name}:"] + keys(node, section.name)
    return "\n".join(lines)


# --------------------------------------------------------------------------- validation

ARCHS = ("gpt2", "llama")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("xla", "chunked", "cudnn", "splash", "auto")  # jaxllm.model.attention
REMATS = ("none", "full", "dots", "dots_no_batch", "offload")  # jaxllm.model.remat
MATMUL_DTYPES = ("default", "fp8")  # jaxllm.model.fp8


def resolve_model(m: ModelConfig, vocab_size: int, seq_len: int) -> ModelConfig:
    """Fills the model's derived sizes (0 = automatic) from the tokenizer and sequence length."""
    m = dataclasses.replace(m)
    if m.n_kv_head == 0:
        m.n_kv_head = m.n_head
    if m.d_ff == 0:
        m.d_ff = 4 * m.d_model if m.arch == "gpt2" else 64 * -(-(8 * m.d_model // 3) // 64)
    if m.vocab_size == 0:  # a multiple of 64: the embedding splits over tensor-parallel devices
        m.vocab_size = -(-vocab_size // 64) * 64
    elif m.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            f"set model.vocab_size=0 or at least {vocab_size}"
        )
    if m.max_seq_len == 0:
        m.max_seq_len = seq_len
    elif m.max_seq_len < seq_len:
        raise ConfigError(f"model.max_seq_len={m.max_seq_len} is shorter than train.seq_len={seq_len}")
    return m


def resolve(cfg: Any, vocab_size: int) -> Any:
    """A copy of ``cfg`` (a :class:`Config` or :class:`SFTConfig`) whose model has every automatic size
    filled in (:func:`resolve_model`): what preparing a run returns and every function below takes."""
    return dataclasses.replace(cfg, model=resolve_model(cfg.model, vocab_size, cfg.train.seq_len))


def validate_model(m: ModelConfig) -> None:
    check_fields(m, "model")
    if m.arch not in ARCHS:
        raise ConfigError(f"model.arch={m.arch!r} is unknown; choose one of {', '.join(ARCHS)}")
    if m.norm_position not in ("pre", "post"):
        raise ConfigError(f"model.norm_position={m.norm_position!r} must be pre or post")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={m.dtype!r} must be one of {', '.join(DTYPES)}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise ConfigError(f"model.n_head={m.n_head} is not divisible by model.n_kv_head={m.n_kv_head}")
    if m.arch == "llama" and (m.d_model // m.n_head) % 2:
        raise ConfigError(f"RoPE needs an even head size; d_model/n_head = {m.d_model // m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if m.max_seq_len and m.prompt_tokens >= m.max_seq_len:
        raise ConfigError(f"model.prompt_tokens must be in [0, max_seq_len={m.max_seq_len}), got {m.prompt_tokens}")
    if m.attention not in ATTENTIONS:
        raise ConfigError(f"model.attention={m.attention!r} is unknown; choose one of {', '.join(ATTENTIONS)}")
    if m.remat not in REMATS:
        raise ConfigError(f"model.remat={m.remat!r} is unknown; choose one of {', '.join(REMATS)}")
    if m.matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"model.matmul_dtype={m.matmul_dtype!r} must be one of {', '.join(MATMUL_DTYPES)}")
    e = m.moe
    if e.n_experts and e.top_k > e.n_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} exceeds model.moe.n_experts={e.n_experts}")
    if e.n_experts and m.n_layer % e.every:
        raise ConfigError(f"model.moe.every={e.every} does not divide model.n_layer={m.n_layer}")


def validate(cfg: Config) -> None:
    """Checks everything that can be checked without devices or data (signs and finiteness again, for
    a config built in code), and that ``run.dir`` can be a folder."""
    check_fields(cfg, "")
    validate_model(cfg.model)
    t, o = cfg.train, cfg.optim
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.eval.sample_tokens and (cfg.model.max_seq_len or t.seq_len) < 2:
        # the sample's prompt gets half the context, and at least one token of each is needed
        raise ConfigError(
            f"train.seq_len={t.seq_len} leaves no room for the evaluation sample's prompt and "
            "continuation; use train.seq_len >= 2 or eval.sample_tokens=0"
        )
    if cfg.model.loss_chunk and t.seq_len % cfg.model.loss_chunk:
        raise ConfigError(f"model.loss_chunk={cfg.model.loss_chunk} does not divide train.seq_len={t.seq_len}")
    if cfg.mesh.context > 1 and t.seq_len % (2 * cfg.mesh.context):
        raise ConfigError(
            f"train.seq_len={t.seq_len} is not divisible by 2*mesh.context={2 * cfg.mesh.context} "
            "(context parallelism's zig-zag split)"
        )
    validate_pipeline(cfg.pipeline)
    validate_distill(cfg.distill)
    check_folder_path(cfg.run.dir, "run.dir")


def validate_pipeline(p: PipelineConfig) -> None:
    """The pipeline keys alone; sizes that need the mesh are checked by ``jaxllm.parallel.pipeline.check``."""
    if p.schedule not in ("gpipe", "circular", "1f1b"):
        raise ConfigError(f"pipeline.schedule={p.schedule!r} is unknown; choose one of gpipe, circular, 1f1b")
    if p.repeats > 1 and p.schedule != "circular":
        raise ConfigError(f"pipeline.repeats={p.repeats} needs pipeline.schedule=circular")


def validate_distill(d: DistillConfig) -> None:
    """The distillation keys alone; the teacher's run is checked by ``jaxllm.train.distill.check_teacher``."""
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1], got {d.alpha}")
