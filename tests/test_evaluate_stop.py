"""Generation stops early: a row ends once its text holds a stop string, the batch once every row
has, and the texts are those of decoding every row to max_gen_toks and cutting them afterwards."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra eval")

from lm_eval.api.instance import Instance
from lm_eval.models.utils import postprocess_generated_text
from test_evaluate import make_run

from jaxllm.evals import lm as eval_lm
from jaxllm.infer import harness
from jaxllm.model import decode

PROMPTS = ["def f(x):", "import os", "class A:", "for i in"]
N_NEW = 24


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    _, backend = harness.load(str(make_run(tmp_path_factory.mktemp("run"))))
    return eval_lm.JaxllmLM(backend, batch_size=len(PROMPTS))


def _decode(lm, **extra) -> list[list[int]]:
    b = lm.backend
    return b.decode_fn(b.params, [lm.tok_encode(p) for p in PROMPTS], N_NEW, eos_ids=b.roles.stop, temperature=0.0,
                       **extra)  # fmt: skip


class EndRowZeroAfter:
    """A stop_fn that ends row 0 after ``n`` tokens and no other row; counts its asks."""

    def __init__(self, n: int, rows: int):
        self.n, self.rows, self.asks = n, rows, []

    def __call__(self, tokens_BxU, n):
        self.asks.append(int(n))
        return np.arange(self.rows) == 0 if int(n) >= self.n else np.zeros(self.rows, bool)


def test_a_row_the_stop_fn_ends_keeps_its_first_tokens_and_the_others_are_unchanged(lm):
    full = _decode(lm)
    stop = EndRowZeroAfter(decode.STOP_EVERY, len(PROMPTS))
    cut = _decode(lm, stop_fn=stop)
    assert cut[0] == full[0][: decode.STOP_EVERY] and len(full[0]) > decode.STOP_EVERY
    assert cut[1:] == full[1:]
    assert stop.asks == list(range(decode.STOP_EVERY, N_NEW + 1, decode.STOP_EVERY))


def test_the_batch_stops_decoding_once_every_row_has_stopped(lm):
    steps = []
    b = lm.backend
    b.decode_fn(
        jax.device_get(b.params),
        [lm.tok_encode(p) for p in PROMPTS],
        N_NEW,
        eos_ids=b.roles.stop,
        temperature=0.0,
        stop_fn=lambda tokens_BxU, n: np.ones(len(PROMPTS), bool),
        on_token=lambda i, tok_B: steps.append(int(i)),  # on one device: an ordered callback
    )
    assert steps == list(range(decode.STOP_EVERY))


def test_generate_until_gives_the_texts_of_decoding_to_the_end_then_cutting(lm, monkeypatch):
    asks = []
    ask = eval_lm.StopStrings.__call__
    monkeypatch.setattr(eval_lm.StopStrings, "__call__", lambda self, *a: asks.append(a[1]) or ask(self, *a))
    texts = [lm.tok_decode(ids) for ids in _decode(lm)]
    # stop strings the model does write, early in one row and late (or never) in others
    until = [texts[0][3:5], texts[1][-3:]]
    assert all(until)
    args = {"until": until, "max_gen_toks": N_NEW, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, args), i) for i, p in enumerate(PROMPTS)]
    expected = [postprocess_generated_text(t, until, None) for t in texts]
    assert lm.generate_until(requests) == expected
    assert len(expected[0]) <= 3 < len(texts[0]) and asks  # the stop strings reached the decoder
