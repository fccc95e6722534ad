import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model import flops
from llm_jax import config as config_lib
from llm_jax.model.transformer import ModelConfig, apply_rotary, rotary_inv_freq

from conftest import model_of, tiny_config


def _model(*overrides):
  c = tiny_config(*overrides)
  model = model_of(c)
  tokens = jnp.zeros((1, c.model.context_length), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  return c, model, params


@pytest.mark.parametrize("overrides", [
    [], ["model.tie_embeddings=false"], ["model.scan_layers=false"],
    ["model.num_kv_heads=2", "model.mlp_dim=96", "model.num_layers=3"],
    ["model.head_dim=12"],  # heads * head_dim = 96 wide, d_model 64
])
def test_parameter_count_matches_formula(overrides):
  c, _, params = _model(*overrides)
  counted = sum(x.size for x in jax.tree.leaves(params))
  assert counted == flops.param_counts(c.model)["params"]


def test_causality():
  c, model, params = _model()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, c.model.vocab_size, (2, 32)).astype(np.int32)
  changed = tokens.copy()
  t = 17
  changed[:, t] = (changed[:, t] + 1) % c.model.vocab_size
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:])  # the change is visible from t on


def _model_config(*overrides) -> ModelConfig:
  return ModelConfig.from_config(config_lib.resolve(tiny_config(*overrides)).model)


@pytest.mark.parametrize("scaling", ["none", "llama3"])
def test_rotary_scores_depend_only_on_relative_position(scaling):
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  inv_freq = rotary_inv_freq(_model_config("model.head_dim=16", f"model.rope_scaling={scaling}",
                                           "model.rope_original_context=64"))

  def score(pq, pk):
    rq = apply_rotary(q, jnp.array([[pq]]), inv_freq)
    rk = apply_rotary(k, jnp.array([[pk]]), inv_freq)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
  assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


@pytest.mark.parametrize("theta, factor, low, high, original", [
    (500_000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (10_000.0, 16.0, 2.0, 8.0, 1024),
])
def test_llama3_rotary_frequencies_equal_transformers(theta, factor, low, high, original):
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_config = LlamaConfig(
      hidden_size=64, num_attention_heads=8, head_dim=128,
      max_position_embeddings=int(original * factor),
      rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                       "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": original})
  expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
  config = _model_config(
      "model.head_dim=128", f"model.rope_theta={theta}", "model.rope_scaling=llama3",
      f"model.rope_scaling_factor={factor}", f"model.rope_low_freq_factor={low}",
      f"model.rope_high_freq_factor={high}", f"model.rope_original_context={original}")
  ours = np.asarray(rotary_inv_freq(config))
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=0)
  # Every band occurs: frequencies kept, divided by the factor, and blended between.
  plain = np.asarray(rotary_inv_freq(dataclasses.replace(config, rope_scaling="none")))
  ratio = plain / ours
  assert np.any(ratio == 1) and np.any(np.isclose(ratio, factor))
  assert np.any((ratio > 1.01) & (ratio < factor * 0.99))


def test_llama3_scaling_changes_the_model_only_through_its_factor():
  _, plain, params = _model()
  tokens = np.random.default_rng(8).integers(0, 512, (1, 32)).astype(np.int32)
  unscaled = plain.apply({"params": params}, tokens)
  for factor in (1.0, 4.0):
    scaled = model_of(tiny_config("model.rope_scaling=llama3", "model.rope_original_context=32",
                                  f"model.rope_scaling_factor={factor}"))
    logits = scaled.apply({"params": params}, tokens)
    assert np.allclose(logits, unscaled, atol=1e-5) == (factor == 1.0)


