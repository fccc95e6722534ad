"""GRPO: advantages, the clipped objective and the k3 KL on hand-made values, the plain policy
gradient of one pass, a toy reward learned by a tiny model, rollouts that compile once, resume
and a sharded run equal to uninterrupted and one-device runs, judges, and bad input."""

import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.parallel import checkpoint, sharding
from llm_jax import cli, config as config_lib
from llm_jax.inference import generate as generate_lib
from llm_jax.parallel.distributed import log
from llm_jax.errors import UserError
from llm_jax.objectives import grpo
from llm_jax.objectives.log_probs import token_log_probs
from llm_jax.posttrain import judges
from llm_jax.posttrain import rollouts as rollouts_lib
from llm_jax.train.recipes import configured
from llm_jax.posttrain.rollouts import grpo_batches
from llm_jax.inference.run import load_run
from llm_jax.train import builder
from llm_jax.train.loop import train

from conftest import TINY_OVERRIDES, model_of, snapshot, tiny_config

_TRAIN = [o for o in TINY_OVERRIDES if o.startswith("train.")]
_REWARDS = '''
import math

def has_x(prompt, completion, **fields):
  return float("x" in completion)

def echo_answer(prompt, completion, *, answer, **fields):
  return float(completion.strip() == answer)

def raises(prompt, completion, **fields):
  raise ValueError("no score for " + completion[:3])

def not_finite(prompt, completion, **fields):
  return math.nan
'''


def test_advantages_of_known_groups():
  rewards_ = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  advantages = grpo.group_advantages(rewards_, 4)
  # Group 1: mean 0.5, sample standard deviation sqrt(1/3); group 2: no spread, no advantage.
  expected = 0.5 / (np.sqrt(1 / 3) + grpo.ADVANTAGE_EPSILON)
  np.testing.assert_allclose(advantages[:4], [expected, -expected, -expected, expected],
                             rtol=1e-6)
  assert np.all(advantages[4:] == 0)


