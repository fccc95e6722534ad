"""GRPO's batch source: each step's prompts, the policy's completions of them, their rewards
and advantages, as training rows.

A step takes `train.batch_size / rl.group_size` prompts of `data.source` (a `prompts:` source)
and samples `rl.group_size` completions of each with the policy as it is at that step, in one
jitted call of fixed shapes (`generate.complete`: every prompt padded to the context less
`rl.max_completion_tokens`, each prompt prefilled once for its group), so the program compiles
once. Completions end at the chat format's end of turn or at the token limit. The sampling key
of step s is `fold_in(key(train.seed), s)` and the prompts' position is saved with every
checkpoint, so a resumed run draws what an uninterrupted one would.

A row holds prompt + completion: `weights` mark the completion's tokens as targets (its end of
turn included), `advantages` are the group's (`grpo.group_advantages`). Every process generates
and judges the whole global batch (prompts are small; the reward functions see every
completion) and hands the loop its own rows.

Metrics of each step (host side): `reward_mean`, `reward_std`, `zero_spread_groups` (the share
of groups whose rewards are all equal: they give no policy gradient), `completion_length`,
`truncated` (the share that reached the token limit), `rollout_tokens_per_sec`, and the split
of the step's time: `generation_seconds`, `reward_seconds` and `update_seconds` (from the end
of the rollout before to the moment its train step is done: the update, and on some steps the
loop's evaluation or checkpoint). Evaluation answers up to `rl.eval_prompts`
validation prompts greedily: `val_reward`, `val_completion_length`.
"""

import pathlib
import time

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax.inference import generate
from llm_jax.parallel import checkpoint, sharding
from llm_jax.data import prompts as prompts_lib
from llm_jax.data.batches import BatchSource
from llm_jax.errors import UserError
from llm_jax.posttrain import judges
from llm_jax.posttrain.records import open_records
from llm_jax.objectives.grpo import group_advantages


