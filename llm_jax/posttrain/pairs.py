"""Preference pairs as batches, for a reward model and (with the reference's log-probabilities,
`llm_jax.posttrain.dpo_reference`) for DPO. Reading and encoding pairs is
`llm_jax.data.preferences`; the losses are `llm_jax.objectives.reward_model` and `dpo`."""

import jax

from llm_jax.data import preferences
from llm_jax.data.batches import BatchSource
from llm_jax.errors import UserError
from llm_jax.parallel.distributed import log
from llm_jax.posttrain.records import Records, open_records


def preference_pairs(config, workdir, inherited_tokenizer: bytes | None = None) -> Records:
  """The pairs of `data.source` (a `preferences:` source) that fit `model.context_length`."""
  context = config.model.context_length
  return open_records(config, workdir, inherited_tokenizer, "preferences", context,
                      preferences.pair_statistics, f"the context of {context} tokens",
                      "raise model.context_length or give shorter pairs")


def pair_batch_source(config, pairs: Records, extra_train=None, extra_validation=None
                      ) -> BatchSource:
  """Batches of `pairs` (`preferences.pair_batches`); `extra_*(index)` adds an objective's
  per-pair arrays (DPO's reference log-probabilities)."""
  t, context = config.train, config.model.context_length
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = iter(preferences.pair_batches(pairs.train, pairs.chat_format, context, t.batch_size,
                                        seed=t.seed, extra=extra_train, **process))
  num_pairs = max(1, t.eval_tokens // context)
  evaluation = preferences.evaluation_pair_batches(
      pairs.validation, pairs.chat_format, context, t.batch_size, num_pairs,
      extra=extra_validation, **process)
  if not evaluation:
    raise UserError(f"No validation pair fits the context of {context} tokens; raise "
                    "model.context_length or data.val_fraction.")
  log(f"Evaluation: {len(evaluation)} batches of validation pairs")
  return BatchSource(train, evaluation, pairs.tokenizer, pairs.chat_format)


def preference_batches(config, workdir, inherited_tokenizer: bytes | None = None
                       ) -> BatchSource:
  """Batches of the preference pairs of `data.source` (a reward model's)."""
  return pair_batch_source(config, preference_pairs(config, workdir, inherited_tokenizer))
