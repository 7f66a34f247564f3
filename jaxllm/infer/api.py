"""``jaxllm.load(run_dir)``: a trained model for people, with its config, params and tokenizer.

``jaxllm.load`` also reads a Hugging Face GPT-2 / LLaMA / Mixtral directory (config.json, *.safetensors, and
tokenizer.json if it has one: without, ``logits`` and ``generate_ids`` work on token ids), and
``model.save_hf(out_dir)`` writes one back (:mod:`jaxllm.hf.convert`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.core.config import Config, ModelConfig, from_dict, resolve_model, validate_model
from jaxllm.core.errors import ConfigError
from jaxllm.core.fileio import read_yaml
from jaxllm.data import tokenizer as tokenizers
from jaxllm.hf import convert as hf
from jaxllm.hf import tokenizer_export as tok_export
from jaxllm.model import decode as gen
from jaxllm.model import quantize as quant
from jaxllm.model.transformer import Transformer, linear_axes
from jaxllm.train import checkpoint as ckpt

PLACEHOLDER = 0  # token id at a prompt-tuned model's first model.prompt_tokens positions; the model replaces it


@dataclass(frozen=True)
class NoTokenizer:
    """The tokenizer of a Hugging Face directory of weights alone (as ``transformers`` loads them):
    every use of text is one line saying so; token ids work (``logits``, ``generate_ids``)."""

    directory: str

    def _refuse(self, *_args) -> Any:
        raise ConfigError(
            f"{self.directory} has no {tokenizers.FILENAME}: this model reads and writes token ids "
            "only (logits, generate_ids), not text"
        )

    encode = decode = save = _refuse


@dataclass
class LoadedModel:
    """A model ready to use: ``.logits(tokens)`` and ``.generate(prompt, ...)``."""

    config: Config
    params: Any
    tokenizer: tokenizers.Tokenizer | NoTokenizer
    declared_eos: tuple[int, ...] = ()  # the ids a Hugging Face checkpoint ends on (hf.declared_eos)

    def __post_init__(self):
        self.module = Transformer(self.config.model, deterministic=True)
        self._logits = jax.jit(self._prefixed_logits)
        self.decoder = gen.Decoder(self.config.model)

    def _prefixed_logits(self, params, tokens_BxT: jax.Array) -> jax.Array:
        """float32 logits of ``tokens`` after the placeholders of a learned prompt, if the model has one."""
        n_prefix = len(self.prefix)
        tokens_BxT = jnp.pad(tokens_BxT, ((0, 0), (n_prefix, 0)), constant_values=PLACEHOLDER)
        return self.module.apply({"params": params}, tokens_BxT)[:, n_prefix:].astype(jnp.float32)

    @property
    def prefix(self) -> list[int]:
        """Placeholders put before every input: the positions of a prompt-tuned model's learned prompt."""
        return [PLACEHOLDER] * self.config.model.prompt_tokens

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a generation: those the checkpoint declares (``hf.declared_eos``), the
        tokenizer's own (its ``tokenizer_config.json``'s ``eos_token``, else a conventional name) and a
        chat model's end of answer (:func:`jaxllm.hf.tokenizer_export.roles`); not ids outside the
        vocabulary (``transformers``' GPT-2 config names 50256 whatever the vocabulary)."""
        if isinstance(self.tokenizer, NoTokenizer):
            return tuple(i for i in dict.fromkeys(self.declared_eos) if 0 <= i < self.config.model.vocab_size)
        return self.roles.stop

    @property
    def roles(self) -> tok_export.Roles:
        """The bos/eos/pad ids of this model's tokenizer, as its Hugging Face export names them."""
        return tok_export.roles(self.tokenizer, self.declared_eos, self.config.model.vocab_size)

    def logits(self, tokens_BxT) -> jax.Array:
        """float32 ``[B, T, V]`` next-token logits for integer tokens ``[B, T]`` (after the prefix, if any);
        ids outside the vocabulary or rows longer than the context are refused (ConfigError)."""
        tokens_BxT = np.asarray(tokens_BxT)
        if tokens_BxT.ndim != 2 or 0 in tokens_BxT.shape:
            raise ConfigError(f"logits takes token ids of shape [batch, positions], got shape {tokens_BxT.shape}")
        m = self.config.model
        gen.check_tokens(tokens_BxT, m.vocab_size, m.max_seq_len - len(self.prefix))
        return self._logits(self.params, jnp.asarray(tokens_BxT, jnp.int32))

    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token=None,
    ) -> str | list[str]:
        """The text that follows ``prompt`` (or each of a list of prompts, decoded as one batch), by
        cached decoding; temperature 0 = greedy; stops at an end-of-sequence token (:attr:`eos_ids`).
        ``on_token(i, tokens_B)`` sees each step's tokens as they are chosen."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.generate_ids(
            [self.tokenizer.encode(p) for p in prompts],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            on_token=on_token,
            eos_ids=self.eos_ids,
        )
        texts = [self.tokenizer.decode(row) for row in ids]
        return texts[0] if isinstance(prompt, str) else texts

    def generate_ids(
        self, prompts: list[list[int]], max_new_tokens: int = 100, eos_ids: tuple[int, ...] = (), **sampling
    ) -> list[list[int]]:
        """The new token ids after each prompt of token ids (one batch), cut before the first of ``eos_ids``;
        ``sampling``: temperature, top_k, top_p, seed, on_token as for :meth:`generate`."""
        m = self.config.model
        for p in prompts:
            gen.check_tokens(np.asarray([p]), m.vocab_size, m.max_seq_len - len(self.prefix))
        return self.decoder(
            self.params, [self.prefix + list(p) for p in prompts], max_new_tokens, eos_ids=eos_ids, **sampling
        )

    def save_hf(self, out_dir: str | Path, max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> None:
        """A Hugging Face directory that ``transformers`` loads (``GPT2LMHeadModel`` /
        ``LlamaForCausalLM`` / ``MixtralForCausalLM``), with this model's tokenizer (if it has one)
        in Hugging Face's format, its roles and chat template (:mod:`jaxllm.hf.tokenizer_export`),
        and a ``generation_config.json`` naming :attr:`eos_ids`, so that ``transformers``'
        ``generate`` stops where this model does; weights over ``max_shard_bytes`` go in several
        files and an index."""
        if self.config.model.prompt_tokens:
            raise ConfigError(
                "a prompt-tuned model has no Hugging Face form (its learned prompt is not a weight "
                "transformers knows); use it through jaxllm.load"
            )
        m = self.config.model
        if isinstance(self.tokenizer, NoTokenizer):
            generation = {"eos_token_id": list(self.eos_ids)} if self.eos_ids else {}
            hf.write(m, self.params, out_dir, max_shard_bytes, {}, generation)
            return
        roles = self.roles
        hf.write(m, self.params, out_dir, max_shard_bytes, roles.config_ids(), roles.generation_ids())
        if jax.process_index() == 0:
            tok_export.write(self.tokenizer, roles, Path(out_dir), m.max_seq_len)


def load(path: str | Path, quantize: str | None = None, group_size: int = 64, shardings: Any = None) -> LoadedModel:
    """Loads the latest checkpoint of a jaxllm run directory, or a Hugging Face GPT-2 / LLaMA / Mixtral directory
    (safetensors only), onto the default device; a Hugging Face directory streams instead into
    ``shardings`` when given (a tree like the params, e.g. ``sharding.logical_shardings`` of the run's
    mesh), each device reading only its blocks.

    ``quantize``: ``"int8"`` (per output channel) or ``"int4"`` (per ``group_size`` input rows) stores
    every matmul weight as integers, dequantized inside the matmul (:mod:`jaxllm.model.quantize`)."""
    if quantize is not None:
        quant.check_mode(quantize)
    run_dir = Path(path)
    tokenizer_optional, eos = False, ()
    if (run_dir / "config.yaml").is_file():
        cfg, params = _read_run(run_dir)
    elif hf.is_hf_dir(run_dir):
        model_cfg, params = hf.read(run_dir, shardings)
        cfg, tokenizer_optional, eos = Config(model=model_cfg), True, hf.declared_eos(run_dir)
    else:
        raise ConfigError(
            f"{str(run_dir)!r} is neither a jaxllm run directory (config.yaml) "
            "nor a Hugging Face model directory (config.json)"
        )
    _check_params(cfg, params, run_dir)
    if quantize is not None:
        params = quant.quantize_params(params, linear_axes(Transformer(cfg.model), params), quantize, group_size)
    if tokenizer_optional and not (run_dir / tokenizers.FILENAME).is_file():
        return LoadedModel(cfg, params, NoTokenizer(str(run_dir)), eos)
    return LoadedModel(cfg, params, tokenizers.load(run_dir), eos)


def model_config(path: str | Path) -> ModelConfig:
    """The model config of a jaxllm run directory or a Hugging Face directory, no weights read: what
    a caller needs to lay out the parameters' shardings before :func:`load` streams them in."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return _run_config(path).model
    if hf.is_hf_dir(path):
        return hf.read_config(path)
    raise ConfigError(
        f"{str(path)!r} is neither a jaxllm run directory (config.yaml) "
        "nor a Hugging Face model directory (config.json)"
    )


