"""Plan a run on paper: compile the real train step for a mesh and report size, memory, speed.

`plan(config, num_devices)` builds the same jitted train step that `llm-jax train` runs
(`llm_jax.train.builder.build`, with the platform choices resolved for the target
accelerator), feeds it abstract parameters, optimizer state and a
batch (`jax.ShapeDtypeStruct`s carrying their shardings, so no parameter is ever
materialised) and compiles it ahead of time for a mesh of `num_devices` devices. On a laptop
those are fake CPU devices (`--xla_force_host_platform_device_count`); the CLI arranges that.

What comes out:
  * parameter counts from `llm_jax.model.flops` (and the count of the model's own abstract
    parameters, which must agree);
  * training FLOPs per token and per step from `llm_jax.model.flops`, beside XLA's cost analysis of
    the compiled step. XLA counts a while loop's body once, so the scanned layer stack and
    the gradient-accumulation loop would be undercounted; XLA's number is therefore taken
    from the same step compiled unrolled with one and with two layers and no accumulation,
    and extrapolated linearly to all layers. It includes rematerialised forward passes, so
    with remat it exceeds the 6N-style model FLOPs by design;
  * per-device memory of the compiled executable: arguments, outputs, temporaries and the
    total live at once (outputs aliased to donated arguments counted once). It is the CPU
    compiler's schedule: GPU and TPU compilers fuse and schedule differently, so treat it as
    an estimate to within some tens of percent, not a guarantee;
  * against a named accelerator (`llm_jax.parallel.hardware`): whether that total fits its memory,
    and the step time and tokens/s that a given MFU would give.
"""

import math
import time

import jax

from llm_jax import config as config_lib
from llm_jax.model import flops
from llm_jax.parallel import checkpoint, hardware, sharding
from llm_jax.errors import UserError
from llm_jax.train import builder
from llm_jax.train import recipes


def model_param_counts(config) -> dict[str, int]:
  """Total and non-embedding parameters of the model as built (abstractly, nothing allocated).

  Counted from the parameter tree itself, independently of `flops.param_counts`'s formula,
  so the two can check each other.
  """
  model = checkpoint.model_of(config, "tpu")
  params, _ = sharding.logical_params(model)
  sizes = {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(subtree))
           for name, subtree in params.items()}
  return {"params": sum(sizes.values()),
          "params_non_embedding": sum(n for name, n in sizes.items()
                                      if name not in ("embedding", "lm_head"))}


def for_accelerator(config, accelerator: hardware.Accelerator | None):
  """`config` resolved for the accelerator it is planned for (a TPU when none is named).

  cuDNN's flash attention cannot compile on the CPU devices the plan is compiled on, so
  XLA's dense attention stands in for it, which makes the memory estimate pessimistic there.
  """
  resolved = config_lib.resolve(config, accelerator.platform if accelerator else "tpu")
  if resolved.model.attention == "cudnn":
    resolved.model.attention = "xla"
  return resolved


def _compile_train_step(config, devices):
  """The ahead-of-time compiled train step of a resolved `config` on a mesh over `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  built = builder.build(config, mesh, recipes.configured(config)[0])
  state = built.abstract_state()
  with sharding.activate(mesh):  # a reference (GRPO's) is sharded as the policy's parameters
    return built.train_step.lower(state, built.abstract_batch(),
                                  state.params if built.objective.reference else None).compile()


def _cost_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per executable
    analysis = analysis[0]
  return float(analysis["flops"])


def _xla_flops_per_device(config, devices) -> float:
  """XLA's FLOPs of one step on one device, extrapolated from 1 and 2 unrolled layers."""
  per_layers = []
  for layers in (1, 2):
    unrolled = config.copy_and_resolve_references()
    unrolled.model.num_layers = layers
    unrolled.model.scan_layers = False
    unrolled.train.grad_accum_steps = 1
    per_layers.append(_cost_flops(_compile_train_step(unrolled, devices)))
  one, two = per_layers
  return one + (config.model.num_layers - 1) * (two - one)


