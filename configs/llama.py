"""Model-size presets, from the CPU default to the published Llama shapes.

Select with `--config configs/llama.py:<name>`; every preset starts from `configs/base.py`
and sets model shape and context length (and, for the large ones, a training setup that is a
sane starting point on accelerators). Shapes of the Llama presets follow the published
model cards (Touvron et al. 2023 for Llama 2, Meta 2024 for Llama 3).
"""

import ml_collections

from llm_jax.configs import base

# name: (vocab, d_model, layers, heads, kv_heads, mlp_dim, context, rope_theta, tied)
_SHAPES = {
    "default": (512, 256, 4, 4, 2, 768, 128, 1e4, True),
    "25m": (8192, 512, 6, 8, 4, 1536, 512, 1e4, True),
    "125m": (32000, 768, 12, 12, 4, 2048, 1024, 1e4, True),
    "1b": (32000, 2048, 16, 16, 8, 5632, 2048, 1e4, False),
    "llama2-7b": (32000, 4096, 32, 32, 32, 11008, 4096, 1e4, False),
    "llama2-13b": (32000, 5120, 40, 40, 40, 13824, 4096, 1e4, False),
    "llama2-70b": (32000, 8192, 80, 64, 8, 28672, 4096, 1e4, False),
    "llama3-8b": (128256, 4096, 32, 32, 8, 14336, 8192, 5e5, False),
    "llama3-70b": (128256, 8192, 80, 64, 8, 28672, 8192, 5e5, False),
}

# Presets at least this wide get the accelerator training setup below.
_ACCELERATOR_MIN_D_MODEL = 2048


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  name = variant or "default"
  if name not in _SHAPES:
    raise ValueError(
        f"configs/llama.py has no preset {name!r}; choose one of {', '.join(_SHAPES)}."
    )
  vocab, d_model, layers, heads, kv_heads, mlp_dim, context, theta, tied = _SHAPES[name]
  c = base.get_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = vocab, d_model, layers
  m.num_heads, m.num_kv_heads, m.mlp_dim = heads, kv_heads, mlp_dim
  m.context_length, m.rope_theta, m.tie_embeddings = context, theta, tied
  if d_model >= _ACCELERATOR_MIN_D_MODEL:
    # Accelerator-sized: bf16 compute, full remat, Llama-style optimizer settings.
    m.dtype = "bfloat16"
    m.remat_policy = "full"
    c.train.batch_size = 256
    c.train.learning_rate = 3e-4
    c.train.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
  return c
