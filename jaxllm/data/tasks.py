"""Built-in instruction tasks: small, exact-answer problems a tiny byte-level model can learn on a CPU.

Each task turns a seeded random draw into ``(instruction, answer)``. Examples are generated
deterministically from ``(seed, task, index)``; the held-out split is decided by a hash of the
instruction text, so no held-out prompt ever appears in training, whatever the sizes asked for.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable

from jaxllm.core.errors import ConfigError

Chat = list[dict[str, str]]

LETTERS = string.ascii_lowercase
HELD_OUT_EVERY = 8  # 1 instruction in 8 (by hash) belongs to the held-out split
# Training examples per sft.n_train, by task: arithmetic and lookup need more demonstrations than
# the string tasks before a tiny model generalises to unseen prompts.
TRAIN_WEIGHT = {"add": 2, "lookup": 2}


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"reverse {w}", w[::-1]


def upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"upper {w}", w.upper()


def sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"sort {w}", "".join(sorted(w))


def add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 29), rng.randint(0, 29)
    return f"add {a}+{b}", str(a + b)


def repeat(rng: random.Random) -> tuple[str, str]:
    w, n = _word(rng, 2, 4), rng.randint(2, 4)
    return f"repeat {n} {w}", " ".join([w] * n)


def lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(LETTERS, 3)
    values = [str(rng.randint(0, 9)) for _ in keys]
    k = rng.randrange(len(keys))
    pairs = " ".join(f"{key}={v}" for key, v in zip(keys, values))
    return f"{pairs} get {keys[k]}", values[k]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": reverse,
    "upper": upper,
    "sort": sort,
    "add": add,
    "repeat": repeat,
    "lookup": lookup,
}


def is_held_out(instruction: str) -> bool:
    return zlib.crc32(instruction.encode()) % HELD_OUT_EVERY == 0


def examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """The first ``n`` ``(instruction, answer)`` pairs of ``task`` in ``split`` (train | eval); held-out
    pairs are distinct, training pairs may repeat (small tasks such as ``add`` have few of them)."""
    rng = random.Random(f"{seed}:{task}")
    want_held_out = split == "eval"
    out, seen = [], set()
    for _ in range(200 * n):
        instruction, answer = TASKS[task](rng)
        if is_held_out(instruction) == want_held_out and not (want_held_out and instruction in seen):
            seen.add(instruction)
            out.append((instruction, answer))
            if len(out) == n:
                return out
    raise ConfigError(f"task {task!r} has fewer than {n} distinct held-out examples; lower sft.n_eval")


def as_chat(instruction: str, answer: str) -> Chat:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]


def dataset(split: str, n_per_task: int, seed: int = 0) -> list[tuple[str, Chat]]:
    """``(task, chat)`` pairs, tasks interleaved so any prefix keeps the mix: ``n_per_task`` of each
    held-out task; in training, ``TRAIN_WEIGHT[task]`` times that many."""
    weight = {t: TRAIN_WEIGHT.get(t, 1) if split == "train" else 1 for t in TASKS}
    per_task = {t: examples(t, split, n_per_task * weight[t], seed) for t in TASKS}
    return [
        (t, as_chat(*per_task[t][i * weight[t] + j]))
        for i in range(n_per_task)
        for t in TASKS
        for j in range(weight[t])
    ]