def plan(config, num_devices: int, hardware_name: str | None = None, target_mfu: float = 0.4,
         xla_flops: bool = True) -> dict:
  """Compiles `config`'s train step for `num_devices` devices; returns the plan as a dict.

  Uses the first `num_devices` of `jax.devices()`; fails with a UserError when there are
  fewer, when the mesh does not divide them, or for an unknown hardware name or bad MFU.
  `xla_flops=False` skips the two extra compiles behind XLA's FLOP count.
  """
  accelerator = hardware.by_name(hardware_name) if hardware_name else None
  if not 0 < target_mfu <= 1:
    raise UserError(f"--mfu={target_mfu} must be in (0, 1], e.g. 0.4 for 40%.")
  if num_devices < 1:
    raise UserError(f"--devices={num_devices} must be at least 1.")
  if num_devices > jax.device_count():
    raise UserError(f"--devices={num_devices} but this process has {jax.device_count()} "
                    "devices; run `llm-jax plan` from a fresh process, which makes them.")
  config_lib.validate(config, num_devices)
  config = for_accelerator(config, accelerator)
  devices = jax.devices()[:num_devices]
  m, t = config.model, config.train

  start = time.perf_counter()
  compiled = _compile_train_step(config, devices)
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  start = time.perf_counter()
  xla_flops_per_step = (_xla_flops_per_device(config, devices) * num_devices if xla_flops
                        else None)
  cost_seconds = time.perf_counter() - start

  counts = flops.param_counts(m)
  tokens_per_step = t.batch_size * m.context_length
  flops_per_token = flops.flops_per_token(m)
  total_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  result = {
      "devices": num_devices,
      "mesh": config_lib.resolve_mesh_shape(config.mesh, num_devices),
      "params": counts["params"],
      "params_non_embedding": counts["params_non_embedding"],
      "params_in_model": model_param_counts(config),
      "tokens_per_step": tokens_per_step,
      "flops_per_token": flops_per_token,
      "flops_per_step": flops_per_token * tokens_per_step,
      "xla_flops_per_token": (None if xla_flops_per_step is None
                              else xla_flops_per_step / tokens_per_step),
      "xla_flops_per_step": xla_flops_per_step,
      "memory_per_device": {
          "arguments": memory.argument_size_in_bytes,
          "outputs": memory.output_size_in_bytes,
          "aliased": memory.alias_size_in_bytes,
          "temporaries": memory.temp_size_in_bytes,
          "total": total_bytes,
      },
      "fits_on": [a.name for a in hardware.ACCELERATORS.values() if total_bytes <= a.memory_bytes],
      "compile_seconds": round(compile_seconds, 1),
      "cost_analysis_seconds": round(cost_seconds, 1),
  }
  if accelerator is not None:
    peak = accelerator.peak_flops * num_devices
    tokens_per_sec = target_mfu * peak / flops_per_token
    result["hardware"] = {
        "name": accelerator.name,
        "memory_per_device": accelerator.memory_bytes,
        "fits": total_bytes <= accelerator.memory_bytes,
        "peak_flops_per_device": accelerator.peak_flops,
        "mfu": target_mfu,
        "step_seconds": tokens_per_step / tokens_per_sec,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_device": tokens_per_sec / num_devices,
    }
  return result


def _gb(n: float) -> str:
  """Bytes in GB (10^9), the unit of accelerator datasheets; MB below one GB."""
  return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _xla_vs_formula(xla: float | None, formula: float) -> str:
  if xla is None:
    return "not counted"
  return f"{xla:.4g}  ({xla / formula:.2f}x flops.py)"


def format_table(result: dict, config_name: str) -> str:
  """The plan as an aligned two-column text table."""
  mesh = " x ".join(f"{axis} {size}" for axis, size in result["mesh"].items())
  memory = result["memory_per_device"]
  rows = [
      ("config", config_name),
      ("devices / mesh", f"{result['devices']}  ({mesh})"),
      ("params", f"{result['params']:,}"),
      ("params_non_embedding", f"{result['params_non_embedding']:,}"),
      ("tokens per step", f"{result['tokens_per_step']:,}"),
      ("FLOPs per token (flops.py)", f"{result['flops_per_token']:.4g}"),
      ("FLOPs per token (XLA)", _xla_vs_formula(result["xla_flops_per_token"],
                                                 result["flops_per_token"])),
      ("FLOPs per step (flops.py)", f"{result['flops_per_step']:.4g}"),
      ("FLOPs per step (XLA)", _xla_vs_formula(result["xla_flops_per_step"],
                                                result["flops_per_step"])),
      ("memory/device: arguments", _gb(memory["arguments"])),
      ("memory/device: outputs", _gb(memory["outputs"]) +
       f"  ({_gb(memory['aliased'])} aliased to donated arguments)"),
      ("memory/device: temporaries", _gb(memory["temporaries"])),
      ("memory/device: total", _gb(memory["total"])),
      ("fits on", ", ".join(result["fits_on"]) or "none of the known accelerators"),
  ]
  hw = result.get("hardware")
  if hw:
    verdict = "yes" if hw["fits"] else "NO"
    rows += [
        (f"fits {hw['name']} ({_gb(hw['memory_per_device'])})",
         f"{verdict}  ({memory['total'] / hw['memory_per_device']:.0%} of its memory)"),
        (f"step time at {hw['mfu']:.0%} MFU", f"{hw['step_seconds']:.3g} s  "
         f"(peak {hw['peak_flops_per_device'] / 1e12:.0f} TFLOP/s per device)"),
        (f"tokens/s at {hw['mfu']:.0%} MFU",
         f"{hw['tokens_per_sec']:,.0f}  ({hw['tokens_per_sec_per_device']:,.0f} per device)"),
    ]
  rows.append(("compile time on this host",
               f"{result['compile_seconds']} s (+{result['cost_analysis_seconds']} s for XLA "
               "FLOPs)"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