def _check_params(cfg: Config, params: Any, where: Path) -> None:
    """Refuses parameters whose names or shapes are not those of the model the config describes."""
    m = cfg.model
    dummy = jnp.zeros((1, m.max_seq_len), jnp.int32)
    expected = jax.eval_shape(lambda: nn.unbox(Transformer(m).init(jax.random.PRNGKey(0), dummy)["params"]))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for name in sorted(want.keys() | got.keys()):
        if want.get(name) != got.get(name):
            raise ConfigError(
                f"{str(where)!r}: parameter {name} is {got.get(name, 'missing')} but its config describes "
                f"{want.get(name, 'no such parameter')}; the weights and the config disagree"
            )


def _run_config(run_dir: Path) -> Config:
    cfg = from_dict(read_yaml(run_dir / "config.yaml", "run config"))
    if cfg.model.vocab_size <= 0:  # training writes the size it resolved from its tokenizer
        raise ConfigError(
            f"{str(run_dir / 'config.yaml')!r} gives model.vocab_size={cfg.model.vocab_size}, but a saved run "
            "records the size it was trained with; restore that value (the embedding's rows)"
        )
    cfg.model = resolve_model(cfg.model, 0, cfg.train.seq_len)  # training saves it resolved; a hand edit may not
    validate_model(cfg.model)
    return cfg


