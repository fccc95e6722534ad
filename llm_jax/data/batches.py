"""Batch sources: what the training loop reads, whatever the objective.

A `BatchSource` holds an iterator over this process's rows of each global training batch
(dicts of numpy arrays) whose position is saved in every checkpoint (`get_state` /
`set_state`), this process's rows of a fixed set of evaluation batches, the tokenizer the run
saves with its checkpoints, and the chat format when the data holds conversations. The loop
never looks inside a batch.
"""

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np

from llm_jax.data import chat_template, pipeline, preferences, sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents, Source, Subset
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.parallel.distributed import log
from llm_jax.errors import UserError


@dataclasses.dataclass
class BatchSource:
  train: Iterator[dict[str, np.ndarray]]  # with get_state() and set_state(state)
  evaluation: list[dict[str, np.ndarray]]
  tokenizer: Tokenizer
  chat_format: ChatFormat | None = None  # how the data's conversations are encoded, if any
  # RL: batches the model being trained generates. rollout(params, step) returns this
  # process's rows of step `step` and host metrics; `train` then iterates over its prompts.
  rollout: Callable | None = None
  # An evaluation of its own, evaluate(params) -> {"val_<metric>": value}, instead of
  # `evaluation` batches (RL: rewards of answers to validation prompts).
  evaluate: Callable | None = None


def text_batches(config, workdir, inherited_tokenizer: bytes | None = None) -> BatchSource:
  """Packed documents and conversations of the configured sources (`llm_jax.data.pipeline`):
  next-token targets on every token of a text, on the assistant's turns of a conversation.

  The tokenizer is the run's (`tokenizer.for_run`; `inherited_tokenizer` is that of the run
  `train.init_from` starts from).
  """
  m, t = config.model, config.train
  mixture = sources.open_sources(config.data)
  for source, weight in mixture:
    log(source.summary() + (f"; {weight:.0%} of training tokens" if len(mixture) > 1 else ""))
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizer_lib.for_run(config, mixture, workdir, inherited_tokenizer)
  chat_format, train_mixture, packers = training_mixture(config, mixture, tokenizer)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = iter(pipeline.training_dataset(train_mixture, tokenizer, m.context_length,
                                         t.batch_size, seed=t.seed, packers=packers, **process))
  evaluation = pipeline.evaluation_batches(
      [(source.validation, weight) for source, weight in mixture], tokenizer, m.context_length,
      t.batch_size, t.eval_tokens, packers=packers, **process)
  scored = int(sum(float(b["weights"].sum()) for b in evaluation))
  if not scored:
    raise UserError("Nothing in the validation split fits the context with a target to score "
                    "(conversations need an answer that fits); raise model.context_length or "
                    "data.val_fraction.")
  log(f"Evaluation: {len(evaluation)} batches, {scored} scored validation tokens")
  return BatchSource(train, evaluation, tokenizer, chat_format)


def training_mixture(config, mixture: list[tuple[Source, float]], tokenizer: Tokenizer
                     ) -> tuple[ChatFormat | None, list[tuple[Documents, float]],
                                list[pipeline.Packer | None]]:
  """The chat format (None without conversations), each source's training documents with
  its weight, and its packer (None: text). A conversation source keeps those conversations
  the context has room for, found by one pass that logs what the context leaves of it."""
  if any(source.kind == "preferences" for source, _ in mixture):
    raise UserError("Preference pairs train a reward model or DPO, not next-token prediction; "
                    "use --config configs/posttrain.py:reward or :dpo, or a text or chat source.")
  if any(source.kind == "prompts" for source, _ in mixture):
    raise UserError("Prompts are for RL, not next-token prediction; use --config "
                    "configs/posttrain.py:grpo, or a text or chat source.")
  train_mixture = [(source.train, weight) for source, weight in mixture]
  if not any(source.kind == "chat" for source, _ in mixture):
    return None, train_mixture, [None] * len(mixture)
  chat_format = chat_template.chat_format(tokenizer)
  context, truncate = config.model.context_length, config.data.chat_truncate
  packers = []
  for j, (source, weight) in enumerate(mixture):
    if source.kind != "chat":
      packers.append(None)
      continue
    counts, used = pipeline.chat_statistics(source.train, chat_format, context, truncate)
    _log_chat_statistics(source, counts, context, truncate)
    train_mixture[j] = (Subset(source.train, used), weight)
    packers.append(pipeline.chat_packer(chat_format, context, truncate))
  return chat_format, train_mixture, packers


def _log_chat_statistics(source: Source, counts: dict, context: int, truncate: bool) -> None:
  if not counts["target_tokens"]:
    raise UserError(
        f"No training conversation of {source.spec} fits model.context_length={context} "
        f"with an assistant turn ({counts['dropped']} too long), so there is nothing to train "
        "on; raise model.context_length" + ("" if truncate else " or set "
                                            "--config.data.chat_truncate=true") + ".")
  if truncate:
    long = (f"{counts['truncated']} truncated after their last assistant turn that fits, "
            f"{counts['dropped']} dropped (not even their first answer fits)")
  else:
    long = f"{counts['dropped']} dropped as longer than the context" + (
        " (data.chat_truncate=true cuts them at a turn boundary instead)"
        if counts["dropped"] else "")
  filled = counts["tokens"] / (counts["rows"] * (context + 1))
  log(f"{source.spec}: {counts['used']} training conversations used, {long}; "
      f"{counts['tokens']} tokens of which {counts['target_tokens']} are assistant targets; "
      f"an epoch packs into {counts['rows']} rows, {filled:.1%} of their tokens non-padding")


@dataclasses.dataclass
class PreferencePairs:
  """A run's preference pairs, those that fit the context, and how they are encoded."""
  tokenizer: Tokenizer
  chat_format: ChatFormat
  train: Documents
  validation: Documents


def preference_pairs(config, workdir, inherited_tokenizer: bytes | None = None
                     ) -> PreferencePairs:
  """The pairs of `data.source` (a `preferences:` source) that fit `model.context_length`,
  after one pass over each split that logs how many do not."""
  if config.data.mixture or not config.data.source.startswith("preferences:"):
    raise UserError(f"objective.name={config.objective.name!r} trains on preference pairs; set "
                    "--config.data.source='preferences:<glob>' (and no data.mixture).")
  source = sources.open_source(config.data.source, config.data)
  log(source.summary())
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizer_lib.for_run(config, [(source, 1.0)], workdir, inherited_tokenizer)
  chat_format = chat_template.chat_format(tokenizer)
  context = config.model.context_length
  fitting = {}
  for split in ("train", "validation"):
    pairs = getattr(source, split)
    counts, used = preferences.pair_statistics(pairs, chat_format, context)
    log(f"{source.spec}, {split}: {counts['used']} pairs used, {counts['too_long']} dropped as "
        f"longer than the context of {context} tokens")
    fitting[split] = Subset(pairs, used)
  if not len(fitting["train"]):
    raise UserError(f"No training pair of {source.spec} fits the context of {context} tokens, "
                    "so there is nothing to train on; raise model.context_length or give "
                    "shorter pairs.")
  return PreferencePairs(tokenizer, chat_format, fitting["train"], fitting["validation"])


def pair_batch_source(config, pairs: PreferencePairs, extra_train=None, extra_validation=None
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
