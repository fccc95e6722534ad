"""The Grain pipeline: shuffle documents, tokenize, pack, batch, split into model inputs.

Each document becomes `[bos] + tokens + [eos]`. Documents are concatenated and cut into rows
of `context_length + 1` tokens (Grain's concat-then-split packing): a document longer than
the room left continues in the next row, so no token is dropped. Grain writes per-row
`segment_ids` (1, 2, ... for the pieces in the row) and `positions` (restarting at each
piece). A row of `context_length + 1` tokens gives `context_length` input/target pairs;
targets that cross into another segment get weight 0, so the loss never asks a document to
predict the next one.

Each process reads the documents `process_index::process_count` and yields its share of
the global batch; `llm_jax.sharding.global_batch` assembles the global arrays.
"""

import grain
import grain.experimental
import numpy as np

from llm_jax.data.tokenizer import Tokenizer


def _tokenize(tokenizer: Tokenizer):
  def fn(text: str) -> dict[str, np.ndarray]:
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return {"tokens": np.asarray(ids, dtype=np.int32)}
  return fn


def to_model_inputs(row_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Turns packed rows of length T+1 into inputs/targets/weights of length T."""
  tokens = row_batch["tokens"]
  segments = row_batch["tokens_segment_ids"]
  inputs_segments = segments[:, :-1]
  weights = (segments[:, 1:] == inputs_segments) & (inputs_segments != 0)
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": inputs_segments,
      "positions": row_batch["tokens_positions"][:, :-1],
      "weights": weights.astype(np.float32),
  }


def packed_dataset(documents: list[str], tokenizer: Tokenizer, context_length: int,
                   batch_size: int, *, seed: int | None, repeat: bool,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Batches of this process's `batch_size // process_count` rows as model inputs.

  `seed=None` keeps document order (for evaluation); `repeat` cycles epochs forever, with a
  new shuffle each epoch.
  """
  local_batch = batch_size // process_count
  ds = grain.MapDataset.source(documents)[process_index::process_count]
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_tokenize(tokenizer))
  rows = grain.experimental.ConcatThenSplitIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": context_length + 1})
  return rows.batch(local_batch, drop_remainder=repeat, batch_fn=_stack_padded(context_length + 1)
                    ).map(to_model_inputs)


def _stack_padded(length: int):
  """Stacks rows, padding the stream's last short row with segment 0 (weight 0)."""
  def fn(rows):
    out = {}
    for key in rows[0]:
      stacked = np.zeros((len(rows), length), dtype=rows[0][key].dtype)
      for i, row in enumerate(rows):
        stacked[i, :len(row[key])] = row[key]
      out[key] = stacked
    return out
  return fn


def evaluation_batches(documents: list[str], tokenizer: Tokenizer, context_length: int,
                       batch_size: int, num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """This process's rows of a fixed set of `num_batches` validation batches.

  Each document is cut into rows of `context_length + 1` tokens of its own (the last row
  padded), and rows are taken round-robin over documents — first rows of every document,
  then second rows, ... — so a small evaluation budget still covers the whole split instead
  of its first few long files. The rows do not depend on the seed or the process count; a
  split too small for the budget is cycled.
  """
  row_length = context_length + 1
  per_document = []
  for text in documents:
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
    per_document.append([ids[i:i + row_length] for i in range(0, len(ids) - 1, row_length - 1)])
  # Consecutive rows of a document overlap by one token, so every next-token pair is scored.
  order = [rows[i] for i in range(max(map(len, per_document)))
           for rows in per_document if i < len(rows)]
  needed = batch_size * num_batches
  order = [order[i % len(order)] for i in range(needed)]
  local = batch_size // process_count
  stack = _stack_padded(row_length)
  batches = []
  for b in range(num_batches):
    rows = order[b * batch_size + process_index * local:b * batch_size + (process_index + 1) * local]
    packed = stack([{"tokens": r, "tokens_segment_ids": np.ones(len(r), np.int32),
                     "tokens_positions": np.arange(len(r), dtype=np.int32)} for r in rows])
    batches.append(to_model_inputs(packed))
  return batches
