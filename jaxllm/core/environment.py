"""The process environment JAX reads when it is imported and when its backends start, checked and
made quiet before either happens (this module never imports JAX).

- ``JAX_NUM_CPU_DEVICES`` must be a whole number of devices JAX can start in seconds (JAX's own
  parsing of a bad value is a traceback at ``import jax``; a huge one spends minutes, then hours,
  creating devices before anything is printed). ``dist.cpu_devices`` has the same bound.
- libtpu, when installed (the ``tpu`` extra), is probed by JAX at start-up even on a host with no TPU,
  and its probe writes its own lines to the terminal (the file descriptor: no logging level of
  Python's or TensorFlow's silences them). On a Linux host with neither a TPU nor a GPU, the CPU is
  the only backend JAX could start, so :func:`skip_absent_tpu` names it (``JAX_PLATFORMS=cpu``)
  and the probe never runs. A ``JAX_PLATFORMS`` (or ``JAX_FORCE_TPU_INIT``) of the user's wins.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

# The most CPU devices a process may split its host into: JAX starts this many at once, and its
# start-up grows faster than linearly beyond a few thousand.
MAX_CPU_DEVICES = 1024

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPUs are Google PCI devices (what JAX itself counts as TPU chips)
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD, WSL


def cpu_devices_problem(count: int, where: str) -> str:
    """Why ``count`` CPU devices (named ``where``) cannot be asked for, or '' when they can."""
    if count > MAX_CPU_DEVICES:
        return (
            f"{where}={count} asks for more CPU devices than JAX can start in reasonable time "
            f"(at most {MAX_CPU_DEVICES}); use fewer (a mesh of a TPU slice's size: --plan TARGET)"
        )
    return ""


def problem() -> str:
    """What in the environment would make JAX fail or hang at start-up ('' when nothing)."""
    raw = os.environ.get("JAX_NUM_CPU_DEVICES")
    if raw is None or raw.strip() == "-1":  # -1: JAX's default, one device
        return ""
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        return (
            f"JAX_NUM_CPU_DEVICES={raw!r} must be a whole number of devices, 1 to {MAX_CPU_DEVICES}; unset it or fix it"
        )
    return cpu_devices_problem(count, "JAX_NUM_CPU_DEVICES")


def tpu_present() -> bool:
    return any(Path(p).read_text().strip() == GOOGLE_PCI_VENDOR for p in glob.glob("/sys/bus/pci/devices/*/vendor"))


def gpu_present() -> bool:
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def skip_absent_tpu() -> None:
    """``JAX_PLATFORMS=cpu`` where libtpu is installed but the host has no accelerator at all and the
    user chose no platform (see the module's docstring); anywhere else, nothing."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or sys.platform != "linux":
        return
    if importlib.util.find_spec("libtpu") is None or tpu_present() or gpu_present():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
