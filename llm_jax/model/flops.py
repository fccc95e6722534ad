"""Parameter counts, FLOPs per token and MFU: one documented formula used everywhere.

Parameters (N = num_heads, K = num_kv_heads, V = vocab, h = the head width `head_dim`:
model.head_dim, or d_model / N when that is 0):
  embedding      V * d_model                 (the output head too, unless tied; a reward
                                             model's scalar head is d_model instead)
  per block      d_model * N*h  (query)  + 2 * d_model * K*h  (key, value)
                 + N*h * d_model  (output)  + 3 * d_model * mlp_dim  (SwiGLU)
                 + 2 * d_model  (two RMSNorm scales)
  final norm     d_model

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B), counting a
multiply-add as 2 FLOPs and the backward pass as twice the forward:
  6 * P_matmul + 12 * num_layers * N*h * context_length
where P_matmul is every parameter that takes part in a matmul: the blocks' dense kernels
plus the output head (V * d_model, tied or not; d_model for a reward head); embedding
lookups and norms are free. The
attention term counts the full T x T score and value matmuls, without halving for the
causal mask, as PaLM and MaxText do.

MFU = achieved model FLOP/s / peak FLOP/s, with the peak from `llm_jax.parallel.hardware.peak_flops`
(datasheet on accelerators, measured on CPU).
"""


def head_dim(model_config) -> int:
  """The width of one attention head: `model.head_dim`, or d_model / num_heads when it is 0."""
  return model_config.head_dim or model_config.d_model // model_config.num_heads


def param_counts(model_config) -> dict[str, int]:
  """Returns total, embedding and non-embedding parameter counts (see module docstring)."""
  m = model_config
  attention = m.d_model * head_dim(m) * (2 * m.num_heads + 2 * m.num_kv_heads)
  mlp = 3 * m.d_model * m.mlp_dim
  block = attention + mlp + 2 * m.d_model
  embedding = m.vocab_size * m.d_model
  head = m.d_model if m.reward_head else 0 if m.tie_embeddings else embedding
  non_embedding = m.num_layers * block + m.d_model
  return {
      "params": non_embedding + embedding + head,
      "params_embedding": embedding + head,
      "params_non_embedding": non_embedding,
  }


def flops_per_token(model_config) -> float:
  """Training (forward + backward) FLOPs per token; formula in the module docstring."""
  m = model_config
  h = head_dim(m)
  blocks_matmul = m.num_layers * (
      m.d_model * h * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * m.d_model * m.mlp_dim)
  matmul_params = blocks_matmul + (1 if m.reward_head else m.vocab_size) * m.d_model
  attention = 12 * m.num_layers * m.num_heads * h * m.context_length
  return 6.0 * matmul_params + attention


def mfu(tokens_per_sec: float, model_config, peak: float) -> float:
  return tokens_per_sec * flops_per_token(model_config) / peak
