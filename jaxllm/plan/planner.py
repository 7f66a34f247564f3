"""Plan before you rent: compile a run's real train step for a target and predict its memory and speed.

``python train.py CONFIG --plan TARGET`` builds exactly what training builds (``trainer.build``: the
model, shardings, remat, dtype, pipeline and grad accumulation), lowers the jitted step for abstract
inputs and compiles it for TARGET's devices: this host's CPUs, a TPU slice compiled deviceless
through libtpu's topology descriptions (nothing is allocated, no TPU is needed), or the attached
GPUs. Beside the compiler's memory figures it puts the analytic model (:mod:`memory_model`) and the
roofline (:mod:`roofline`); GPU targets without GPUs attached get the analytic model alone.

It reads no corpus (the vocabulary comes from the tokenizer's name, ``data.bpe_vocab_size`` or a
``tokenizer.json``) and writes nothing but ``--plan-out``: never the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import math
import os
import time
from contextlib import contextmanager, nullcontext
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.core.config import Config, resolve, validate
from jaxllm.core.errors import ConfigError
from jaxllm.parallel import pipeline, sharding
from jaxllm.plan import hardware, memory_model, roofline
from jaxllm.plan.hardware import Target
from jaxllm.train import checkpoint as ckpt

SEARCH_COMPILES = 3  # candidates of a search confirmed by compiling, best first


def tokenizer_vocab(cfg: Config) -> int:
    """The tokenizer's vocabulary size, read without the corpus."""
    d = cfg.data
    # byte: the byte values and the end-of-document id
    known = {"byte": 257, "bpe": d.bpe_vocab_size, "char": cfg.model.vocab_size}.get(d.tokenizer)
    if known:
        return known
    if d.tokenizer == "char":
        raise ConfigError("data.tokenizer=char takes its vocabulary from the corpus; give model.vocab_size to plan")
    from jaxllm.data import tokenizer

    return tokenizer.build(d.tokenizer, [], 0).vocab_size  # with the end-of-document id build() may append


def resolved(cfg: Config) -> Config:
    """``cfg`` validated, its model resolved for the tokenizer's vocabulary: what every function below takes."""
    validate(cfg)
    return resolve(cfg, tokenizer_vocab(cfg))


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(target: Target) -> list:
    """Abstract devices of a TPU slice (libtpu's topology description; no TPU needed)."""
    if not libtpu_installed():
        raise ConfigError(
            f"target {target.name} is compiled through libtpu, which is not installed: "
            "pip install -e '.[tpu]' (or pip install 'jax[tpu]')"
        )
    from jax.experimental import topologies

    # libtpu locks a TPU host's chips for one process; compiling deviceless needs no chips
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    except Exception as e:  # noqa: BLE001  (libtpu raises XlaRuntimeError and friends)
        raise ConfigError(
            f"libtpu cannot describe {target.name} ({target.topology}): {str(e).splitlines()[0]}"
        ) from None
    if len(topo.devices) != target.devices:
        raise ConfigError(f"libtpu describes {target.name} with {len(topo.devices)} devices, not {target.devices}")
    return list(topo.devices)


def local_devices(target: Target) -> list | None:
    """The devices a plan compiles for; None where only the analytic model can answer (no GPU here)."""
    if target.platform == "tpu":
        return tpu_devices(target)
    platform = "cpu" if target.platform == "cpu" else "gpu"
    try:
        found = jax.devices(platform)
    except RuntimeError:
        return None
    key = target.kind.name.lower().split()[-1] if platform == "gpu" else ""
    found = [d for d in found if key in d.device_kind.lower()]
    if len(found) < target.devices:
        if platform == "cpu":
            raise ConfigError(f"target {target.name}: {target.devices} CPU devices asked, {len(found)} exist")
        return None
    return found[: target.devices]


def with_mesh(cfg: Config, sizes: dict[str, int], **changes: Any) -> Config:
    """A copy of ``cfg`` with these mesh sizes and dotted changes (``{"model.remat": "full"}``)."""
    new = copy.deepcopy(cfg)
    for axis, size in sizes.items():
        setattr(new.mesh, axis, size)
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        setattr(getattr(new, section), key, value)
    return new


def check_mesh(cfg: Config, n: int) -> dict[str, int]:
    """The mesh's axis sizes on ``n`` devices; ConfigError if they or the model's sizes do not divide."""
    sizes = sharding.mesh_shape(cfg.mesh, n)
    mesh = memory_model.abstract_mesh(sizes)
    sharding.check_divisible(cfg.model, mesh, cfg.train.batch_size)
    pipeline.check(cfg.model, cfg.pipeline, mesh, cfg.train.batch_size)
    return sizes


