"""A train step gives the same loss and parameters on every mesh as on one device."""

import jax
import numpy as np
import pytest

from llm_jax.parallel import sharding

from conftest import build, tiny_config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, t, v = config.train.batch_size, config.model.context_length, config.model.vocab_size
  segments = np.ones((b, t), np.int32)
  segments[:, t // 2:] = 2  # two packed documents per row
  positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
  weights = np.ones((b, t), np.float32)
  weights[:, t // 2 - 1] = 0  # the boundary target is not a real next token
  return {
      "inputs": rng.integers(0, v, (b, t)).astype(np.int32),
      "targets": rng.integers(0, v, (b, t)).astype(np.int32),
      "segment_ids": segments,
      "positions": np.tile(positions, (b, 1)).astype(np.int32),
      "weights": weights,
  }


def _two_steps(config, devices):
  built = build(config, devices)
  state = built.init_state()
  losses = []
  with sharding.activate(built.mesh):
    for seed in (0, 1):
      state, metrics = built.train_step(state, built.global_batch(_batch(config, seed)), None)
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device_reference():
  config = tiny_config("mesh.fsdp=1")
  return _two_steps(config, jax.devices()[:1])


@pytest.mark.parametrize("data, fsdp, tensor", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_train_step_matches_single_device(single_device_reference, data, fsdp, tensor):
  ref_losses, ref_params, _ = single_device_reference
  config = tiny_config(f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
  losses, params, state = _two_steps(config, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               params, ref_params)
  # The parameters really are split as the rules say, not silently replicated.
  query = state.params["layers"]["attention"]["query"]  # [layers, embed, heads, head_dim]
  layers, embed, heads, head_dim = query.shape
  assert query.addressable_shards[0].data.shape == (layers, embed // fsdp, heads // tensor,
                                                    head_dim)


def test_gradient_accumulation_matches_full_batch(single_device_reference):
  ref_losses, ref_params, _ = single_device_reference
  config = tiny_config("mesh.fsdp=1", "train.grad_accum_steps=4")
  losses, params, _ = _two_steps(config, jax.devices()[:1])
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               params, ref_params)


def test_bf16_matmul_operands_on_a_mesh_match_one_device():
  """The bfloat16-operand matmuls' custom gradients under data, fsdp and tensor sharding.

  Rounding operands to bfloat16 turns float32 summation-order differences between meshes
  into occasional one-ulp bf16 differences, so the check is on the whole update, not on
  each parameter: a wrong transpose or reduction would change it entirely.
  """
  bf16 = "model.matmul_precision=bfloat16"
  ref_losses, ref_params, _ = _two_steps(tiny_config("mesh.fsdp=1", bf16), jax.devices()[:1])
  losses, params, _ = _two_steps(
      tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", bf16), jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  config = tiny_config("mesh.fsdp=1")
  init = jax.device_get(build(config, jax.devices()[:1]).init_state().params)
  flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
          for p in (init, ref_params, params)]
  ref_update, update = flat[1] - flat[0], flat[2] - flat[0]
  assert np.linalg.norm(ref_update) > 0
  assert np.linalg.norm(update - ref_update) < 1e-2 * np.linalg.norm(ref_update)
