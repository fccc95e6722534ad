"""Parameter counts, FLOPs per token and MFU against counts done by hand and by the model."""

import math

import jax
import jax.numpy as jnp
import pytest

from llm_jax import config as config_lib
from llm_jax.model import flops
from llm_jax.tools import plan
from llm_jax.model.transformer import ModelConfig, Transformer

from conftest import tiny_config


def _model_config(*overrides):
  return config_lib.resolve(tiny_config(*overrides)).model


def test_flops_per_token_matches_a_hand_count_including_attention():
  m = _model_config()  # vocab 512, d_model 64, 2 layers, 8 heads, 4 kv heads, mlp 128, ctx 32
  assert (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim,
          m.context_length) == (512, 64, 2, 8, 4, 128, 32)
  head_dim = 64 // 8  # 8
  query = 64 * (8 * head_dim)  # 4096
  key = value = 64 * (4 * head_dim)  # 2048 each
  out = (8 * head_dim) * 64  # 4096
  mlp = 3 * 64 * 128  # 24576 (gate, up, down)
  per_layer = query + key + value + out + mlp  # 36864
  output_head = 512 * 64  # 32768: the tied embedding used as the output projection
  matmul_params = 2 * per_layer + output_head  # 106496
  dense = 6 * matmul_params  # 638976: 2 (multiply-add) x 3 (forward + backward)
  # Per layer and token, forward: scores q.k over 32 keys and the weighted sum of 32 values,
  # each 2 * 32 * (8 heads * 8 dims) = 4096 FLOPs; times 3 for forward + backward, 2 layers.
  attention = 2 * 3 * 2 * (2 * 32 * (8 * head_dim))  # 49152
  assert attention == 12 * 2 * 8 * head_dim * 32
  assert flops.flops_per_token(m) == dense + attention == 688128


def test_an_explicit_head_dim_sets_the_attention_width_in_the_hand_count():
  m = _model_config("model.head_dim=12")  # 8 heads of 12: attention 96 wide, d_model 64
  query = out = 64 * (8 * 12)  # 6144 each
  key = value = 64 * (4 * 12)  # 3072 each
  mlp = 3 * 64 * 128  # 24576
  per_layer = query + key + value + out + mlp  # 43008
  embedding = 512 * 64  # 32768, tied: also the output head
  norms = 2 * 2 * 64 + 64  # two per layer, and the final one
  assert flops.param_counts(m) == {"params": 2 * per_layer + norms + embedding,  # 119104
                                   "params_embedding": embedding,
                                   "params_non_embedding": 2 * per_layer + norms}
  attention = 12 * 2 * (8 * 12) * 32  # 73728: scores and values over 96-wide heads
  assert flops.flops_per_token(m) == 6 * (2 * per_layer + embedding) + attention == 786432


def test_mistral_nemo_counts_equal_transformers_and_the_models_own_parameters():
  """Mistral Nemo's heads (32 x 128 = 4096) are narrower than its d_model (5120)."""
  import torch
  from transformers import MistralConfig, MistralForCausalLM
  config = tiny_config("model.vocab_size=131072", "model.d_model=5120", "model.num_layers=40",
                       "model.num_heads=32", "model.num_kv_heads=8", "model.head_dim=128",
                       "model.mlp_dim=14336", "model.tie_embeddings=false")
  with torch.device("meta"):  # shapes only, nothing allocated
    hf_model = MistralForCausalLM(MistralConfig(
        vocab_size=131072, hidden_size=5120, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336,
        tie_word_embeddings=False))
  hf_params = sum(p.numel() for p in hf_model.parameters())
  assert flops.param_counts(config.model)["params"] == hf_params == 12_247_782_400
  assert plan.model_param_counts(config)["params"] == hf_params


def _matmul_kernel_sizes(model_config):
  """Parameters of the real model that enter a matmul: every kernel, plus the output head."""
  model = Transformer(ModelConfig.from_config(model_config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      continue
    total += math.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
  if model_config.tie_embeddings:
    return total  # the one embedding table is both the lookup and the output head
  return total - model_config.vocab_size * model_config.d_model  # the lookup is no matmul


@pytest.mark.parametrize("tied", [True, False])
def test_flops_and_param_counts_agree_with_the_models_own_parameters(tied):
  m = _model_config(f"model.tie_embeddings={tied}", "model.num_layers=3", "model.mlp_dim=96")
  attention = 12 * m.num_layers * m.d_model * m.context_length
  assert flops.flops_per_token(m) == 6 * _matmul_kernel_sizes(m) + attention
  model = Transformer(ModelConfig.from_config(m))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  leaves = jax.tree_util.tree_leaves(shapes["params"],
                                     is_leaf=lambda x: hasattr(x, "value"))
  actual = sum(math.prod(getattr(x, "value", x).shape) for x in leaves)
  assert flops.param_counts(m)["params"] == actual


def test_mfu_is_model_flops_over_the_stated_peak():
  m = _model_config()
  assert flops.mfu(1000.0, m, 1e12) == pytest.approx(1000.0 * 688128 / 1e12)
  assert flops.mfu(1000.0, m, 2e12) == pytest.approx(flops.mfu(1000.0, m, 1e12) / 2)
