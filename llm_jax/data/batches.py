"""Batch sources: what the training loop reads, whatever the objective.

A `BatchSource` answers one call, `next(params, step)`: this process's rows of step `step`'s
global batch (dicts of numpy arrays) and the step's host metrics. Text sources ignore the
parameters; RL's rollouts (`llm_jax.posttrain.rollouts`) sample from them. Its `train`
iterator's position (`get_state` / `set_state`) is saved in every checkpoint. It also holds a
fixed set of evaluation batches (or an evaluation of its own), the tokenizer the run saves
with its checkpoints, and the chat format when the data holds conversations. The loop never
looks inside a batch.
"""

import dataclasses
from collections.abc import Callable, Iterator

import jax
import numpy as np

from llm_jax.data import chat_template, pipeline, sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents, Source, Subset
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.parallel.distributed import log


@dataclasses.dataclass
class BatchSource:
  # The rows of each training batch in order (or what `draw` reads, RL's prompts), with
  # get_state() and set_state(state): the position every checkpoint keeps.
  train: Iterator
  evaluation: list[dict[str, np.ndarray]]
  tokenizer: Tokenizer
  chat_format: ChatFormat | None = None  # how the data's conversations are encoded, if any
  # draw(params, step) -> (rows, host metrics) for batches the model being trained makes
  # (RL's rollouts); None: the next rows of `train`.
  draw: Callable | None = None
  # An evaluation of its own, evaluate(params) -> {"val_<metric>": value}, instead of
  # `evaluation` batches (RL: rewards of answers to validation prompts).
  evaluate: Callable | None = None

  def next(self, params, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """This process's rows of step `step`'s batch, and the step's host metrics."""
    return self.draw(params, step) if self.draw else (next(self.train), {})


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
