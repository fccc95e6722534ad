"""Parameter counts, FLOPs per token and MFU: one documented formula used everywhere.

Parameters (h = d_model / num_heads, N = num_heads, K = num_kv_heads, V = vocab):
  embedding      V * d_model                 (the output head too, unless tied)
  per block      d_model * N*h  (query)  + 2 * d_model * K*h  (key, value)
                 + N*h * d_model  (output)  + 3 * d_model * mlp_dim  (SwiGLU)
                 + 2 * d_model  (two RMSNorm scales)
  final norm     d_model

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B), counting a
multiply-add as 2 FLOPs and the backward pass as twice the forward:
  6 * P_matmul + 12 * num_layers * N*h * context_length
where P_matmul is every parameter that takes part in a matmul: the blocks' dense kernels
plus the output head (V * d_model, tied or not); embedding lookups and norms are free. The
attention term counts the full T x T score and value matmuls, without halving for the
causal mask, as PaLM and MaxText do.

MFU = achieved model FLOP/s / peak FLOP/s. The peak is the datasheet dense bf16 FLOP/s per
chip times the chip count on accelerators; on CPU it is measured in the same process by
timing a large matmul of the model's operand precision (`measure_cpu_matmul_peak`: float32,
or bfloat16 operands with float32 results where the model rounds its matmul operands to
bfloat16), and that measured number is logged beside the MFU so the ratio can be checked.
"""

import time

import jax
import jax.numpy as jnp

from llm_jax import hardware, model


def param_counts(model_config) -> dict[str, int]:
  """Returns total, embedding and non-embedding parameter counts (see module docstring)."""
  m = model_config
  head_dim = m.d_model // m.num_heads
  attention = m.d_model * head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.d_model * m.mlp_dim
  block = attention + mlp + 2 * m.d_model
  embedding = m.vocab_size * m.d_model
  head = 0 if m.tie_embeddings else embedding
  non_embedding = m.num_layers * block + m.d_model
  return {
      "params": non_embedding + embedding + head,
      "params_embedding": embedding + head,
      "params_non_embedding": non_embedding,
  }


def flops_per_token(model_config) -> float:
  """Training (forward + backward) FLOPs per token; formula in the module docstring."""
  m = model_config
  head_dim = m.d_model // m.num_heads
  blocks_matmul = m.num_layers * (
      m.d_model * head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.d_model * m.mlp_dim)
  matmul_params = blocks_matmul + m.vocab_size * m.d_model
  attention = 12 * m.num_layers * m.num_heads * head_dim * m.context_length
  return 6.0 * matmul_params + attention


def measure_cpu_matmul_peak(size: int = 1024, repeats: int = 5,
                            bf16_operands: bool = False) -> float:
  """FLOP/s of the best of `repeats` `size`x`size` matmuls on the first device: float32, or
  with `bf16_operands` bfloat16 inputs and a float32 result (as `model.bf16_matmul`)."""
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


def peak_flops(devices=None, model_config=None) -> tuple[float, str]:
  """Peak FLOP/s of `devices` (default: all) and a short note on where it came from.

  On CPU the peak is measured for the matmul operand precision of `model_config` (the
  `model` section of a config; float32 without one).
  """
  devices = devices or jax.devices()
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    # Fake CPU devices share the same cores, so the host's peak is the peak of them all.
    bf16_operands = model_config is not None and model.bf16_operands(
        model.ModelConfig.from_config(model_config))
    peak = measure_cpu_matmul_peak(bf16_operands=bf16_operands)
    precision = "bfloat16-operand" if bf16_operands else "float32"
    return peak, f"measured {precision} matmul peak of this CPU: {peak / 1e9:.1f} GFLOP/s"
  accelerator = hardware.by_device_kind(kind)
  if accelerator is not None:
    total = accelerator.peak_flops * len(devices)
    return total, (f"{len(devices)} x {kind} datasheet bf16 peak "
                   f"{accelerator.peak_flops / 1e12:.0f} TFLOP/s")
  return float("nan"), f"unknown peak for device kind {kind!r}; MFU not reported"


def mfu(tokens_per_sec: float, model_config, peak: float) -> float:
  return tokens_per_sec * flops_per_token(model_config) / peak