def _read_run(run_dir: Path) -> tuple[Config, Any]:
    cfg = _run_config(run_dir)
    folder = run_dir / "checkpoints"
    if not (folder.is_dir() and any(folder.iterdir())):  # checked first: orbax would create the folder
        raise ConfigError(f"{str(run_dir)!r} has no checkpoint yet")
    checkpointer = ckpt.Checkpointer(run_dir, keep=cfg.checkpoint.keep)
    try:
        return cfg, _newest_readable(checkpointer, run_dir)["params"]
    finally:
        checkpointer.close()


def _newest_readable(checkpointer: ckpt.Checkpointer, run_dir: Path) -> Any:
    """The newest checkpoint's state that restores, warning about each newer one that does not. Nothing
    is moved or renamed: loading only reads (training's restore sets unreadable ones aside)."""
    failures = []
    for found in checkpointer.newest_first(lambda step, _meta: checkpointer.restore_single_device(step)):
        if not found.intact:
            failures.append(f"{found.step} ({found.unreadable or 'fails its checksums'})")
            continue
        if failures:
            print(
                f"warning: checkpoint {', '.join(failures)} of {run_dir} is damaged; loaded step {found.step}",
                file=sys.stderr,
            )
        return found.state
    raise ConfigError(f"{str(run_dir)!r} has no readable checkpoint (unreadable: {', '.join(failures) or 'none'})")
