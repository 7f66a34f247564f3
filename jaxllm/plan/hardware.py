"""Accelerators a run can be planned for: a table of device kinds, and target names parsed into them.

A target is ``cpu`` / ``cpu:N`` (this host), a TPU slice by its Cloud accelerator type (``v5p-8``,
``v5e-16``, ...) or GPUs as ``KINDxN`` (``h100x8``, ``a100-40gbx8``; ``h200`` is one). For v4 and v5p
the slice size counts TensorCores, two per chip; a v5p JAX device is one chip (megacore), so
``v5p-8`` is 4 devices; v5e and v6e count chips. (libtpu describes v4 by TensorCore, so ``v4-8`` is 8.)

Figures are per device, from the vendors' spec sheets: Google Cloud's TPU system-architecture pages
(cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e) and NVIDIA's H100, H200, A100, L4 and L40S
datasheets. ``link_bw`` is one direction of one interconnect link (ICI or NVLink) in bytes/s;
``links`` how many a device has. GPU FLOP/s are dense (no sparsity) bf16 tensor-core peaks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from jaxllm.core import environment
from jaxllm.core.errors import ConfigError

GB, GiB = 1e9, 2**30


@dataclass(frozen=True)
class DeviceKind:
    name: str
    hbm_bytes: float
    peak_flops: float  # bf16, dense
    hbm_bw: float  # bytes/s
    link_bw: float  # bytes/s, one direction of one link
    links: int
    torus: bool  # TPU ICI: a ring per mesh axis uses two links; GPUs: a switch, all links
    # Fraction of peak_flops the matmuls of a train step reach on this kind: jaxllm's own where
    # measured (bench/accelerator.sh), else the best MFU published for the kind; 1.0 where neither
    # exists, and the roofline's step time is then a lower bound. efficiency_source says which.
    efficiency: float = 1.0
    efficiency_source: str = ""
    # The best MFU published for this kind by anyone: no prediction exceeds it (0 = none known).
    published_mfu: float = 0.0


# Fraction of the spec peak a Hopper GPU's train-step matmuls reach: the roofline's step time at the
# spec peak over the measured step of configs/llama_1b.yaml on one H200 (bench/accelerator.sh; the
# calibration row of bench/results/accelerator_h200_2026-11-30.md).
HOPPER_EFFICIENCY = 0.6306
MEASURED = "as measured on this kind (bench/accelerator.sh)"
# Published MFUs, each the best its source reports for the kind:
# - v5p: MaxText's "Runtime Performance Results" (docs/reference/performance), 32B on v5p-128, 71.47%;
# - v5e: MaxText's MaxText/configs/v5e/README.md, 32B on one v5e-256, 66.86%;
# - v6e: MaxText's docs/reference/models/tiering.md, Llama 3.1 70B on v6e-256, 50.33%;
# - v4: PaLM (Chowdhery et al. 2022, table 3), 540B on 6144 v4 chips, 46.2%;
# - A100: Megatron-LM (Narayanan et al. 2021), 1T parameters on 3072 A100s, 163 TFLOP/s per GPU, 52%.
#   L4 and L40S have no published LLM-training MFU: the A100's, the nearest NVIDIA part with one.
V5P_MFU, V5E_MFU, V6E_MFU, V4_MFU, A100_MFU = 0.7147, 0.6686, 0.5033, 0.462, 0.52
MAXTEXT = "MaxText's published MFU for this kind"
MEGATRON = "Megatron-LM's published A100 MFU"
NEAREST = "no published MFU for this kind: the A100's (Megatron-LM)"


def published(mfu: float, source: str) -> dict:
    """A never-measured kind's efficiency and cap: its published MFU, with the source's name."""
    return {"efficiency": mfu, "efficiency_source": source, "published_mfu": mfu}


DEVICE_KINDS = {
    # v4 chip: 32 GiB HBM2 at 1.2 TB/s, 275 TFLOP/s, 6 ICI links (3D torus) of 50 GB/s. libtpu's
    # topology describes v4 by TensorCore (two per chip, no megacore), so a device is half a chip.
    "v4": DeviceKind(
        "TPU v4 (one TensorCore)", 16 * GiB, 137.5e12, 614 * GB, 25 * GB, 6, True, **published(V4_MFU, "PaLM's MFU")
    ),
    # v5p: 95 GB HBM2e at 2.76 TB/s, 459 TFLOP/s; ICI 4,800 Gb/s per chip over 6 links (3D torus)
    "v5p": DeviceKind("TPU v5p", 95 * GB, 459e12, 2765 * GB, 100 * GB, 6, True, **published(V5P_MFU, MAXTEXT)),
    # v5e: 16 GB HBM2 at 819 GB/s, 197 TFLOP/s; ICI 1,600 Gb/s per chip over 4 links (2D torus)
    "v5e": DeviceKind("TPU v5e", 16 * GB, 197e12, 819 * GB, 50 * GB, 4, True, **published(V5E_MFU, MAXTEXT)),
    # v6e (Trillium): 32 GB HBM at 1.64 TB/s, 918 TFLOP/s; ICI 3,584 Gb/s per chip over 4 links
    "v6e": DeviceKind("TPU v6e", 32 * GB, 918e12, 1640 * GB, 112 * GB, 4, True, **published(V6E_MFU, MAXTEXT)),
    # H100 SXM: 80 GB HBM3 at 3.35 TB/s, 989 TFLOP/s; NVLink 4, 18 links x 25 GB/s per direction.
    # Efficiency: an H200's (same SMs and clocks; the step is compute-bound on both).
    "h100": DeviceKind(
        "NVIDIA H100 80GB HBM3", 80 * GB, 989e12, 3350 * GB, 25 * GB, 18, False, HOPPER_EFFICIENCY, MEASURED
    ),
    # H200 SXM: 141 GB HBM3e at 4.8 TB/s, 989 TFLOP/s; NVLink 4 as H100
    "h200": DeviceKind("NVIDIA H200", 141 * GB, 989e12, 4800 * GB, 25 * GB, 18, False, HOPPER_EFFICIENCY, MEASURED),
    # A100 SXM: 40 GB HBM2 at 1.56 TB/s (80 GB HBM2e at 2.04 TB/s), 312 TFLOP/s; NVLink 3, 12 x 25 GB/s
    "a100-40gb": DeviceKind(
        "NVIDIA A100-SXM4-40GB", 40 * GB, 312e12, 1555 * GB, 25 * GB, 12, False, **published(A100_MFU, MEGATRON)
    ),
    "a100-80gb": DeviceKind(
        "NVIDIA A100-SXM4-80GB", 80 * GB, 312e12, 2039 * GB, 25 * GB, 12, False, **published(A100_MFU, MEGATRON)
    ),
    # L4: 24 GB GDDR6 at 300 GB/s, 121 TFLOP/s; PCIe Gen4 x16, 32 GB/s per direction, no NVLink
    "l4": DeviceKind("NVIDIA L4", 24 * GB, 121e12, 300 * GB, 32 * GB, 1, False, **published(A100_MFU, NEAREST)),
    # L40S: 48 GB GDDR6 at 864 GB/s, 362 TFLOP/s; PCIe Gen4 x16
    "l40s": DeviceKind("NVIDIA L40S", 48 * GB, 362e12, 864 * GB, 32 * GB, 1, False, **published(A100_MFU, NEAREST)),
}

# Slice sizes Cloud sells (accelerator-type suffix) and the topology each one is, as libtpu names it.
_TORUS_3D = {
    8: "2x2x1",
    16: "2x2x2",
    32: "2x2x4",
    64: "2x4x4",
    128: "4x4x4",
    256: "4x4x8",
    512: "4x8x8",
    1024: "8x8x8",
    2048: "8x8x16",
    4096: "8x16x16",
}
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TPU_SLICES = {"v4": _TORUS_3D, "v5p": _TORUS_3D, "v5e": _TORUS_2D, "v6e": _TORUS_2D}
TPU_TOPOLOGY_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


@dataclass(frozen=True)
class Target:
    """What a plan compiles for: ``platform`` cpu | tpu | gpu, the device kind and count."""

    name: str
    platform: str
    kind: DeviceKind
    devices: int
    topology: str = ""  # libtpu's topology name, for TPUs: "v5p:2x2x1"


def cpu_kind(devices: int) -> DeviceKind:
    """This host's CPU as a device kind: its RAM split over the devices, a nominal matmul rate."""
    from jaxllm.model import flops  # imports jax: train.py reads this module before the config is valid

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return DeviceKind("cpu", ram / devices, flops.PEAK_FLOPS["cpu"] / devices, 10 * GB / devices, 10 * GB, 1, False)


