import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import flops
from llm_jax.model import ModelConfig, Transformer, apply_rotary

from conftest import tiny_config


def _model(*overrides):
  c = tiny_config(*overrides)
  model = Transformer(ModelConfig.from_config(c.model))
  tokens = jnp.zeros((1, c.model.context_length), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
  return c, model, params


@pytest.mark.parametrize("overrides", [
    [], ["model.tie_embeddings=false"], ["model.scan_layers=false"],
    ["model.num_kv_heads=2", "model.mlp_dim=96", "model.num_layers=3"],
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


def test_rotary_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    rq = apply_rotary(q, jnp.array([[pq]]), 10_000.0)
    rk = apply_rotary(k, jnp.array([[pk]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
  assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


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

  np.testing.assert_allclose(blocked.apply({"params": params}, tokens, segments, positions),
                             dense.apply({"params": params}, tokens, segments, positions),
                             atol=1e-5)
  grads = [jax.grad(loss, argnums=1)(m, params) for m in (blocked, dense)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()), *grads)


def test_auto_attention_picks_by_platform_and_dtype(monkeypatch):
  from llm_jax import model as model_lib
  for backend, dtype, expected in (("cpu", "float32", "xla_blocked"), ("gpu", "bfloat16", "cudnn"),
                                   ("gpu", "float32", "xla"), ("tpu", "bfloat16", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert model_lib.attention_implementation("auto", dtype) == expected
  assert model_lib.attention_implementation("xla", "float32") == "xla"
