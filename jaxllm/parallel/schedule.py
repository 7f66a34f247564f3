"""Pipeline schedules as tables: which micro-batch each stage runs at each iteration of the loop
(GPipe's rounds and lockstep 1F1B), and the share of idle slots each leaves, counted and in theory.
Pure numpy: the pipelined loop (:mod:`jaxllm.parallel.pipeline`) and the planner read them."""

from __future__ import annotations

import numpy as np


def work_items(stages: int, micro: int, rounds: int) -> np.ndarray:
    """The schedule, ``[I, P]`` int: the work item each stage runs at each iteration, -1 when idle.

    Work item k is micro-batch k % M in round k // M; stage p runs it at iteration k + p, so stage
    p+1 gets it straight from stage p, and stage 0 gets round r+1 of micro-batch m from the last
    stage's round r, finished M - P + 1 iterations earlier (hence M >= P)."""
    n_items = micro * rounds
    k_IxP = np.arange(n_items + stages - 1)[:, None] - np.arange(stages)[None, :]
    return np.where((k_IxP >= 0) & (k_IxP < n_items), k_IxP, -1)


def one_f_one_b(stages: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1F1B schedule in lockstep, ``(forward_IxP, backward_IxP)``: the micro-batch each stage runs
    forward, and backward, at each iteration (-1 when idle); I = M + 2P - 2.

    Micro-batch m runs forward on stage p at iteration m + p; the last stage takes its loss gradient
    in the same iteration, and the gradient moves back one stage per iteration, so stage p runs m
    backward at m + 2(P-1) - p. Stage p therefore holds the inputs of at most 2(P-p) - 1 micro-batches
    (the forward of m + 2(P-p) - 1 comes after the backward of m), whatever M."""
    t_IxP = np.arange(micro + 2 * stages - 2)[:, None]
    p_1xP = np.arange(stages)[None, :]
    forward, backward = t_IxP - p_1xP, t_IxP - 2 * (stages - 1) + p_1xP
    return np.where((forward >= 0) & (forward < micro), forward, -1), np.where(
        (backward >= 0) & (backward < micro), backward, -1
    )


def bubble_fraction(stages: int, micro: int, rounds: int, schedule: str = "gpipe") -> float:
    """Share of (iteration, stage) slots of the loop in which a stage holds no real micro-batch
    (1F1B: forward and backward slots together)."""
    if schedule == "1f1b":
        return float(np.mean(np.stack(one_f_one_b(stages, micro)) < 0))
    return float(np.mean(work_items(stages, micro, rounds) < 0))


def theory_bubble(stages: int, micro: int, rounds: int, schedule: str = "gpipe") -> float:
    if schedule == "1f1b":  # lockstep: forward and backward each cross the P stages in turn
        return 2 * (stages - 1) / (micro + 2 * stages - 2)
    return (stages - 1) / (micro * rounds + stages - 1)