def test_model_is_invariant_to_shifting_all_positions():
  c, model, params = _model()
  tokens = np.random.default_rng(2).integers(0, c.model.vocab_size, (1, 32)).astype(np.int32)
  positions = np.arange(32)[None]
  a = model.apply({"params": params}, tokens, None, positions)
  b = model.apply({"params": params}, tokens, None, positions + 50)
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_packed_documents_do_not_see_each_other():
  c, model, params = _model()
  rng = np.random.default_rng(3)
  doc_a = rng.integers(0, c.model.vocab_size, 12).astype(np.int32)
  doc_b = rng.integers(0, c.model.vocab_size, 20).astype(np.int32)
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 12 + [2] * 20], np.int32)
  positions = np.concatenate([np.arange(12), np.arange(20)])[None]
  packed_logits = model.apply({"params": params}, packed, segments, positions)
  alone_a = model.apply({"params": params}, doc_a[None])
  alone_b = model.apply({"params": params}, doc_b[None])
  np.testing.assert_allclose(packed_logits[0, :12], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 12:], alone_b[0], atol=1e-5)
  # Without segment ids, document b would attend to a and its logits would change.
  unmasked = model.apply({"params": params}, packed, None, positions)
  assert not np.allclose(unmasked[0, 12:], alone_b[0], atol=1e-3)


def _loss_and_grads(model, params, tokens):
  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], axis=-1))
  return jax.jit(jax.value_and_grad(loss))(params)


def _unstacked(params, num_layers):
  """Scanned parameters (one stack of layers) as the unscanned model names them."""
  layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"])
            for i in range(num_layers)}
  return {**{k: v for k, v in params.items() if k != "layers"}, **layers}


def _assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max())), a, b)


@pytest.mark.parametrize("variant", ["model.scan_unroll=2", "model.scan_layers=false"])
def test_scanned_and_unrolled_layers_give_the_same_logits_and_gradients(variant):
  c, rolled, params = _model("model.scan_unroll=1")
  _, other, _ = _model(variant)
  tokens = np.random.default_rng(6).integers(0, 512, (2, 32)).astype(np.int32)
  other_params = params if c.model.scan_layers and "scan_layers" not in variant else \
      _unstacked(params, c.model.num_layers)
  np.testing.assert_allclose(other.apply({"params": other_params}, tokens),
                             rolled.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)
  (loss, grads), (other_loss, other_grads) = [
      _loss_and_grads(m, p, tokens) for m, p in ((rolled, params), (other, other_params))]
  assert other_loss == pytest.approx(float(loss), rel=1e-6)
  if "scan_layers" in variant:
    grads = _unstacked(grads, c.model.num_layers)
  _assert_trees_close(other_grads, grads)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_each_remat_policy_gives_the_loss_and_gradients_of_none(policy, scan):
  _, plain, params = _model(f"model.scan_layers={scan}")
  _, remat, _ = _model(f"model.scan_layers={scan}", f"model.remat_policy={policy}")
  tokens = np.random.default_rng(7).integers(0, 512, (2, 32)).astype(np.int32)
  (loss, grads), (remat_loss, remat_grads) = [_loss_and_grads(m, params, tokens)
                                              for m in (plain, remat)]
  assert remat_loss == pytest.approx(float(loss), rel=1e-6)
  _assert_trees_close(remat_grads, grads)


@pytest.mark.parametrize("block_size", [8, 5, 64])
def test_blocked_attention_equals_dense_attention_with_packing(block_size):
  """Query blocks (also ragged ones, and one block for all) change nothing, not even grads."""
  _, blocked, params = _model("model.attention=xla_blocked",
                              f"model.attention_block_size={block_size}")
  _, dense, _ = _model("model.attention=xla")
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, 512, (2, 32)).astype(np.int32)
  segments = np.array([[1] * 12 + [2] * 20, [1] * 7 + [2] * 9 + [3] * 10 + [0] * 6], np.int32)
  positions = np.concatenate([np.arange(12), np.arange(20), np.arange(7), np.arange(9),
                              np.arange(10), np.arange(6)]).reshape(2, 32)

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, tokens, segments, positions)[..., :8] ** 2)

  logits = [jax.jit(m.apply)({"params": params}, tokens, segments, positions)
            for m in (blocked, dense)]
  np.testing.assert_allclose(*logits, atol=1e-5)
  grads = [jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(m, params)
           for m in (blocked, dense)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), *grads)


@pytest.mark.parametrize("platform, dtype, expected", [
    ("cpu", "float32", "xla_blocked"), ("gpu", "bfloat16", "cudnn"), ("gpu", "float32", "xla"),
    ("tpu", "bfloat16", "xla")])
