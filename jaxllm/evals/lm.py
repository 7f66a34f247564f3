"""lm-evaluation-harness's ``LM`` on jaxllm's own forward pass and KV-cache decoding.

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
                    at the first stop string, special tokens dropped from the text; a row stops decoding
                    once its text holds a stop string (:class:`StopStrings`, asked every few steps), the
                    batch once every row has stopped, as the ``hf`` backend's stopping criteria do

Batches keep one shape (B rows, the last one padded), so a task compiles a few programs, not one per
request; rows divide over the mesh's data axes (:func:`on_mesh`). The models come from a run directory or a
Hugging Face one (:mod:`jaxllm.infer.harness`) or from a training run's own state
(:mod:`jaxllm.evals.during_training`). Text is encoded with the tokenizer's Hugging Face form
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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxllm.core.errors import ConfigError
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.hf.tokenizer_export import Roles
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
            stop = StopStrings(tuple(until), self.backend.roles.stop, self.hf_tok)
            contexts = [self._context(requests[i].args[0], self.max_length - n_new) for i in members]
            order = sorted(range(len(members)), key=lambda j: -len(contexts[j]))
            for chunk in _chunks(order, self.rows):
                prompts = [contexts[j] for j in chunk]
                prompts += [prompts[0]] * (self.rows - len(prompts))  # one batch shape
                with self.backend.context():
                    new = self.backend.decode_fn(
                        self.backend.params, prompts, n_new, eos_ids=self.backend.roles.stop, stop_fn=stop, **sampling
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


@dataclass(frozen=True)
class StopStrings:
    """The decoder's ``stop_fn``: the rows whose text so far (cut at the first of ``ends``, special tokens
    dropped, as the harness's text is) holds one of ``until``. Equal settings hash equal, so one compiled
    decoding program serves every batch of a task."""

    until: tuple[str, ...]
    ends: tuple[int, ...]
    hf_tok: Any

    def __call__(self, tokens_BxU: np.ndarray, n: np.ndarray) -> np.ndarray:
        ends = set(self.ends) or {-1}  # -1: the decoder's fill after a row it ended, when there is no eos
        rows = [
            row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
            for row in tokens_BxU[:, : int(n)].tolist()
        ]
        # A trailing U+FFFD may be a character whose bytes are still coming: never a stop of its own.
        texts = [t.rstrip("\ufffd") for t in self.hf_tok.decode_batch(rows, skip_special_tokens=True)]
        return np.array([any(u in t for u in self.until) for t in texts], bool)


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


def on_mesh(mesh: jax.sharding.Mesh, rules: tuple) -> dict:
    """The :class:`Backend` fields of a model whose parameters live on ``mesh``: its context, the
    rows' multiple (the data axes) and the batch's sharding."""
    return {
        "context": functools.partial(mesh_context, mesh, rules),
        "rows_multiple": int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES])),
        "batch_sharding": sharding.batch_sharding(mesh, leading=0),
    }


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules: tuple):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
