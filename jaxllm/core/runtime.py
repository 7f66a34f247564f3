"""Process set-up, done once before JAX compiles or touches a device: the persistent compilation cache,
the CPU device count, and joining a multi-process run; and how the programs that run once compile."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxllm.core import environment, fileio
from jaxllm.core.config import Config
from jaxllm.core.errors import ConfigError


def init_compile_cache(directory: str) -> Path | None:
    """Keeps compiled programs in ``directory`` (``run.compile_cache``; '' = off) so that a rerun of the
    same config loads them instead of compiling. Returns the directory in use, or None.

    ``JAX_COMPILATION_CACHE_DIR`` (or an earlier ``jax_compilation_cache_dir``), when set, wins. Must run
    before the first compilation: JAX opens its cache once, at the first compile."""
    if directory:  # a file there: JAX would warn at every compile and cache nothing
        fileio.check_folder_path(Path(directory).expanduser(), "run.compile_cache")
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if not directory:
        return None
    path = Path(directory).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's default (1 s) skips most of a small model's programs, whose compiles add up to seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# LLVM's optimisation level (XLA's default: 3) for programs that run once, such as the initialisation:
# -O1 compiles them faster and gives the same parameter bits (tests/test_runtime compares every leaf),
# and a program that runs once gains nothing from the slower optimisation.
ONE_OFF_LEVEL = {"xla_backend_optimization_level": 1}


def one_off_compiler_options() -> dict[str, int]:
    """``compiler_options`` for a program that runs once per process: :data:`ONE_OFF_LEVEL`, unless
    ``XLA_FLAGS`` chooses a level itself (the tests compile everything at -O0), which then wins."""
    return {} if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "") else dict(ONE_OFF_LEVEL)


def init_cpu_devices(count: int) -> None:
    """Splits the host CPU into ``count`` JAX devices (``dist.cpu_devices``; 0 = leave JAX's default).

    ``JAX_NUM_CPU_DEVICES`` in the environment, when set, wins (it is how tests fake 8 devices).
    Must run before anything touches the devices; afterwards, only an equal count is accepted. A count
    above :data:`jaxllm.core.environment.MAX_CPU_DEVICES` is refused before JAX starts any."""
    if count <= 0 or os.environ.get("JAX_NUM_CPU_DEVICES"):
        return
    if problem := environment.cpu_devices_problem(count, "dist.cpu_devices"):
        raise ConfigError(problem)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started: fine if it already has that many CPU devices
        if len(jax.devices("cpu")) != count:
            raise ConfigError(
                f"dist.cpu_devices={count} but JAX already started with {len(jax.devices('cpu'))} CPU devices; "
                "set it before JAX starts (or JAX_NUM_CPU_DEVICES), or drop it"
            ) from None


def init_distributed(cfg: Config) -> None:
    """Joins a multi-process run (``dist.*``); must run before anything touches the devices."""
    d = cfg.dist
    init_cpu_devices(d.cpu_devices)
    auto = d.coordinator == "auto"
    if not auto and d.num_processes <= 1 and not d.coordinator:
        return
    if not auto and not 0 <= d.process_id < d.num_processes:
        raise ConfigError(f"dist.process_id={d.process_id} must be in [0, dist.num_processes={d.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
    if jax.distributed.is_initialized():
        return
    if not auto:
        jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
        return
    try:  # SLURM, Open MPI and TPU pod slices describe the cluster in their environment
        jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"dist.coordinator=auto found no cluster to join ({e}); give host:port instead") from None


def init_process(cfg: Config) -> None:
    """Everything above, in the order JAX needs: the cache and the device count before the backend starts."""
    init_compile_cache(cfg.run.compile_cache)
    init_distributed(cfg)
