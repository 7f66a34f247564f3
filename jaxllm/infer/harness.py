"""lm-evaluation-harness on jaxllm's own forward pass and KV-cache decoding.

:class:`JaxllmLM` is the harness's ``LM`` (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``) over a :class:`Backend`: a model's parameters, a ``(params, tokens_BxT) -> logits``
function, a decoder and the tokenizer. It scores as the harness's own ``hf`` backend does on the
model's Hugging Face export (:mod:`jaxllm.hf.tokenizer_export` names the same bos/eos/pad there), so the
two give the same scores:

    loglikelihood   context + continuation encoded whole, the context's ids split off (the harness's
                    ``TemplateLM``); an empty context is the prefix token (bos, else eos); the last
                    max_len + 1 tokens are kept (truncated from the left, said once); a batch of B
                    rows right-padded to a multiple of 16 positions runs one jitted forward pass that
                    returns only each position's log-probability of its target and whether it is the
                    argmax, ``[B, T]``, never the ``[B, T, V]`` logits
    rolling         the harness's disjoint windows of max_len tokens, each scored as above, summed
    generate_until  contexts left-truncated to max_len - max_gen_toks, B at a time through the KV-cache
                    decoder (greedy, or sampled when the task asks), cut at the end-of-sequence ids and
                    at the first stop string, special tokens dropped from the text

Batches keep one shape (B rows, the last one padded), so a task compiles a few programs, not one per
request; rows divide over the mesh's data axes. Text is encoded with the tokenizer's Hugging Face form
(``Tokenizer.hf_tokenizer``, the very ids jaxllm encodes to), which drops a character a char tokenizer
does not know, as ``transformers`` does, where jaxllm's own encoder would refuse it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxllm.core.config import MeshConfig, from_dict
from jaxllm.core.errors import ConfigError, DataError
from jaxllm.core.fileio import read_yaml
from jaxllm.data import tokenizer as tokenizers
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.hf.tokenizer_export import Roles
from jaxllm.infer import api
from jaxllm.parallel import sharding

WIDTH_MULTIPLE = 16  # padded widths: a few compiled programs per task, not one per length


@dataclass
class Backend:
    """What the harness needs of a model: ``logits_fn(params, tokens_BxT) -> logits_BxTxV`` and
    ``decode_fn(params, prompts, n_new, eos_ids=..., temperature=..., ...) -> new ids per prompt``
    (both stable functions, so their compiled programs are reused across evaluations), the tokenizer
    and its roles, the longest input ``max_len``, and the mesh context the model runs under."""

    params: Any
    logits_fn: Callable
    decode_fn: Callable
    tokenizer: Tokenizer
    roles: Roles
    max_len: int
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    rows_multiple: int = 1  # the batch's rows divide over the data axes of the mesh
    batch_sharding: Any = None  # where a batch of tokens goes: its rows over the data axes
    notices: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def _scorer(logits_fn: Callable) -> Callable:
    """Jitted ``(params, tokens_BxT, targets_BxT) -> (log p(target) [B, T], target is the argmax [B, T])``."""

    def score(params, tokens_BxT, targets_BxT):
        logits_BxTxV = logits_fn(params, tokens_BxT).astype(jnp.float32)
        logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
        logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        return logp_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT

    return jax.jit(score)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class JaxllmLM(TemplateLM):
    """The harness's ``LM`` over a :class:`Backend`, ``batch_size`` requests per forward pass."""

    def __init__(self, backend: Backend, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        if backend.roles.eos is None and backend.roles.bos is None:
            raise ConfigError("the tokenizer has neither an eos nor a bos token to start an empty context with")
        self.backend, self.max_gen_toks = backend, max_gen_toks
        self.rows = _round_up(batch_size, backend.rows_multiple)
        self.hf_tok = backend.tokenizer.hf_tokenizer()
        self.special_ids = {i for i, t in self.hf_tok.get_added_tokens_decoder().items() if t.special}

    # ---------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.backend.roles.eos if self.backend.roles.eos is not None else self.backend.roles.bos

    @property
    def prefix_token_id(self) -> int:
        return self.backend.roles.bos if self.backend.roles.bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.backend.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.hf_tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _notice(self, text: str) -> None:
        """Says ``text`` once per kind of notice (the first word names the kind)."""
        kind = text.split()[0]
        if kind not in self.backend.notices:
            self.backend.notices.append(kind)
            print(f"jaxllm.evaluate: {text}", file=sys.stderr)

    # ---------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation), every continuation token is the argmax)`` per request of
        ``(key, context ids, continuation ids)``."""
        rows = []
        for _key, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            if len(context) + len(continuation) > self.max_length + 1:
                self._notice(
                    f"truncated: a context is longer than the model's {self.max_length} tokens; cut from the left"
                )
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        pending = [(chunk, self._score_batch([rows[i] for i in chunk])) for chunk in _chunks(order, self.rows)]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for chunk, (logp_BxT, greedy_BxT) in pending:
            logp_BxT, greedy_BxT = np.asarray(logp_BxT), np.asarray(greedy_BxT)
            for r, i in enumerate(chunk):
                n, k = len(rows[i][0]) - 1, rows[i][1]
                out[i] = (float(logp_BxT[r, n - k : n].sum()), bool(greedy_BxT[r, n - k : n].all()))
        for (key, _, _), result in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def _score_batch(self, rows: list[tuple[list[int], int]]):
        """Dispatches one padded batch (not waited on): ``(logp_BxT, greedy_BxT)`` on the device."""
        width = min(_round_up(max(len(w) - 1 for w, _ in rows), WIDTH_MULTIPLE), self.max_length)
        tokens = np.zeros((self.rows, width), np.int32)
        targets = np.zeros((self.rows, width), np.int32)
        for r, (whole, _) in enumerate(rows):
            tokens[r, : len(whole) - 1], targets[r, : len(whole) - 1] = whole[:-1], whole[1:]
        sh = self.backend.batch_sharding
        tokens, targets = (jnp.asarray(a) if sh is None else jax.device_put(a, sh) for a in (tokens, targets))
        with self.backend.context():
            return _scorer(self.backend.logits_fn)(self.backend.params, tokens, targets)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, over the harness's disjoint windows of max_length."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string)
            for context, target in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, context, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The text each context continues with, by the task's generation settings, up to a stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            n_new = kwargs.pop("max_gen_toks")
            if n_new >= self.max_length:
                raise ConfigError(f"max_gen_toks={n_new} leaves no room for a context in {self.max_length} tokens")
            sampling = _sampling(kwargs)
            contexts = [self._context(requests[i].args[0], self.max_length - n_new) for i in members]
            order = sorted(range(len(members)), key=lambda j: -len(contexts[j]))
            for chunk in _chunks(order, self.rows):
                prompts = [contexts[j] for j in chunk]
                prompts += [prompts[0]] * (self.rows - len(prompts))  # one batch shape
                with self.backend.context():
                    new = self.backend.decode_fn(
                        self.backend.params, prompts, n_new, eos_ids=self.backend.roles.stop, **sampling
                    )
                for j, ids in zip(chunk, new, strict=False):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[members[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        return out

    def _context(self, text: str, limit: int) -> list[int]:
        ids = self.tok_encode(text) or [self.prefix_token_id]
        if len(ids) > limit:
            self._notice(f"truncated: a context is longer than the model's {limit} tokens; cut from the left")
        return ids[-limit:]


def _sampling(kwargs: dict) -> dict:
    """The decoder's sampling settings for the harness's generation kwargs (greedy unless sampling)."""
    if not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) == 0.0:
        return {"temperature": 0.0}
    return {
        "temperature": float(kwargs["temperature"]),
        "top_k": int(kwargs.get("top_k") or 0),
        "top_p": float(kwargs.get("top_p") or 1.0),
        "seed": int(kwargs.get("seed") or 0),
    }


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


# --------------------------------------------------------------------------- models


def backend(model: api.LoadedModel, mesh: jax.sharding.Mesh | None = None, rules: tuple = ()) -> Backend:
    """The :class:`Backend` of a loaded model (its parameters already on ``mesh``, if given)."""
    if isinstance(model.tokenizer, api.NoTokenizer):
        raise ConfigError(
            f"{model.tokenizer.directory} has no {tokenizers.FILENAME}: the harness's tasks are text, "
            "and this model reads token ids only"
        )

    def decode_fn(params, prompts, n_new, **sampling):
        return model.decoder(params, [model.prefix + list(p) for p in prompts], n_new, **sampling)

    extra = {}
    if mesh is not None:
        extra = {
            "context": lambda: _on_mesh(mesh, rules),
            "rows_multiple": int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES])),
            "batch_sharding": sharding.batch_sharding(mesh, leading=0),
        }
    m = model.config.model
    return Backend(model.params, model._prefixed_logits, decode_fn, model.tokenizer, model.roles,
                   m.max_seq_len - len(model.prefix), **extra)  # fmt: skip


@contextlib.contextmanager
def _on_mesh(mesh: jax.sharding.Mesh, rules: tuple):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def load(path: str, quantize: str | None = None) -> tuple[api.LoadedModel, Backend]:
    """A jaxllm run (on its mesh config, over this process's devices) or a Hugging Face directory (data
    parallel over them), its parameters placed by their logical names, and its :class:`Backend`."""
    from jaxllm.hf import stream as hf_stream

    m = api.model_config(path)
    run = Path(path) / "config.yaml"  # a jaxllm run: its own mesh config
    mesh_cfg = from_dict(read_yaml(run, "run config")).mesh if run.is_file() else MeshConfig()
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
    with _on_mesh(mesh, rules):
        boxed = hf_stream.abstract_params(m)
        sharding.check_param_divisible(boxed, mesh, rules)
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    model = api.load(path, quantize=quantize, shardings=shardings)
    if quantize is None:
        model.params = jax.device_put(model.params, shardings)
    return model, backend(model, mesh, rules)


# --------------------------------------------------------------------------- tasks and runs


def task_manager(tasks: list[str], include_path: str | None):
    """The harness's ``TaskManager`` that knows every one of ``tasks``: the local task files of
    ``include_path`` alone when they define them all (no scan of the built-in registry), else with
    the registry (HellaSwag, ARC, ...). A task file that does not parse, or a task neither knows,
    is a one-line DataError."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    if include_path is not None:
        root = Path(include_path)
        if not root.is_dir():
            raise DataError(f"--include-path {include_path!r} is not a directory of task files")
        for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
            try:
                load_yaml(path, resolve_func=False)
            except Exception as e:  # noqa: BLE001  (yaml and lm_eval raise many kinds)
                raise DataError(f"task file {path} does not parse: {' '.join(str(e).split())[:200]}") from None
        local = TaskManager(include_path=str(root), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"unknown task {', '.join(unknown)}: not in the harness's registry"
            + (f" nor in {include_path}" if include_path else " (local task files: --include-path DIR)")
        )
    return manager


def evaluate(lm: JaxllmLM, tasks: list[str], manager, num_fewshot: int | None = None, limit: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 100000) -> dict:  # fmt: skip
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``lm``: the harness's results document."""
    import lm_eval

    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of examples per task, got {limit}")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )


def scores(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` of a results document: every number but the standard errors."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]  # "acc,none" -> "acc": the filter is the task's only one here
            if "stderr" not in name and isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{name}"] = float(value)
    return flat


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def to_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
