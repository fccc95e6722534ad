"""Known accelerators: datasheet dense bf16 peak FLOP/s and memory per chip.

One table, used by MFU (`peak_flops`, which finds the chip from JAX's `device_kind`) and
by the planner (`llm-jax plan --hardware NAME`, which checks whether a config fits). Peaks
are dense (no structured sparsity) bf16 tensor-core / MXU numbers of the SXM / pod parts;
memory is the datasheet HBM per chip in GB (10^9 bytes), a little above what a program can
use once the runtime has taken its share. Also what is measured of this machine: the CPU's
bfloat16 dot instructions and its matmul peak.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str  # what `--hardware` takes
  peak_flops: float  # dense bf16 FLOP/s per chip
  memory_bytes: int  # HBM per chip
  device_kinds: tuple[str, ...]  # `jax.Device.device_kind` strings of this chip, lower case

  @property
  def platform(self) -> str:
    """JAX's backend name for this chip."""
    return "tpu" if self.name.startswith("tpu") else "gpu"


_GB = 10**9

ACCELERATORS = {a.name: a for a in (
    Accelerator("h100", 989e12, 80 * _GB, ("nvidia h100 80gb hbm3", "nvidia h100")),
    Accelerator("h200", 989e12, 141 * _GB, ("nvidia h200",)),
    Accelerator("a100-40gb", 312e12, 40 * _GB,
                ("nvidia a100-sxm4-40gb", "nvidia a100-pcie-40gb")),
    Accelerator("a100-80gb", 312e12, 80 * _GB,
                ("nvidia a100-sxm4-80gb", "nvidia a100 80gb pcie")),
    Accelerator("tpu-v4", 275e12, 32 * 2**30, ("tpu v4",)),
    Accelerator("tpu-v5e", 197e12, 16 * 2**30, ("tpu v5 lite", "tpu v5e")),
    Accelerator("tpu-v5p", 459e12, 95 * _GB, ("tpu v5", "tpu v5p")),
    Accelerator("tpu-v6e", 918e12, 32 * 2**30, ("tpu v6 lite", "tpu v6e")),
)}


def by_name(name: str) -> Accelerator:
  """The accelerator called `name` (case-insensitive); UserError listing the valid names."""
  key = name.strip().lower()
  if key not in ACCELERATORS:
    raise UserError(f"Unknown hardware {name!r}; choose one of {', '.join(ACCELERATORS)}.")
  return ACCELERATORS[key]


def by_device_kind(device_kind: str) -> Accelerator | None:
  """The accelerator whose device kind matches `device_kind`, or None for an unknown chip.

  An exact match wins ('TPU v5' is a v5p, 'TPU v5 lite' a v5e); otherwise the longest known
  kind that `device_kind` starts with, so variants of a chip's name get the table's numbers
  for that chip (those of its SXM / pod part).
  """
  kind = device_kind.strip().lower()
  for accelerator in ACCELERATORS.values():
    if kind in accelerator.device_kinds:
      return accelerator
  prefixes = [(len(k), a) for a in ACCELERATORS.values() for k in a.device_kinds
              if kind.startswith(k)]
  return max(prefixes, key=lambda p: p[0])[1] if prefixes else None


# /proc/cpuinfo flags of a bfloat16 dot product instruction (x86: AVX512-BF16, AMX-BF16;
# Arm: BF16).
_BF16_DOT_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_bf16_dot() -> bool:
  """Whether this machine's CPU reports a bfloat16 dot instruction.

  Read from /proc/cpuinfo (Linux); elsewhere False.
  """
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      return cpuinfo_has_bf16_dot(cpuinfo.read())
  except OSError:
    return False


def cpuinfo_has_bf16_dot(cpuinfo: str) -> bool:
  """Whether the first 'flags' (x86) or 'Features' (Arm) line of a /proc/cpuinfo text names
  a bfloat16 dot product instruction."""
  for line in cpuinfo.splitlines():
    key, _, values = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return not _BF16_DOT_CPU_FLAGS.isdisjoint(values.split())
  return False


def measure_cpu_matmul_peak(size: int = 1024, repeats: int = 5,
                            bf16_operands: bool = False) -> float:
  """FLOP/s of the best of `repeats` `size`x`size` matmuls on the first device: float32, or
  with `bf16_operands` bfloat16 inputs and a float32 result (as `kernels.bf16_matmul`)."""
  device = jax.devices()[0]
  dtype = jnp.bfloat16 if bf16_operands else jnp.float32
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops(devices=None, bf16_operands: bool = False) -> tuple[float, str]:
  """Peak FLOP/s of `devices` (default: all) and a short note on where it came from.

  Accelerators: the datasheet dense bf16 peak per chip times the chip count. CPU: measured
  here by timing a matmul of the model's operand precision (float32, or with
  `bf16_operands` bfloat16 inputs and float32 results), logged beside the MFU so the ratio
  can be checked.
  """
  devices = devices or jax.devices()
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    # Fake CPU devices share the same cores, so the host's peak is the peak of them all.
    peak = measure_cpu_matmul_peak(bf16_operands=bf16_operands)
    precision = "bfloat16-operand" if bf16_operands else "float32"
    return peak, f"measured {precision} matmul peak of this CPU: {peak / 1e9:.1f} GFLOP/s"
  accelerator = by_device_kind(kind)
  if accelerator is not None:
    total = accelerator.peak_flops * len(devices)
    return total, (f"{len(devices)} x {kind} datasheet bf16 peak "
                   f"{accelerator.peak_flops / 1e12:.0f} TFLOP/s")
  return float("nan"), f"unknown peak for device kind {kind!r}; MFU not reported"