class Rollouts:
  """The policy's completions of the prompts of each step, judged (`rollout`), and greedy
  answers to validation prompts, judged (`evaluate`)."""

  def __init__(self, config, tokenizer, chat_format, train_prompts, validation_prompts, judge):
    r, t = config.rl, config.train
    self.config, self.tokenizer, self.chat_format = config, tokenizer, chat_format
    self.judge = judge
    self.model = checkpoint.model_of(config)
    self.prompt_width = config.model.context_length - r.max_completion_tokens
    self.prompts_per_step = t.batch_size // r.group_size
    self.train_prompts, self.validation_prompts = train_prompts, validation_prompts
    self.prompt_indices = iter(prompts_lib.prompt_batches(
        train_prompts, self.prompts_per_step, seed=t.seed))
    self._last_end = None

  def _complete(self, params, records, key, samples: int, temperature: float):
    """(prompt ids of each record, [R, max_completion_tokens] new ids) of `records`, padded to
    `prompts_per_step` prompts with copies of the first so every call has one shape."""
    prompt_ids = [prompts_lib.encode_prompt(self.chat_format, r) for r in records]
    padded = prompt_ids + [prompt_ids[0]] * (self.prompts_per_step - len(prompt_ids))
    new = generate.complete(params, self.model, padded, self.prompt_width, key,
                            self.config.rl.max_completion_tokens,
                            eos_id=self.chat_format.stop_id, samples=samples,
                            temperature=temperature, top_p=self.config.rl.top_p,
                            num_tokens=self.tokenizer.vocab_size)
    return prompt_ids, sharding.to_host(new)[:len(records) * samples]

  def _completions(self, new_RS) -> tuple[list[list[int]], list[str]]:
    """Each row's completion ids (its end of turn kept, when it has one) and text."""
    stop, ids, texts = self.chat_format.stop_id, [], []
    for row in new_RS.tolist():
      end = row.index(stop) + 1 if stop in row else len(row)
      ids.append(row[:end])
      texts.append(self.tokenizer.decode([i for i in row[:end] if i != stop]))
    return ids, texts

  def _rows(self, prompt_ids, completion_ids, advantages) -> dict[str, np.ndarray]:
    R, T = len(completion_ids), self.config.model.context_length
    group = self.config.rl.group_size
    batch = {"inputs": np.zeros((R, T), np.int32), "targets": np.zeros((R, T), np.int32),
             "weights": np.zeros((R, T), np.float32), "advantages": advantages}
    for i, completion in enumerate(completion_ids):
      prompt = prompt_ids[i // group]
      ids = prompt + completion
      batch["inputs"][i, :len(ids)] = ids
      batch["targets"][i, :len(ids) - 1] = ids[1:]
      batch["weights"][i, len(prompt) - 1:len(ids) - 1] = 1.0  # targets that are completion
    return batch

  def rollout(self, params, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(this process's rows of step `step`'s batch, the step's host metrics)."""
    started = time.perf_counter()
    jax.block_until_ready(params)
    ready = time.perf_counter()
    r = self.config.rl
    records = [self.train_prompts[int(i)] for i in next(self.prompt_indices)["prompt_index"]]
    key = jax.random.fold_in(jax.random.key(self.config.train.seed), step)
    prompt_ids, new_RS = self._complete(params, records, key, r.group_size, r.temperature)
    completion_ids, texts = self._completions(new_RS)
    generated = time.perf_counter()
    per_row = [record for record in records for _ in range(r.group_size)]
    rewards, metrics = self.judge(per_row, texts)
    judged = time.perf_counter()
    advantages = group_advantages(rewards, r.group_size)
    batch = self._rows(prompt_ids, completion_ids, advantages)
    lengths = np.asarray([len(c) for c in completion_ids])
    spreads = rewards.reshape(-1, r.group_size).std(axis=1)
    metrics |= {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        "zero_spread_groups": float(np.mean(spreads == 0)),
        "completion_length": float(lengths.mean()),
        "truncated": float(np.mean([self.chat_format.stop_id not in c
                                    for c in completion_ids])),
        "rollout_tokens_per_sec": float(lengths.sum() / (generated - ready)),
        "generation_seconds": generated - ready, "reward_seconds": judged - generated,
        "update_seconds": ready - (self._last_end or started)}
    self._last_end = time.perf_counter()
    local = len(rewards) // jax.process_count()
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return {name: array[mine] for name, array in batch.items()}, metrics

  def evaluate(self, params) -> dict[str, float]:
    """Greedy answers to the first `rl.eval_prompts` validation prompts, judged."""
    count = min(self.config.rl.eval_prompts, len(self.validation_prompts))
    rewards, lengths = [], []
    for start in range(0, count, self.prompts_per_step):
      records = [self.validation_prompts[i]
                 for i in range(start, min(start + self.prompts_per_step, count))]
      _, new_RS = self._complete(params, records, jax.random.key(0), 1, 0.0)
      completion_ids, texts = self._completions(new_RS)
      rewards.extend(self.judge(records, texts)[0])
      lengths.extend(len(c) for c in completion_ids)
    if not rewards:
      return {}
    return {"val_reward": float(np.mean(rewards)), "val_completion_length": float(np.mean(lengths))}


def grpo_batches(config, workdir, inherited_tokenizer: bytes | None = None) -> BatchSource:
  """GRPO's batch source over the prompts of `data.source` that leave room for a completion;
  the judge of `rl.reward` is loaded first, so a bad one stops the run before anything. A run
  is resumed only with the number of updates per step it was trained with."""
  _refuse_other_passes(config, workdir)
  judge = judges.judge(config.rl, config.mesh)
  room = config.model.context_length - config.rl.max_completion_tokens
  prompts = open_records(
      config, workdir, inherited_tokenizer, "prompts", room,
      prompts_lib.prompt_statistics, f"the {room} tokens the context leaves beside "
      f"rl.max_completion_tokens={config.rl.max_completion_tokens}",
      "raise model.context_length, lower rl.max_completion_tokens or give shorter prompts")
  rollouts = Rollouts(config, prompts.tokenizer, prompts.chat_format, prompts.train,
                      prompts.validation, judge)
  return BatchSource(rollouts.prompt_indices, [], prompts.tokenizer, prompts.chat_format,
                     draw=rollouts.rollout, evaluate=rollouts.evaluate)


def _refuse_other_passes(config, workdir: pathlib.Path) -> None:
  """The learning-rate schedule counts updates: another rl.passes would move it."""
  saved = workdir / "config.json"
  if not saved.exists():
    return
  passes = config_lib.from_json(saved.read_text()).get("rl", {}).get("passes", 1)
  if config.rl.passes != passes:
    raise UserError(f"{workdir} was trained with rl.passes={passes}, and its learning-rate "
                    f"schedule counts updates; resume with --config.rl.passes={passes} or pass "
                    "a new --workdir.")