def parse_target(name: str) -> Target:
    """``cpu``, ``cpu:N``, ``v5p-8``, ``h100x8``, ... -> a Target, or a one-line ConfigError.

    ``cpu`` alone has ``devices=0``, meaning the host's devices: counting them starts JAX."""
    text = name.strip().lower()
    if m := re.fullmatch(r"cpu(?::(\d+))?", text):
        n = int(m.group(1) or 0)
        if m.group(1) and n < 1:
            raise ConfigError(f"{name}: the CPU device count must be positive")
        if too_many := environment.cpu_devices_problem(n, "--plan cpu:N with N"):
            raise ConfigError(too_many)
        return Target(name, "cpu", cpu_kind(max(n, 1)), n)
    if m := re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text):
        gen, size = ("v5e" if m.group(1) == "v5litepod" else m.group(1)), int(m.group(2))
        slices = TPU_SLICES[gen]
        if size not in slices:
            raise ConfigError(f"{name}: {gen} slices come in sizes {', '.join(map(str, slices))}")
        chips = size // 2 if gen == "v5p" else size  # v4: a device per TensorCore, see DEVICE_KINDS
        return Target(name, "tpu", DEVICE_KINDS[gen], chips, f"{TPU_TOPOLOGY_PREFIX[gen]}:{slices[size]}")
    m = re.fullmatch(r"([a-z0-9-]+?)(?:x(\d+))?", text)
    if m and m.group(1) in DEVICE_KINDS and not m.group(1).startswith("v"):
        n = int(m.group(2) or 1)
        if n < 1:
            raise ConfigError(f"{name}: the GPU count must be positive")
        return Target(name, "gpu", DEVICE_KINDS[m.group(1)], n)
    gpus = ", ".join(k for k in DEVICE_KINDS if not k.startswith("v"))
    raise ConfigError(
        f"unknown target {name!r}: use cpu, cpu:N, a TPU slice (v4-8, v5p-8, v5e-16, v6e-64, ...) "
        f"or GPUs as KINDxN with KIND one of {gpus} (e.g. h100x8)"
    )


def axis_bandwidth(kind: DeviceKind, active_axes: int) -> float:
    """Bytes/s one device moves in a collective over one mesh axis.

    TPUs: a ring along a torus dimension, both directions of its two links. GPUs: all NVLinks
    through the switch, shared by the axes communicating at once (``active_axes``)."""
    if kind.torus:
        return 2 * kind.link_bw
    return kind.links * kind.link_bw / max(active_axes, 1)


def ring_factor(ways: int) -> float:
    """Share of a buffer each device sends in a ring all-gather or reduce-scatter: (n - 1) / n."""
    return (ways - 1) / ways if ways > 1 else 0.0