def lower_step(cfg: Config, devices: list) -> tuple[Any, Any]:
    """``(setup, lowered)``: the train step built as training builds it (``trainer.build``) on a mesh
    of these devices, lowered for abstract inputs (nothing allocated: the devices may be a TPU slice's
    descriptions)."""
    from jaxllm.train import trainer

    setup = trainer.build(cfg, sharding.make_mesh(cfg.mesh, devices))
    t = cfg.train
    with setup.context():
        state = ckpt.abstract(jax.eval_shape(setup.init), setup.state_shardings)
        batch = jax.ShapeDtypeStruct(
            (t.grad_accum, t.batch_size, t.seq_len + 1), jnp.int32, sharding=setup.batch_sharding
        )
        return setup, setup.step.lower(state, batch)


def compiled_bytes(executable: Any, by_peak: bool = False) -> dict[str, int]:
    """The compiler's bytes per device: argument, output, alias, temp, its reported peak, and the total
    held against the device's memory: argument + output - alias + temp (what XLA:GPU's allocator holds,
    bench/results/), or with ``by_peak`` the peak. XLA:TPU's temp block also counts space never live at
    once, and libtpu checks the peak, not that block, against HBM; XLA:CPU's peak is not comparable."""
    stats = executable.memory_analysis()
    names = ("argument", "output", "alias", "temp")
    parts = {k: getattr(stats, f"{k}_size_in_bytes") for k in names} | {"peak": stats.peak_memory_in_bytes}
    held = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    return parts | {"total": parts["peak"] if by_peak else held}


@contextmanager
def nothing_stored():
    """Compilations inside write no entry to JAX's persistent cache (an entry found there is still used)."""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, math.inf)
    try:
        yield
    finally:
        jax.config.update(key, before)


