"""Throughput of the real train step, prefill and decode for a config (`llm-jax bench`).

The train step is the one `llm-jax train` runs (`llm_jax.train.builder.build`, on a sharded
fresh state), fed a synthetic batch of the training shapes and shardings, so the numbers
measure the model and optimizer, not the input pipeline. Every timed call ends in
`block_until_ready`, the first calls (compilation, warm-up) are not timed, and the reported
time is the median over the timed calls.

Prefill is one jitted cached forward pass over a batch of prompts of half the context, of
the model and parameters as `generate` prepares them (`generate.for_decoding`); decode is
`llm_jax.inference.generate.generate` with an end-of-sequence id that never occurs, so every step
runs, minus the prefill of the same batch, per generated token (the call's one preparation
of the parameters counts as decode time), greedy at each of
DECODE_BATCH_SIZES and sampled (temperature 1, top-p 0.95) at one; its compile time is the
first call's time minus the median call's. FLOPs per token and MFU
come from `llm_jax.model.flops`, the peak from `llm_jax.parallel.hardware` (on CPU a matmul peak measured in
the same run).
"""

import statistics
import time

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax.model import flops
from llm_jax.inference import generate
from llm_jax.parallel import hardware, sharding
from llm_jax.errors import UserError
from llm_jax.train import builder

DECODE_BATCH_SIZES = (1, 8, 32)
SAMPLED_DECODE_BATCH_SIZE = 8  # also timed with temperature 1 and top-p 0.95
SAMPLING = {"temperature": 1.0, "top_p": 0.95}
PREFILL_BATCH_SIZE = 8
MAX_DECODE_TOKENS = 64  # decode cost per token barely depends on how many follow
WARMUP_CALLS = 2


