"""Input-pipeline throughput: how fast the configured sources become training batches."""

import time

from llm_jax.data import batches as batches_lib, pipeline, sources, tokenizer as tokenizer_lib
from llm_jax.errors import UserError


def measure(config, batches: int = 200) -> dict:
  """Indexes the sources, gets a tokenizer and times `batches` training batches.

  The tokenizer is `data.tokenizer` if set, else one trained as `llm-jax train` would; its
  training time is reported apart from the pipeline's.
  """
  if batches < 1:
    raise UserError(f"--batches={batches} must be at least 1.")
  d, m, t = config.data, config.model, config.train
  start = time.perf_counter()
  mixture = sources.open_sources(d)
  index_sec = time.perf_counter() - start
  start = time.perf_counter()
  tokenizer = tokenizer_lib.for_run(config, mixture)
  tokenizer_sec = time.perf_counter() - start
  _, train_mixture, packers = batches_lib.training_mixture(config, mixture, tokenizer)

  iterator = iter(pipeline.training_dataset(train_mixture, tokenizer, m.context_length,
                                            t.batch_size, seed=t.seed, packers=packers))
  start = time.perf_counter()
  next(iterator)
  first_batch_sec = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  elapsed = time.perf_counter() - start
  tokens = batches * t.batch_size * m.context_length
  return {
      "sources": [source.summary() for source, _ in mixture],
      "index_sec": index_sec,
      "tokenizer_sec": tokenizer_sec,
      "first_batch_sec": first_batch_sec,
      "batches": batches,
      "batch_tokens": t.batch_size * m.context_length,
      "tokens_per_sec": tokens / elapsed,
  }