def test_auto_attention_is_resolved_by_platform_and_dtype(platform, dtype, expected):
  config = tiny_config("model.attention=auto", f"model.dtype={dtype}")
  assert config_lib.resolve(config, platform).model.attention == expected
  assert config.model.attention == "auto"  # the saved config keeps 'auto'
  pinned = tiny_config("model.attention=xla", f"model.dtype={dtype}")
  assert config_lib.resolve(pinned, platform).model.attention == "xla"


@pytest.mark.parametrize("platform, unroll, expected", [
    ("cpu", 0, 2), ("gpu", 0, 1), ("tpu", 0, 1), ("tpu", 5, 2), ("cpu", 1, 1)])
def test_scan_unroll_is_resolved_by_platform(platform, unroll, expected):
  config = tiny_config(f"model.scan_unroll={unroll}")  # two layers
  assert config_lib.resolve(config, platform).model.scan_unroll == expected


def test_the_model_refuses_unresolved_auto_values():
  with pytest.raises(ValueError, match="resolve"):
    ModelConfig.from_config(tiny_config("model.attention=auto").model)


def _bf16_rounded(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bf16_matmul_rounds_every_operand_and_returns_float32(transpose_w):
  """Forward and both gradients equal float64 matmuls of bf16-rounded operands (each product
  of two bf16 numbers is exact in float32, so only float32 summation separates them)."""
  from llm_jax.model.kernels import bf16_matmul
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 40)).astype(np.float32)
  w_kn = rng.normal(size=(40, 7)).astype(np.float32)
  w = w_kn.T.copy() if transpose_w else w_kn
  g = rng.normal(size=(6, 7)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: bf16_matmul(x, w, transpose_w), x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  x64, w64, g64 = _bf16_rounded(x), _bf16_rounded(w_kn), _bf16_rounded(g)
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
  dw_kn = x64.T @ g64
  np.testing.assert_allclose(dw, dw_kn.T if transpose_w else dw_kn, rtol=1e-5, atol=1e-5)
  # The rounding is real: a float32 matmul differs by far more than float32 summation.
  assert np.abs(np.asarray(y) - x.astype(np.float64) @ w_kn).max() > 1e-3


def test_bf16_operands_model_stays_close_to_float32():
  _, bf16_model, params = _model("model.matmul_precision=bfloat16")
  _, f32_model, _ = _model("model.matmul_precision=float32")
  tokens = np.random.default_rng(5).integers(0, 512, (2, 32)).astype(np.int32)

  def loss(model, p):
    logits = model.apply({"params": p}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                         tokens[:, 1:, None], axis=-1))

  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  (loss16, grads16), (loss32, grads32) = [loss_and_grads(m, params)
                                          for m in (bf16_model, f32_model)]
  assert loss16 != loss32
  assert abs(loss16 - loss32) < 1e-2 * loss32
  flat16, flat32 = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                    for g in (grads16, grads32)]
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.999


def test_matmul_precision_auto_follows_the_cpu(monkeypatch):
  from llm_jax.parallel import hardware
  for has_bf16_dot in (True, False):
    monkeypatch.setattr(hardware, "cpu_has_bf16_dot", lambda v=has_bf16_dot: v)
    auto = tiny_config("model.matmul_precision=auto")
    assert config_lib.resolve(auto, "cpu").model.matmul_precision == (
        "bfloat16" if has_bf16_dot else "float32")
    assert config_lib.resolve(auto, "gpu").model.matmul_precision == "float32"
    pinned = config_lib.resolve(tiny_config("model.matmul_precision=bfloat16"), "gpu")
    assert ModelConfig.from_config(pinned.model).bf16_operands
  # bfloat16 activations have their own matmuls: the setting is for float32 models.
  bf16_model = tiny_config("model.matmul_precision=bfloat16", "model.dtype=bfloat16")
  assert not ModelConfig.from_config(config_lib.resolve(bf16_model).model).bf16_operands


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ("", False),
])
def test_cpuinfo_bf16_dot_flags(cpuinfo, expected):
  from llm_jax.parallel import hardware
  assert hardware.cpuinfo_has_bf16_dot(cpuinfo) is expected
