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
  """The first `num_batches` batches of the validation split in fixed order.

  A split too small for `num_batches` batches is cycled so every evaluation covers the same
  number of tokens.
  """
  ds = packed_dataset(documents, tokenizer, context_length, batch_size, seed=None, repeat=True,
                      process_index=process_index, process_count=process_count)
  iterator = iter(ds)
  return [next(iterator) for _ in range(num_batches)]