def _median_seconds(call, repeats: int) -> float:
  """Median wall time of `repeats` calls of `call()`, each waited for to the end."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def synthetic_batch(config, mesh, seed: int = 0) -> dict[str, jax.Array]:
  """A training batch of random tokens, one document per row, sharded as real batches are."""
  m, t = config.model, config.train
  rows, length = t.batch_size // jax.process_count(), m.context_length
  rng = np.random.default_rng([seed, jax.process_index()])
  tokens = rng.integers(0, m.vocab_size, (rows, length + 1), dtype=np.int32)
  local = {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": np.ones((rows, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
      "weights": np.ones((rows, length), np.float32),
  }
  return sharding.global_batch(local, mesh)


class TrainStepTimer:
  """The compiled train step of `config` on `mesh`, with its state and a fixed batch.

  `compile_time_sec` covers lowering and compiling; `time_steps(n)` runs n steps, each
  waited for, and returns their times.
  """

  def __init__(self, config, mesh):
    if config.objective.name != "next_token":
      raise UserError(f"llm-jax bench times next-token training; objective.name="
                      f"{config.objective.name!r} is not measured (bench its model as a "
                      "language model, or read tokens/s in the run's metrics.jsonl).")
    self.built = builder.build(config_lib.resolve(config), mesh)
    self.state = self.built.init_state()
    self.batch = synthetic_batch(config, mesh, config.train.seed)
    start = time.perf_counter()
    with sharding.activate(mesh):
      self._step = self.built.train_step.lower(self.state, self.batch, None).compile()
    self.compile_time_sec = time.perf_counter() - start
    self.tokens_per_step = config.train.batch_size * config.model.context_length

  def time_steps(self, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self._step(self.state, self.batch, None)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    return times


def _prompts(config, batch_size: int, length: int) -> list[list[int]]:
  rng = np.random.default_rng(config.train.seed)
  return rng.integers(0, config.model.vocab_size, (batch_size, length)).tolist()


def _inference(config, model, params, repeats: int) -> dict:
  """Prefill tokens/s and decode tokens/s at each of DECODE_BATCH_SIZES."""
  context = config.model.context_length
  prompt_length = max(1, context // 2)
  new_tokens = min(MAX_DECODE_TOKENS, context - prompt_length)
  prefill = jax.jit(generate.prefill, static_argnames="model")  # generate's own prefill
  decoding_model, decoding_params = generate.for_decoding(model, params,
                                                          prompt_length + new_tokens)
  prefill_sec = {}
  for batch_size in sorted({PREFILL_BATCH_SIZE, *DECODE_BATCH_SIZES}):
    tokens_BT = jax.numpy.asarray(_prompts(config, batch_size, prompt_length), np.int32)
    lengths_B = jax.numpy.full((batch_size,), prompt_length, np.int32)
    call = lambda: prefill(decoding_params, decoding_model, tokens_BT,  # noqa: E731
                           lengths_B)
    _median_seconds(call, WARMUP_CALLS)
    prefill_sec[batch_size] = _median_seconds(call, repeats)
  result = {
      "prefill_batch_size": PREFILL_BATCH_SIZE,
      "prefill_prompt_tokens": prompt_length,
      "prefill_time_sec": prefill_sec[PREFILL_BATCH_SIZE],
      "prefill_tokens_per_sec": PREFILL_BATCH_SIZE * prompt_length / prefill_sec[
          PREFILL_BATCH_SIZE],
      "decode_new_tokens": new_tokens,
  }
  runs = [(f"decode_b{b}", b, {}) for b in DECODE_BATCH_SIZES] + [
      (f"decode_b{SAMPLED_DECODE_BATCH_SIZE}_sampled", SAMPLED_DECODE_BATCH_SIZE, SAMPLING)]
  for name, batch_size, options in runs:
    prompts = _prompts(config, batch_size, prompt_length)
    run = lambda: generate.generate(params, model, prompts, new_tokens, eos_id=-1,  # noqa: E731
                                    **options)
    first_call_sec = _median_seconds(run, 1)  # compiles
    call_sec = _median_seconds(run, repeats)
    # Floored at 1% of the call: on a busy machine a median prefill can exceed a whole call.
    decode_sec = max(call_sec - prefill_sec[batch_size], 1e-2 * prefill_sec[batch_size])
    result[f"{name}_compile_time_sec"] = max(0.0, first_call_sec - call_sec)
    result[f"{name}_token_time_sec"] = decode_sec / new_tokens
    result[f"{name}_tokens_per_sec"] = batch_size * new_tokens / decode_sec
  return result


def peak_memory_bytes(devices=None) -> int | None:
  """Largest peak of bytes in use over the local devices, or None where not reported."""
  peaks = []
  for device in devices or jax.local_devices():
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) if peaks else None


def measure(config, steps: int = 10, inference: bool = True, peak: float | None = None) -> dict:
  """Times `steps` train steps (and prefill and decode) of `config`; returns a flat dict.

  `peak` is the FLOP/s the MFU is relative to; by default `hardware.peak_flops` for the
  config's model (measured on CPU, datasheet on accelerators).
  """
  config_lib.validate(config, jax.device_count())
  if steps < 1:
    raise UserError(f"--steps={steps} must be at least 1.")
  m, t = config.model, config.train
  mesh = sharding.make_mesh(config.mesh)
  timer = TrainStepTimer(config, mesh)
  timer.time_steps(WARMUP_CALLS)
  step_time = statistics.median(timer.time_steps(steps))
  with sharding.activate(mesh):
    inference_result = (_inference(config, timer.built.model, timer.state.params, steps)
                        if inference else {})
  if peak is None:
    peak, peak_note = hardware.peak_flops(
        bf16_operands=timer.built.model.config.bf16_operands)
  else:
    peak_note = "given"
  tokens_per_sec = timer.tokens_per_step / step_time
  flops_per_token = flops.flops_per_token(m)
  return {
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "params": flops.param_counts(m)["params"],
      "batch_size": t.batch_size,
      "context_length": m.context_length,
      "steps": steps,
      "compile_time_sec": timer.compile_time_sec,
      "step_time_sec": step_time,
      "tokens_per_sec": tokens_per_sec,
      "flops_per_token": flops_per_token,
      "achieved_flops_per_sec": tokens_per_sec * flops_per_token,
      "peak_flops_per_sec": peak,
      "peak_note": peak_note,
      "mfu": flops.mfu(tokens_per_sec, m, peak),
      "peak_memory_bytes": peak_memory_bytes(),
      **inference_result,
  }


def summary(result: dict) -> str:
  """The result of `measure` as a few lines for people."""
  r = result
  memory = (f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None
            else "not reported by this platform")
  lines = [
      f"{r['params'] / 1e6:.2f}M parameters, batch {r['batch_size']} x {r['context_length']} "
      f"tokens on {r['devices']} {r['platform']} device(s) ({r['device_kind']})",
      f"train step: compile {r['compile_time_sec']:.1f}s, median {r['step_time_sec'] * 1e3:.1f} "
      f"ms over {r['steps']} steps, {r['tokens_per_sec']:,.0f} tokens/s",
      f"  {r['flops_per_token'] / 1e6:.1f} MFLOPs/token, {r['achieved_flops_per_sec'] / 1e9:.1f} "
      f"GFLOP/s, MFU {r['mfu']:.1%} of the {r['peak_note']}",
      f"  peak memory: {memory}",
  ]
  if "prefill_tokens_per_sec" in r:
    lines.append(f"prefill: {r['prefill_batch_size']} prompts x {r['prefill_prompt_tokens']} "
                 f"tokens in {r['prefill_time_sec'] * 1e3:.1f} ms, "
                 f"{r['prefill_tokens_per_sec']:,.0f} tokens/s")
    names = [(f"decode_b{b}", f"batch {b}") for b in DECODE_BATCH_SIZES] + [
        (f"decode_b{SAMPLED_DECODE_BATCH_SIZE}_sampled",
         f"batch {SAMPLED_DECODE_BATCH_SIZE}, temperature 1, top-p 0.95")]
    for name, what in names:
      lines.append(f"decode {what}: {r[f'{name}_token_time_sec'] * 1e3:.2f} ms/step, "
                   f"{r[f'{name}_tokens_per_sec']:,.0f} tokens/s "
                   f"({r['decode_new_tokens']} new tokens per row; first call compiles in "
                   f"{r[f'{name}_compile_time_sec']:.1f}s)")
  return "\n".join(lines)