def test_the_clipped_objective_on_hand_made_log_probabilities():
  old = jnp.zeros((2, 3))
  log_probs = jnp.log(jnp.array([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))  # ratios 1, 1.5, 0.5
  advantages = jnp.array([2.0, -1.0])

  def total(log_probs):
    losses, kl, clipped = grpo.token_losses(log_probs, old, None, advantages, epsilon=0.2,
                                            beta=0.0)
    return jnp.sum(losses), (kl, clipped)
  (value, (kl, clipped)), grad = jax.value_and_grad(total, has_aux=True)(log_probs)
  # Row A = 2: min(ρA, clip(ρ)A) = 2, 2.4 (clipped at 1.2), 1 (ρA below the clipped 1.6).
  # Row A = -1: -1, -1.5 (ρA below the clipped -1.2), -0.8 (clipped at 0.8).
  assert float(value) == pytest.approx(-(2 + 2.4 + 1.0) - (-1 - 1.5 - 0.8), rel=1e-6)
  assert kl is None
  np.testing.assert_array_equal(clipped, [[False, True, False], [False, False, True]])
  # d(-ρA)/d log π = -ρA where the unclipped term is taken, 0 where the clipped one is.
  np.testing.assert_allclose(grad, [[-2.0, 0.0, -1.0], [1.0, 1.5, 0.0]], rtol=1e-6)


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
  log_probs = jnp.log(jnp.array([[0.1, 0.5, 0.9]]))
  zero = jnp.zeros((1,))
  _, kl_same, _ = grpo.token_losses(log_probs, log_probs, log_probs, zero, epsilon=0.2,
                                    beta=0.04)
  assert np.all(np.asarray(kl_same) == 0)
  reference = jnp.log(jnp.array([[0.2, 0.4, 0.6]]))
  losses, kl, _ = grpo.token_losses(log_probs, log_probs, reference, zero, epsilon=0.2,
                                    beta=0.04)
  r = np.asarray(reference - log_probs)
  np.testing.assert_allclose(kl, np.exp(r) - r - 1, rtol=1e-6)
  assert np.all(np.asarray(kl) > 0)
  np.testing.assert_allclose(losses, 0.04 * np.asarray(kl), rtol=1e-6)  # A = 0: KL alone


def _random_rows(config, seed):
  rng = np.random.default_rng(seed)
  b, t, v = config.train.batch_size, config.model.context_length, config.model.vocab_size
  weights = np.zeros((b, t), np.float32)
  for row in range(b):
    weights[row, 10:10 + rng.integers(3, 12)] = 1
  return {"inputs": rng.integers(0, v, (b, t)).astype(np.int32),
          "targets": rng.integers(0, v, (b, t)).astype(np.int32), "weights": weights,
          "advantages": rng.normal(size=b).astype(np.float32)}


@pytest.fixture(scope="module")
def policy():
  config = tiny_config()
  model = model_of(config)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
  return config, model, nn.unbox(init(jax.random.key(0)))


def test_one_pass_has_ratio_one_and_the_plain_policy_gradient(policy):
  config, model, params = policy
  batch = _random_rows(config, 0)
  objective = grpo.grpo_objective(epsilon=0.2, beta=0.0, passes=1)

  def ours(params):
    loss_sum, metrics = objective.loss(model, params, batch)
    return loss_sum / objective.weight(batch), metrics

  def policy_gradient(params):
    log_probs = token_log_probs(model, params, batch["inputs"], batch["targets"])
    return -jnp.sum(batch["advantages"][:, None] * log_probs * batch["weights"]) / \
        jnp.sum(batch["weights"])
  (value, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(params)
  expected_grads = jax.jit(jax.grad(policy_gradient))(params)
  # ρ = 1 exactly: the loss is -Σ A w / Σ w and nothing is clipped.
  expected_value = -np.sum(batch["advantages"][:, None] * batch["weights"]) / batch["weights"].sum()
  assert float(value) == pytest.approx(expected_value, rel=1e-6)
  assert float(metrics["clip_fraction"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               grads, expected_grads)


def test_several_passes_take_the_rollout_policy_from_before_the_first_update(policy):
  config, model, params = policy
  batch = _random_rows(config, 1)
  prepared = jax.jit(grpo.grpo_objective(passes=2, beta=0.0).prepare, static_argnums=0)(
      model, params, batch, None)
  np.testing.assert_allclose(prepared["old_log_probs"],
                             jax.jit(token_log_probs, static_argnums=0)(
                                 model, params, batch["inputs"], batch["targets"]),
                             rtol=1e-6)
  assert "ref_log_probs" not in prepared
  prepare = grpo.grpo_objective(passes=1, beta=0.04).prepare
  with_reference = jax.eval_shape(lambda p, b, f: prepare(model, p, b, f), params, batch, params)
  assert "old_log_probs" not in with_reference and "ref_log_probs" in with_reference


@pytest.fixture(scope="module")
def base(pretrained_run):
  return pretrained_run


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """Prompts of many lengths (one far too long) with answers, and reward functions."""
  root = tmp_path_factory.mktemp("task")
  words = ["ab", "cde", "fghij", "kl", "mnopq", "rs", "tuvw", "xyz", "alpha", "beta", "gamma",
           "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
  lines = [{"prompt": f"say {w} " * (1 + i % 4), "answer": w} for i, w in enumerate(words)]
  lines.append({"prompt": "a very long prompt " * 40, "answer": "none"})
  (root / "problems.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  (root / "task_rewards.py").write_text(_REWARDS)
  return root


def _grpo(base, task, *extra):
  return config_lib.load_config("configs/posttrain.py:grpo", [
      *_TRAIN, f"train.init_from={base}", f"data.source=prompts:{task}/problems.jsonl",
      f"rl.reward={task}/task_rewards.py:has_x", "train.batch_size=16", "rl.group_size=4",
      "rl.max_completion_tokens=8", "train.learning_rate=3e-3", "train.log_every=1",
      "data.val_fraction=0.2", "train.sample_tokens=0", "rl.eval_prompts=8",
      "model.matmul_precision=float32", *extra])


def _tokenizer(run) -> bytes:
  return checkpoint.open_init_source(run, log).tokenizer


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy_run(base, task, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("grpo")
  summary = train(_grpo(base, task, "train.steps=40", "train.eval_every=40"), workdir)
  return workdir, summary


def test_a_toy_reward_is_learned_in_a_few_dozen_steps(toy_run):
  workdir, summary = toy_run
  rows = _rows(workdir)
  rewards_ = [r["reward_mean"] for r in rows]
  assert np.mean(rewards_[-5:]) > np.mean(rewards_[:5]) + 0.4, rewards_
  assert summary["val_reward"] > 0.5
  last = rows[-1]
  for name in ("reward_std", "zero_spread_groups", "kl", "clip_fraction", "completion_length",
               "rollout_tokens_per_sec", "generation_seconds", "reward_seconds",
               "update_seconds", "truncated"):
    assert np.isfinite(last[name]), name
  assert last["kl"] > 0 and last["clip_fraction"] == 0  # one pass: nothing is clipped
  assert all(r["completion_tokens"] <= 16 * 8 for r in rows)
  with pytest.raises(UserError, match="val_reward"):  # `llm-jax eval` of an RL run
    load_run(workdir).evaluate()


def test_rollouts_compile_once_and_prompts_that_do_not_fit_are_counted(base, task, tmp_path,
                                                                        capfd):
  config = _grpo(base, task)
  batches = grpo_batches(config, tmp_path, _tokenizer(base))
  assert "1 skipped as longer than the 56 tokens" in capfd.readouterr().err
  mesh = sharding.make_mesh(config.mesh)
  model = model_of(config)
  params = checkpoint.open_init_source(base, log).checkpointer.restore_params(
      6, sharding.abstract_params(model, mesh))
  sizes = []
  with sharding.activate(mesh):
    for step in range(4):  # different prompts, of different lengths, every step
      rows, _ = batches.next(params, step)
      sizes.append(generate_lib._generate._cache_size())
  assert sizes[1:] == [sizes[0]] * 3
  assert rows["inputs"].shape == (16, 64) and rows["advantages"].shape == (16,)
  # Each row's targets are its completion: from the token after the prompt's assistant header
  # to the end of turn, or 8 tokens when it has none.
  header_end = batches.chat_format.prompt_tail([{"role": "user", "content": "x"}])[-1]
  stop = batches.chat_format.stop_id
  for inputs, targets, weights in zip(rows["inputs"], rows["targets"], rows["weights"]):
    weighted = np.flatnonzero(weights)
    first, last = weighted[0], weighted[-1]
    assert np.array_equal(weighted, np.arange(first, last + 1)) and inputs[first] == header_end
    completion = targets[first:last + 1].tolist()
    assert completion[-1] == stop or len(completion) == 8
    assert stop not in completion[:-1] and np.all(inputs[last + 2:] == 0)


def test_resume_draws_what_an_uninterrupted_run_draws(base, task, tmp_path, monkeypatch):
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  config = _grpo(base, task, "train.steps=4", "train.checkpoint_every=0")
  train(config, whole)
  real_rollout = rollouts_lib.Rollouts.rollout

  def interrupted(self, params, step):  # SIGTERM arrives during step 2's rollout
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_rollout(self, params, step)
  monkeypatch.setattr(rollouts_lib.Rollouts, "rollout", interrupted)
  train(config, parts)
  assert checkpoint.saved_steps(parts / "checkpoints") == [2]
  monkeypatch.undo()
  train(config, parts)
  a, b = ({r["step"]: r for r in _rows(w)} for w in (whole, parts))
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert [a[s]["reward_mean"] for s in a] == [b[s]["reward_mean"] for s in a]
  assert a[4]["loss"] == pytest.approx(b[4]["loss"], rel=1e-5)
  params = [load_run(w).params for w in (whole, parts)]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), *params)
  # Another number of updates per step would stretch the schedule under the saved count.
  before = snapshot(parts)
  with pytest.raises(UserError, match="rl.passes=1"):
    train(_grpo(base, task, "train.steps=6", "rl.passes=2"), parts)
  assert snapshot(parts) == before


def _two_steps(config, base, devices, workdir):
  """Two GRPO steps on a mesh over `devices`: (metrics of each, final parameters)."""
  resolved = config_lib.resolve(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  objective, batch_source = configured(config)
  built = builder.build(resolved, mesh, objective)
  _, _, reference = checkpoint.load(base, mesh, log, model=built.model)
  state = built.init_state()
  state = state.replace(params=checkpoint.open_init_source(base, log).params(
      state.params, config, log))
  batches = batch_source(config, workdir, _tokenizer(base))
  history = []
  with sharding.activate(mesh):
    for step in range(2):
      rows, host = batches.next(state.params, step)
      state, metrics = built.train_step(state, built.global_batch(rows), reference)
      history.append({**jax.device_get(metrics), **host})
  return history, jax.device_get(state.params)


def test_a_sharded_run_equals_one_device(base, task, tmp_path):
  one, one_params = _two_steps(_grpo(base, task, "mesh.fsdp=1", "rl.passes=2"), base,
                               jax.devices()[:1], tmp_path / "one")
  # Sharded and in two microbatches: the reference's and the rollout policy's log-probabilities
  # are prepared a microbatch at a time, and must land on their own rows.
  many, many_params = _two_steps(_grpo(base, task, "mesh.fsdp=4", "mesh.tensor=2",
                                       "rl.passes=2", "train.grad_accum_steps=2"), base,
                                 jax.devices(), tmp_path / "many")
  for a, b in zip(one, many):
    assert a["reward_mean"] == b["reward_mean"] and a["completion_length"] == \
        b["completion_length"]
    for name in ("loss", "kl", "clip_fraction", "grad_norm"):
      assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-4, abs=1e-6), name
  # Four Adam updates (two steps of two passes) amplify float32 summation-order differences
  # where a gradient is tiny, hence an absolute tolerance of a few updates' rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               many_params, one_params)


def _judge(task, reward, errors="stop"):
  rl = config_lib.load_config(None, [f"rl.reward={reward}", f"rl.reward_errors={errors}"]).rl
  return judges.judge(rl, tiny_config().mesh)


def _record(prompt, **fields):
  return {"prompt": [{"role": "user", "content": prompt}], "fields": fields, "given": prompt}


def test_judges_weigh_functions_and_count_or_stop_on_failures(task, monkeypatch):
  records = [_record("say ab", answer="ab"), _record("say cd", answer="cd")]
  judge = _judge(task, f"{task}/task_rewards.py:has_x=2; {task}/task_rewards.py:echo_answer")
  total, metrics = judge(records, ["ab x", "cd"])
  np.testing.assert_array_equal(total, [2.0, 1.0])
  assert metrics == {"reward_has_x": 0.5, "reward_echo_answer": 0.5}
  monkeypatch.syspath_prepend(str(task))  # a module on the path, named as module:function
  for failing in ("task_rewards:raises", "task_rewards:not_finite"):
    with pytest.raises(UserError, match=f"{failing.split(':')[1]}.*'say cd'.*reward_errors"):
      _judge(task, failing)(records[1:], ["x"])
    total, metrics = _judge(task, f"{failing}; task_rewards:has_x", "zero")(records, ["x", "y"])
    np.testing.assert_array_equal(total, [1.0, 0.0])
    assert metrics["reward_errors"] == 2


@pytest.mark.parametrize("reward, message", [
    ("no_such_module_here:f", "importing no_such_module_here failed"),
    ("{task}/task_rewards.py:missing", "has no function 'missing'"),
    ("{task}/nothing.py:f", "is not a file"),
    ("{task}", "is a directory but not a run"),
    ("{base}", "is a language model, not a reward model"),
    ("just words", "neither a function nor a run directory"),
])
def test_bad_judges_are_one_sentence(base, task, reward, message):
  with pytest.raises(UserError, match=message):
    _judge(task, reward.format(task=task, base=base))


def test_a_reward_model_judges_as_it_scores(base, task, tmp_path):
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": f"good {w}",
                                       "rejected": f"bad {w}"}) + "\n" for w in "abcdefghij"))
  rm = tmp_path / "rm"
  train(config_lib.load_config("configs/posttrain.py:reward", [
      *_TRAIN, f"train.init_from={base}", f"data.source=preferences:{pairs}", "train.steps=3",
      "data.val_fraction=0.3"]), rm)
  records = [_record("say a"), _record("say b")]
  total, _ = _judge(task, f"{rm}=0.5")(records, ["good a", "bad b"])
  run = load_run(rm)
  expected = [0.5 * run.reward("say a", "good a"), 0.5 * run.reward("say b", "bad b")]
  np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-6)
  one_checkpoint, _ = _judge(task, f"{rm}/checkpoints/3")(records, ["good a", "bad b"])
  np.testing.assert_allclose(one_checkpoint, 2 * total, rtol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "at least 2"),
    ("rl.reward=", "needs rl.reward"),
    ("rl.reward=nowhere_module:f", "importing nowhere_module failed"),
    ("rl.max_completion_tokens=64", "leave room for a prompt"),
    ("train.batch_size=18", "not a multiple of rl.group_size"),
    ("rl.reward={task}/task_rewards.py:raises", "raised ValueError"),  # at the first rollout
])
def test_bad_rl_input_exits_2_and_leaves_the_run_as_it_was(base, task, tmp_path, capsys,
                                                            override, message):
  workdir = tmp_path / "run"
  config = _grpo(base, task)
  argv = ["train", "--config", "configs/posttrain.py:grpo", "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in (
              ("train.init_from", base), ("data.source", config.data.source),
              ("rl.reward", config.rl.reward), ("train.batch_size", 16),
              ("rl.group_size", 4), ("rl.max_completion_tokens", 8),
              ("model.context_length", 64))],
          f"--config.{override.format(task=task)}"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err
  assert not workdir.exists()  # no tokenizer, config, checkpoints/ or metrics left behind
