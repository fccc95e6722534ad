"""Batch sources: what the training loop reads, whatever the objective.

A `BatchSource` holds an iterator over this process's rows of each global training batch
(dicts of numpy arrays) whose position is saved in every checkpoint (`get_state` /
`set_state`), this process's rows of a fixed set of evaluation batches, and the tokenizer
the run saves with its checkpoints. The loop never looks inside a batch.
"""

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from llm_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.distributed import log


@dataclasses.dataclass
class BatchSource:
  train: Iterator[dict[str, np.ndarray]]  # with get_state() and set_state(state)
  evaluation: list[dict[str, np.ndarray]]
  tokenizer: Tokenizer


def text_batches(config, workdir, inherited_tokenizer: bytes | None = None) -> BatchSource:
  """Packed documents of the configured text sources (`llm_jax.data.pipeline`).

  The tokenizer is the run's (`tokenizer.for_run`; `inherited_tokenizer` is that of the run
  `train.init_from` starts from).
  """
  m, t = config.model, config.train
  mixture = sources.open_sources(config.data)
  for source, weight in mixture:
    log(source.summary() + (f"; {weight:.0%} of training tokens" if len(mixture) > 1 else ""))
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizer_lib.for_run(config, mixture, workdir, inherited_tokenizer)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = iter(pipeline.training_dataset(
      [(source.train, weight) for source, weight in mixture], tokenizer, m.context_length,
      t.batch_size, seed=t.seed, **process))
  evaluation = pipeline.evaluation_batches(
      [(source.validation, weight) for source, weight in mixture], tokenizer, m.context_length,
      t.batch_size, t.eval_tokens, **process)
  scored = int(sum(float(b["weights"].sum()) for b in evaluation))
  log(f"Evaluation: {len(evaluation)} batches, {scored} scored validation tokens")
  return BatchSource(train, evaluation, tokenizer)