def compile_step(cfg: Config, devices: list) -> dict:
    """Compiles the train step for these devices; the compiler's bytes per device and the time taken.

    A TPU target's devices are always libtpu's descriptions (:func:`local_devices`), compiled by a
    compile-only client that cannot load a stored program back: its programs are not stored, where
    they would only be a warning at the next plan, never a hit; its total is the compiler's peak."""
    wall, cpu = time.perf_counter(), time.process_time()
    described = devices[0].platform == "tpu"
    with nothing_stored() if described else nullcontext():
        parts = compiled_bytes(lower_step(cfg, devices)[1].compile(), by_peak=described)
    return {"bytes": parts, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def evaluate(cfg: Config, boxed: Any, target: Target, sizes: dict[str, int]) -> dict:
    """The analytic half of a plan: memory parts, fit and roofline for one mesh (nothing compiled)."""
    mem = memory_model.estimate(cfg, boxed, sizes, platform=target.platform)
    speed = roofline.step_time(cfg, sizes, target.kind, mem.activations)
    return {
        "target": target.name,
        "device_kind": target.kind.name,
        "devices": target.devices,
        "mesh": dict(sizes),
        "remat": cfg.model.remat,
        "microbatches": pipeline.microbatches(cfg.pipeline, sizes["pipe"]) if sizes["pipe"] > 1 else None,
        "analytic_bytes": mem.as_dict(),
        "compiled_bytes": None,
        "device_memory_bytes": int(target.kind.hbm_bytes),
        "fits": mem.total <= target.kind.hbm_bytes,
        "headroom": 1 - mem.total / target.kind.hbm_bytes,
        "step_time_s": speed.step_time_s,
        "tokens_per_sec": speed.tokens_per_sec,
        "mfu": speed.mfu,
        "bound": speed.bound,
        "roofline_s": speed.terms,
        "efficiency": target.kind.efficiency,
        "efficiency_source": target.kind.efficiency_source,
    }


def confirm(result: dict, cfg: Config, devices: list | None) -> dict:
    """Adds the compiler's figures (when there are devices to compile for); the fit follows them."""
    if devices is None:
        result["note"] = "analytic only: no such devices attached to compile for"
        return result
    compiled = compile_step(cfg, devices)
    total = compiled["bytes"]["total"]
    result.update(compiled_bytes=compiled["bytes"], compile_wall_s=compiled["wall_s"], compile_cpu_s=compiled["cpu_s"])
    result.update(fits=total <= result["device_memory_bytes"], headroom=1 - total / result["device_memory_bytes"])
    return result


def fixes(cfg: Config, boxed: Any, target: Target, sizes: dict[str, int], devices) -> list[dict]:
    """For a run that does not fit: the cheapest changes that make it fit, each compiled to check."""
    options = []
    if cfg.model.remat != "full":
        options.append(({}, {"model.remat": "full"}, ["model.remat=full"]))
    if sizes["data"] % 2 == 0:
        more = {**sizes, "data": sizes["data"] // 2, "fsdp": sizes["fsdp"] * 2}
        options.append((more, {}, [f"mesh.data={more['data']}", f"mesh.fsdp={more['fsdp']}"]))
    t = cfg.train
    if t.batch_size % 2 == 0:
        halve = {"train.batch_size": t.batch_size // 2, "train.grad_accum": t.grad_accum * 2}
        options.append(({}, halve, [f"train.batch_size={t.batch_size // 2}", f"train.grad_accum={t.grad_accum * 2}"]))
    found = []
    for mesh_change, changes, words in options:
        new_cfg = with_mesh(cfg, {**sizes, **mesh_change}, **changes)
        try:
            new_sizes = check_mesh(new_cfg, target.devices)
        except ConfigError:
            continue
        result = evaluate(new_cfg, boxed, target, new_sizes)
        if result["fits"]:
            result = confirm(result, new_cfg, devices)
            found.append({"changes": words, "fits": result["fits"], "headroom": result["headroom"]})
    return found


def plan(cfg: Config, target: Target, devices: list | None) -> dict:
    """One mesh (the config's): analytic model, the compiled step, a verdict and fixes if it fails."""
    sizes = check_mesh(cfg, target.devices)
    boxed = memory_model.boxed_params(cfg.model, cfg.train.seq_len)
    result = confirm(evaluate(cfg, boxed, target, sizes), cfg, devices)
    if not result["fits"]:
        result["fixes"] = fixes(cfg, boxed, target, sizes, devices)
    return result


def factorisations(n: int) -> list[dict[str, int]]:
    """Every ``data x fsdp x tensor x pipe = n``."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return [
        dict(zip(sharding.AXES, (n // (f * t * p), f, t, p)))
        for f, t, p in itertools.product(divisors, repeat=3)
        if n % (f * t * p) == 0
    ]


def candidates(cfg: Config, n: int) -> list[tuple[Config, dict[str, int]]]:
    """Every mesh of ``n`` devices the sizes allow, remat none and full, a few micro-batch counts."""
    out = []
    for sizes, remat in itertools.product(factorisations(n), ("none", "full")):
        for micro in (0, 2 * sizes["pipe"], 4 * sizes["pipe"]) if sizes["pipe"] > 1 else (0,):
            new_cfg = with_mesh(cfg, sizes, **{"model.remat": remat, "pipeline.microbatches": micro})
            try:
                check_mesh(new_cfg, n)
            except ConfigError:
                continue
            out.append((new_cfg, sizes))
    if not out:
        raise ConfigError(
            f"no mesh of {n} devices divides this model and batch (heads, d_ff, vocabulary, "
            f"d_model, train.batch_size={cfg.train.batch_size}); change the sizes or the target"
        )
    return out


def rank(result: dict) -> tuple:
    """Meshes that fit first, then by predicted step time, then by memory (the most headroom)."""
    return not result["fits"], round(result["step_time_s"], 9), -result["headroom"]


def search(cfg: Config, found: list[tuple[Config, dict[str, int]]], target: Target, devices: list | None) -> dict:
    """The :func:`candidates` ranked by predicted step time, those that fit first; the top few compiled."""
    boxed = memory_model.boxed_params(cfg.model, cfg.train.seq_len)
    results = [(evaluate(c, boxed, target, s), c) for c, s in found]
    results.sort(key=lambda r: rank(r[0]))
    for i, (result, c) in enumerate(results[:SEARCH_COMPILES]):
        if result["fits"]:
            results[i] = (confirm(result, c, devices), c)
    ranked = [r for r, _ in results]
    ranked.sort(key=rank)
    return {"candidates": ranked}


def cpu_target(target: Target) -> Target:
    """``cpu:N`` splits the host into N devices if JAX has not started (else takes N of those there,
    see :func:`local_devices`); ``cpu`` takes what is there."""
    if target.devices:
        try:
            jax.config.update("jax_num_cpu_devices", target.devices)
        except RuntimeError:  # JAX has started (a test process): its devices are what there is
            pass
    n = target.devices or len(jax.devices("cpu"))
    return dataclasses.replace(target, kind=hardware.cpu_kind(n), devices=n)


def uncompilable(cfg: Config, target: Target, sizes: dict[str, int]) -> str:
    """Why the step of ``cfg`` on the mesh ``sizes`` cannot compile for ``target`` ('' when it can):
    libtpu's grouped matmul (``ragged_dot``, the dropless MoE layers') takes no batch dimension, and
    the pipeline's loop over its stages adds one."""
    e = cfg.model.moe
    if target.platform == "tpu" and e.n_experts and not e.capacity_factor and sizes["pipe"] > 1:
        return (
            f"{target.name}: dropless MoE layers (model.moe.capacity_factor=0) under mesh.pipe={sizes['pipe']} "
            "do not compile for TPU (libtpu's grouped matmul takes no batch dimension, which the pipeline "
            "adds); give model.moe.capacity_factor (e.g. 1.25) or use mesh.pipe=1"
        )
    return ""


def run(cfg: Config, target: Target, do_search: bool) -> dict:
    """The plan (or search) for ``target``; ConfigError for a bad target, mesh or size."""
    cfg = resolved(cfg)
    if target.platform == "cpu":
        target = cpu_target(target)
    # a bad mesh, or none that divides, or one that cannot compile, fails before libtpu is started
    if do_search:
        found = [(c, s) for c, s in candidates(cfg, target.devices) if not uncompilable(c, target, s)]
    else:
        found = check_mesh(cfg, target.devices)
        if why := uncompilable(cfg, target, found):
            raise ConfigError(why)
    devices = local_devices(target)
    return search(cfg, found, target, devices) if do_search else plan(cfg, target, devices)


# --------------------------------------------------------------------------- tables
