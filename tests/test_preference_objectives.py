"""Reward models and DPO: the losses' values and gradients, a response kept apart from its
twin, the stored reference log-probabilities, training on a separable toy set, a sharded step
equal to one device's, and the bad input of each."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from llm_jax import cli, config as config_lib
from llm_jax.parallel import sharding
from llm_jax.data import chat_template, preferences, tokenizer as tokenizer_lib
from llm_jax.errors import UserError
from llm_jax.objectives.dpo import dpo_objective
from llm_jax.objectives.pairs import sequence_log_probs
from llm_jax.posttrain.dpo_reference import CACHE
from llm_jax.objectives.reward_model import reward_objective
from llm_jax.inference.run import load_run
from llm_jax.train import builder
from llm_jax.train.loop import train

from conftest import TINY_OVERRIDES, model_of, tiny_config

_TRAIN = [o for o in TINY_OVERRIDES if o.startswith("train.")] + [
    "train.warmup_steps=2", "train.eval_every=10", "train.checkpoint_every=10",
    "model.matmul_precision=float32"]


def _pair_batch(config, seed: int, ref=None) -> dict[str, np.ndarray]:
  """Random pairs: each side's response is a run of targets in the row's second half."""
  rng = np.random.default_rng(seed)
  b, t, v = config.train.batch_size, config.model.context_length, config.model.vocab_size
  batch = {"valid": np.ones(b, np.float32)}
  for side in ("chosen", "rejected"):
    weights = np.zeros((b, t), np.float32)
    for row in range(b):
      weights[row, t // 2:t - 1 - rng.integers(0, 4)] = 1
    batch |= {f"{side}_inputs": rng.integers(0, v, (b, t)).astype(np.int32),
              f"{side}_targets": rng.integers(0, v, (b, t)).astype(np.int32),
              f"{side}_weights": weights}
  if ref is not None:
    batch["ref_chosen_log_prob"], batch["ref_rejected_log_prob"] = ref
  return batch


@pytest.fixture(scope="module")
def policy():
  config = tiny_config()
  model = model_of(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return config, model, params


def _mean_loss(objective, model, params, batch):
  loss_sum, metrics = objective.loss(model, params, batch)
  return loss_sum / objective.weight(batch), metrics


def test_dpo_loss_is_log_2_while_the_policy_is_its_reference(policy):
  config, model, params = policy
  batch = _pair_batch(config, 0)
  batch = _pair_batch(config, 0, sequence_log_probs(model, params, batch))
  loss, metrics = _mean_loss(dpo_objective(0.1), model, params, batch)
  assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
  assert float(metrics["margin"]) == pytest.approx(0, abs=1e-5)


def test_dpo_loss_rewards_the_chosen_side_moving_up_against_the_rejected(policy):
  config, model, params = policy
  batch = _pair_batch(config, 3)
  chosen, rejected = (np.asarray(x) for x in sequence_log_probs(model, params, batch))
  # The policy is 1 nat above its reference on chosen and 1 below on rejected: margin 2β.
  batch = _pair_batch(config, 3, (chosen - 1.0, rejected + 1.0))
  loss, metrics = _mean_loss(dpo_objective(0.1), model, params, batch)
  assert float(loss) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-5)
  assert float(metrics["margin"]) / config.train.batch_size == pytest.approx(0.2, abs=1e-5)
  assert float(metrics["accuracy"]) == config.train.batch_size


def test_dpo_gradient_matches_a_finite_difference(policy):
  config, model, params = policy
  batch = _pair_batch(config, 1)
  batch = _pair_batch(config, 1, sequence_log_probs(model, params, batch))
  # A policy away from its reference, so that the loss is not at its symmetric point.
  moved = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape),
                       params, _keys_like(params, 1))
  direction = jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), params,
                           _keys_like(params, 2))
  objective = dpo_objective(0.5)

  @jax.jit
  def loss_along(eps):
    return _mean_loss(objective, model, jax.tree.map(lambda p, d: p + eps * d, moved,
                                                     direction), batch)[0]
  grad = jax.jit(jax.grad(lambda p: _mean_loss(objective, model, p, batch)[0]))(moved)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad),
                                                      jax.tree.leaves(direction)))
  h = 1e-3
  numeric = (float(loss_along(h)) - float(loss_along(-h))) / (2 * h)
  assert float(loss_along(0.0)) != pytest.approx(math.log(2), abs=1e-3)
  assert numeric == pytest.approx(analytic, rel=2e-2)


def _keys_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.key(seed), len(leaves))))


def test_a_response_never_sees_its_twin(policy):
  """Changing every rejected row leaves each chosen side's log-probability and reward as it
  was: the two sides of a pair are separate rows."""
  config, model, params = policy
  reward_model = model_of(tiny_config("model.reward_head=true", "objective.name=reward"))
  reward_params = nn.unbox(reward_model.init(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
  reward_params["reward_head"] = jnp.ones_like(reward_params["reward_head"])
  batch = _pair_batch(config, 2)
  other = dict(batch, rejected_inputs=np.roll(batch["rejected_inputs"], 3, axis=1))
  (chosen, rejected), (chosen_other, rejected_other) = (
      sequence_log_probs(model, params, b) for b in (batch, other))
  np.testing.assert_array_equal(chosen, chosen_other)
  assert not np.allclose(rejected, rejected_other)
  rewards, rewards_other = (_mean_loss(reward_objective(), reward_model, reward_params, b)[1]
                            for b in (batch, other))
  assert float(rewards["reward_chosen"]) == float(rewards_other["reward_chosen"])
  assert float(rewards["reward_rejected"]) != float(rewards_other["reward_rejected"])


# Each objective on one mesh (the pair step is the same code for both; meshes of every
# shape have their own tests in test_sharding.py).
@pytest.mark.parametrize("name, data, fsdp, tensor", [("dpo", 2, 2, 2), ("reward", 1, 8, 1)])
def test_a_sharded_pair_step_equals_one_device(name, data, fsdp, tensor):
  head = [f"objective.name={name}", f"model.reward_head={name == 'reward'}"]
  objective = dpo_objective(0.1) if name == "dpo" else reward_objective(0.01)

  def two_steps(config, devices):
    built = builder.build(config_lib.resolve(config), sharding.make_mesh(config.mesh, devices),
                          objective)
    state, losses = built.init_state(), []
    with sharding.activate(built.mesh):
      for seed in (0, 1):
        ref = (np.full(config.train.batch_size, -80.0, np.float32),
               np.full(config.train.batch_size, -80.0, np.float32))
        batch = _pair_batch(config, seed, ref if name == "dpo" else None)
        state, metrics = built.train_step(state, built.global_batch(batch), None)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)
  one, one_params = two_steps(tiny_config("mesh.fsdp=1", *head), jax.devices()[:1])
  many, many_params = two_steps(tiny_config(f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                            f"mesh.tensor={tensor}", *head), jax.devices())
  np.testing.assert_allclose(many, one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               many_params, one_params)


def _write_pairs(path, words, good="good", bad="bad"):
  """Separable pairs: the chosen answer starts with `good`, the rejected with `bad`."""
  path.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": f"{good} {w}.",
                                      "rejected": f"{bad} {w}."}) + "\n" for w in words))


@pytest.fixture(scope="module")
def base(pretrained_run):
  return pretrained_run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghij"), 4)) for _ in range(80)]
  path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
  _write_pairs(path, words)
  return path


def _posttrain(variant, base, pairs, *extra):
  return config_lib.load_config(f"configs/posttrain.py:{variant}", [
      *_TRAIN, f"train.init_from={base}", f"data.source=preferences:{pairs}", *extra])


@pytest.fixture(scope="module")
def reward_run(base, pairs, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rm")
  summary = train(_posttrain("reward", base, pairs, "train.steps=30", "train.log_every=2",
                             "train.learning_rate=3e-3", "data.val_fraction=0.2"), workdir)
  return workdir, summary


def test_a_reward_model_learns_a_separable_preference(reward_run):
  workdir, summary = reward_run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[0] > 0.5 and losses[-1] < 0.1  # from about log 2: the head starts at zero
  assert summary["val_accuracy"] >= 0.9 and summary["val_margin"] > 1
  assert all(r["pairs"] == 8 for r in rows)


def test_reward_scores_and_the_reward_command(reward_run, capsys):
  workdir, _ = reward_run
  run = load_run(workdir)
  good, bad = run.reward("say abcd", "good abcd."), run.reward("say abcd", "bad abcd.")
  assert good > bad
  assert cli.main(["reward", "--workdir", str(workdir), "--prompt", "say abcd", "--response",
                   "good abcd.", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["reward"] == pytest.approx(good, rel=1e-5)
  with pytest.raises(UserError, match="is a reward model"):
    run.generate("say")
  out = workdir.parent / "exported"
  assert cli.main(["hf", "export", "--workdir", str(workdir), "--out", str(out)]) == 2
  assert "is a reward model" in capsys.readouterr().err and not out.exists()


def test_dpo_stores_the_reference_and_recomputes_it_for_other_data(base, pairs, tmp_path,
                                                                   capfd, monkeypatch):
  # One batch of pairs encoded at a time: the pass crosses chunk boundaries.
  monkeypatch.setattr("llm_jax.posttrain.dpo_reference._BATCHES_ENCODED", 1)
  workdir = tmp_path / "dpo"
  config = _posttrain("dpo", base, pairs, "train.steps=4", "train.learning_rate=1e-3",
                      "train.log_every=1")
  train(config, workdir)
  stored = np.load(workdir / CACHE)
  # The first step's policy is its reference, so the stored values give exactly log 2.
  first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
  assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
  assert first["margin"] == pytest.approx(0, abs=1e-4)
  # A direct computation: the base model scores each training pair on its own.
  run = load_run(base)
  chat = chat_template.chat_format(tokenizer_lib.saved_tokenizer(base))
  source = preferences.open_preferences(f"preferences:{pairs}", config.data.val_fraction)
  forward = jax.jit(run.model.apply)
  for index in (0, 7, 8, len(source.train) - 1):
    pair = preferences.encode_pair(chat, source.train[index], 64)
    expected = []
    for side in ("chosen", "rejected"):
      logits = np.asarray(forward({"params": run.params},
                                  pair[f"{side}_inputs"][None]))[0].astype(np.float64)
      log_probs = scipy.special.log_softmax(logits, axis=-1)
      picked = log_probs[np.arange(64), pair[f"{side}_targets"]]
      expected.append(float((picked * pair[f"{side}_weights"]).sum()))
    np.testing.assert_allclose(stored["train"][index], expected, rtol=2e-4)
  assert "computed with" in capfd.readouterr().err
  # Resuming reuses them; other pairs make them stale, and they are computed again.
  train(_posttrain("dpo", base, pairs, "train.steps=6", "train.learning_rate=1e-3"), workdir)
  assert "reused" in capfd.readouterr().err
  other = tmp_path / "other.jsonl"
  _write_pairs(other, ["wxyz", "abab", "cdcd", "efef", "ghgh"], good="yes", bad="no")
  train(_posttrain("dpo", base, other, "train.steps=8", "train.learning_rate=1e-3"), workdir)
  assert "computing it again" in capfd.readouterr().err
  assert not np.array_equal(np.load(workdir / CACHE)["train"][0], stored["train"][0])


def test_bad_preference_input_is_one_sentence(base, pairs, tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = ["train", "--config", "configs/posttrain.py:dpo", *[f"--config.{o}" for o in _TRAIN],
          f"--config.data.source=preferences:{pairs}", "--workdir", str(workdir)]
  assert cli.main(argv) == 2 and "needs train.init_from" in capsys.readouterr().err
  assert cli.main(["reward", "--workdir", str(base), "--prompt", "a", "--response", "b"]) == 2
  assert "is not a reward model" in capsys.readouterr().err
  assert cli.main(argv + [f"--config.train.init_from={base}",
                          "--config.data.source=chat:nothing/*.jsonl"]) == 2
  assert "trains on preference pairs" in capsys.readouterr().err
  assert not workdir.exists()  # a refusal writes nothing, not even a tokenizer
