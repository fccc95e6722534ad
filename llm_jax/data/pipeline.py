"""The Grain pipeline: shuffle documents, tokenize, pack, mix, batch, split into model inputs.

Packing. Each document becomes `[bos] + tokens + [eos]`. Documents are concatenated and cut
into rows of `context_length + 1` tokens (Grain's concat-then-split): a document longer than
the room left continues in the next row, so no token is dropped. Grain writes per-row
`segment_ids` (1, 2, ... for the pieces in a row) and `positions` (restarting at each piece).
A row gives `context_length` input/target pairs; a target in another segment than its input
gets weight 0, so the loss never asks one document to predict the next.

Conversations (`chat:` sources) are never split: each is encoded by the chat template with
its target mask (`llm_jax.data.chat_template`), and whole conversations are packed into rows
by best fit (`grain.experimental.BestFitPackIterDataset`) with their own segment ids and
positions, so none attends to another and only assistant tokens are targets. One longer
than a row is dropped, or with `data.chat_truncate` cut after its last assistant turn that
fits. Rows of every source carry a `target_mask` (all ones for text), so they mix.

Streams. The global batch of B rows is filled by S independent streams (S is the largest
divisor of B no larger than the smallest source's training split), each B/S consecutive
rows. Stream s reads documents s, s+S, s+2S, ... of every source, shuffles them with its own
seed each epoch, packs them, and mixes the sources' rows by weight, so a mixture weight is a
share of training tokens. Process p of P owns streams [p*S/P, (p+1)*S/P): hosts read
disjoint documents, and the global batch is the same for any process count that divides S.

The loop asks for batch N+1 while the device still computes step N (JAX dispatches
asynchronously), so the host's work overlaps the device's without a prefetch thread. The
iterator's state (a JSON-able dict) is saved in checkpoints, so a resumed run continues at
the next batch.
"""

import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence

import grain
import grain.experimental
import numpy as np

from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError


def tokenize_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """`[bos] text [eos]` as int32 ids: how every document is seen in training and evaluation."""
  return np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)


def _tokenize(tokenizer: Tokenizer):
  def fn(text: str) -> dict[str, np.ndarray]:
    return {"tokens": tokenize_document(tokenizer, text)}
  return fn


def _with_target_mask(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {**row, "target_mask": np.ones_like(row["tokens"])}


def document_rows(ids: np.ndarray, row_length: int) -> list[np.ndarray]:
  """One document's ids cut into rows of at most `row_length` for scoring.

  Consecutive rows overlap by one token, so every next-token pair is scored exactly once;
  each row starts without the context of the rows before it.
  """
  return [ids[i:i + row_length] for i in range(0, len(ids) - 1, row_length - 1)]


def to_model_inputs(row_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Turns packed rows of length T+1 into inputs/targets/weights of length T."""
  tokens = row_batch["tokens"]
  segments = row_batch["tokens_segment_ids"]
  inputs_segments = segments[:, :-1]
  weights = (segments[:, 1:] == inputs_segments) & (inputs_segments != 0)
  if "target_mask" in row_batch:
    weights &= row_batch["target_mask"][:, 1:] != 0
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "segment_ids": inputs_segments,
      "positions": row_batch["tokens_positions"][:, :-1],
      "weights": weights.astype(np.float32),
  }


def packed_rows(documents: Documents | grain.MapDataset, tokenizer: Tokenizer,
                context_length: int, *,
                seed: int | None, repeat: bool) -> grain.IterDataset:
  """Rows of `context_length + 1` packed tokens; `seed=None` keeps document order.

  With `repeat`, epochs cycle forever, each shuffled anew; without, the last row may be short.
  """
  ds = documents if isinstance(documents, grain.MapDataset) else grain.MapDataset.source(documents)
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  # Read-ahead threads per stream would only contend for the GIL: tokenizing is fast
  # (see `llm-jax data bench`) and already overlaps the device through async dispatch.
  ds = ds.map(_tokenize(tokenizer)).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": context_length + 1}).map(_with_target_mask)


# Rows filled at once by best-fit packing: more bins waste less of a row (measured on the SFT
# demonstration's conversations in experiments/sft/README.md), but a group of bins must not
# hold more than half an epoch of a stream's conversations, or one repeats within it.
MAX_PACKING_BINS = 256


def _packing_bins(num_conversations: int) -> int:
  return max(1, min(MAX_PACKING_BINS, num_conversations // 2))


def _encode_chat(chat_format: ChatFormat, row_length: int, truncate: bool):
  def fn(messages: list[dict]) -> dict[str, np.ndarray] | None:
    encoded = chat_format.encode(messages, row_length, truncate)
    return None if encoded is None else {"tokens": encoded[0], "target_mask": encoded[1]}
  return fn


def packed_chat_rows(conversations: Documents | grain.MapDataset, chat_format: ChatFormat,
                     context_length: int, *, seed: int | None, repeat: bool,
                     truncate: bool) -> grain.IterDataset:
  """Rows of `context_length + 1` tokens of whole conversations packed by best fit;
  `seed=None` keeps their order. A conversation that does not fit a row is left out; with
  `repeat`, at least one must fit (`chat_statistics` finds those that do), or no row ever
  comes."""
  ds = (conversations if isinstance(conversations, grain.MapDataset)
        else grain.MapDataset.source(conversations))
  bins = _packing_bins(len(ds))
  if seed is not None:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  row_length = context_length + 1
  ds = ds.map(_encode_chat(chat_format, row_length, truncate)).filter(lambda x: x is not None)
  lengths = {"tokens": row_length, "target_mask": row_length}
  return grain.experimental.BestFitPackIterDataset(
      ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), length_struct=lengths,
      num_packing_bins=bins, seed=seed or 0, shuffle_bins=seed is not None).map(_as_text_row)


def _as_text_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed chat row with the arrays of a packed text row, so that the two mix."""
  return {key: row[key] for key in ("tokens", "tokens_segment_ids", "tokens_positions",
                                    "target_mask")}


def chat_statistics(conversations: Documents, chat_format: ChatFormat, context_length: int,
                    truncate: bool) -> tuple[dict[str, int], np.ndarray]:
  """One pass over `conversations`: the counts of those used whole, truncated or dropped for
  their length, their tokens and target tokens, and the rows they pack into in their order
  (as one stream; training's streams each pack a share, in fewer bins when it is small); and
  the indices of those used."""
  row_length = context_length + 1
  counts = dict(used=0, truncated=0, dropped=0, tokens=0, target_tokens=0)
  lengths, used = [], []
  for index in range(len(conversations)):
    encoded = chat_format.encode(conversations[index])
    if len(encoded[0]) > row_length:
      encoded = chat_format.encode(conversations[index], row_length, truncate)
      counts["dropped" if encoded is None else "truncated"] += 1
      if encoded is None:
        continue
    counts["used"] += 1
    counts["tokens"] += len(encoded[0])
    counts["target_tokens"] += int(encoded[1].sum())
    lengths.append(len(encoded[0]))
    used.append(index)
  # Best fit on the lengths alone packs exactly as on the tokens, without keeping them.
  sized = grain.MapDataset.source(lengths).map(lambda n: {"tokens": np.zeros(n, np.int32)})
  counts["rows"] = sum(1 for _ in grain.experimental.BestFitPackIterDataset(
      sized.to_iter_dataset(), length_struct={"tokens": row_length},
      num_packing_bins=_packing_bins(len(lengths)), shuffle_bins=False))
  return counts, np.asarray(used, np.int64)


def num_streams(batch_size: int, train_sizes: Sequence[int]) -> int:
  """The largest divisor of `batch_size` that no source has fewer training documents than."""
  fewest = min(train_sizes)
  return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fewest)


def _stream_seed(seed: int, stream: int, source: int) -> int:
  return int(np.random.SeedSequence([seed, stream, source]).generate_state(1)[0])


Packer = Callable[..., grain.IterDataset]  # (documents, *, seed, repeat) -> packed rows


def chat_packer(chat_format: ChatFormat, context_length: int, truncate: bool) -> Packer:
  return functools.partial(packed_chat_rows, chat_format=chat_format,
                           context_length=context_length, truncate=truncate)


def _packers(packers, mixture, tokenizer: Tokenizer, context_length: int) -> list[Packer]:
  text = functools.partial(packed_rows, tokenizer=tokenizer, context_length=context_length)
  return [pack or text for pack in (packers or [None] * len(mixture))]


def training_dataset(mixture: Sequence[tuple[Documents, float]], tokenizer: Tokenizer,
                     context_length: int, batch_size: int, *, seed: int,
                     process_index: int = 0, process_count: int = 1,
                     packers: Sequence[Packer | None] | None = None) -> grain.IterDataset:
  """Endless batches of this process's `batch_size // process_count` rows as model inputs.

  `mixture` pairs each source's training documents with its share of tokens; `packers`
  gives a source's packer where its documents are not text (`chat_packer`).
  """
  streams = num_streams(batch_size, [len(docs) for docs, _ in mixture])
  if streams % process_count:
    fewest = min(len(docs) for docs, _ in mixture)
    raise UserError(f"{process_count} processes cannot read disjoint documents: the smallest "
                    f"source has {fewest} training documents, enough for {streams} streams; "
                    f"add documents or use a train.batch_size with more divisors.")
  rows_per_stream = batch_size // streams
  local = streams // process_count
  weights = [weight for _, weight in mixture]
  packers = _packers(packers, mixture, tokenizer, context_length)
  stream_datasets = {}
  for stream in range(process_index * local, (process_index + 1) * local):
    parts = [pack(grain.MapDataset.source(docs)[stream::streams],
                  seed=_stream_seed(seed, stream, j), repeat=True)
             for j, ((docs, _), pack) in enumerate(zip(mixture, packers))]
    rows = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, weights)
    stream_datasets[stream] = rows.batch(rows_per_stream)
  layout = {"streams": streams, "rows_per_stream": rows_per_stream, "seed": seed,
            "context_length": context_length, "weights": weights,
            "documents": [len(docs) for docs, _ in mixture]}
  return StreamBatches(stream_datasets, layout)


def _evaluation_rows(documents: Documents, tokenizer: Tokenizer, row_length: int,
                     num_rows: int) -> list[np.ndarray]:
  """`num_rows` rows taken round-robin over documents: first rows of all, then second rows...

  So a small budget covers many documents instead of the first few long ones. Only the
  documents needed are read: with more documents than rows, the first `num_rows`; with
  fewer, each contributes at most `ceil(num_rows / len(documents))` rows before cycling.
  """
  cap = math.ceil(num_rows / len(documents))
  per_document = [document_rows(tokenize_document(tokenizer, documents[index]), row_length)[:cap]
                  for index in range(min(len(documents), num_rows))]
  order = [rows[i] for i in range(cap) for rows in per_document if i < len(rows)]
  return [text_row(order[i % len(order)]) for i in range(num_rows)]


def evaluation_batches(mixture: Sequence[tuple[Documents, float]], tokenizer: Tokenizer,
                       context_length: int, batch_size: int, num_tokens: int,
                       process_index: int = 0, process_count: int = 1,
                       packers: Sequence[Packer | None] | None = None
                       ) -> list[dict[str, np.ndarray]]:
  """This process's share of a fixed evaluation set of about `num_tokens` input positions.

  The set has `ceil(num_tokens / context_length)` rows, split between sources by weight and
  padded with empty (weight 0) rows to whole batches. A text source's rows are pieces of its
  documents; a source with a packer (conversations) gives its first packed rows, fewer if it
  has fewer. The set depends on neither the seed, the batch size nor the process count.
  """
  num_rows = math.ceil(num_tokens / context_length)
  row_length = context_length + 1
  rows = []
  for j, ((docs, weight), pack) in enumerate(zip(mixture, packers or [None] * len(mixture))):
    share = (num_rows - len(rows) if j == len(mixture) - 1
             else round(num_rows * weight))
    if share > 0 and pack is None:
      rows += _evaluation_rows(docs, tokenizer, row_length, share)
    elif share > 0:
      rows += list(itertools.islice(pack(docs, seed=None, repeat=False), share))
  return scoring_batches(rows, row_length, batch_size, process_index, process_count)


def text_row(ids: np.ndarray) -> dict[str, np.ndarray]:
  """One piece of a document as a packed row of a single segment, every token a target."""
  return {"tokens": ids, "tokens_segment_ids": np.ones_like(ids),
          "tokens_positions": np.arange(len(ids), dtype=np.int32),
          "target_mask": np.ones_like(ids)}


def scoring_batches(rows: Sequence[dict[str, np.ndarray]], row_length: int, batch_size: int,
                    process_index: int = 0, process_count: int = 1
                    ) -> list[dict[str, np.ndarray]]:
  """This process's share of packed `rows` (`text_row`s, or a packer's) as model-input batches.

  Rows are right-padded to `row_length`, and the last batch is padded with empty rows; a
  padded position has segment 0 and weight 0, so it never counts in a loss.
  """
  local = batch_size // process_count
  batches = []
  for b in range(math.ceil(len(rows) / batch_size)):
    mine = rows[b * batch_size + process_index * local:][:local]
    stacked = {}
    for key in ("tokens", "tokens_segment_ids", "tokens_positions", "target_mask"):
      stacked[key] = np.zeros((local, row_length), np.int32)
      for i, row in enumerate(mine):
        stacked[key][i, :len(row[key])] = row[key]
    batches.append(to_model_inputs(stacked))
  return batches


def _tuples_for_slices(state):
  """Grain's concat-then-split packer (0.2.x) marks unsliced features with the tuple
  (-1, -1) and compares with `!=`; JSON, as checkpoints store states, turns it into a list,
  and a restored packer would silently empty the document it was in the middle of."""
  if isinstance(state, dict):
    return {key: (_slices_as_tuples(value) if key == "remainder_slices"
                  else _tuples_for_slices(value)) for key, value in state.items()}
  if isinstance(state, list):
    return [_tuples_for_slices(value) for value in state]
  return state


def _slices_as_tuples(slices: dict) -> dict:
  return {feature: tuple(bounds) for feature, bounds in slices.items()}


class StreamBatches(grain.IterDataset):
  """This process's batches: the next block of rows of each of its streams, stream-major.

  The iterator state is `{"layout": ..., "streams": {global stream index: state}}`, so the
  states saved by any number of processes can be merged and each process of a later run
  (with another process count) takes its own streams' states. A state from another layout
  (batch size, seed, context length, sources) cannot continue the same order and is refused
  instead of silently changing it.
  """

  def __init__(self, streams: dict[int, grain.IterDataset], layout: dict):
    super().__init__(list(streams.values()))
    self._streams = streams
    self._layout = json.loads(json.dumps(layout))  # as it reads back from a checkpoint

  def __iter__(self) -> grain.DatasetIterator:
    return _StreamBatchesIterator({s: ds.__iter__() for s, ds in self._streams.items()},
                                  self._layout)


class _StreamBatchesIterator(grain.DatasetIterator):
  def __init__(self, streams: dict[int, grain.DatasetIterator], layout: dict):
    super().__init__(list(streams.values()))
    self._streams, self._layout = streams, layout

  def __next__(self) -> dict[str, np.ndarray]:
    blocks = [next(iterator) for iterator in self._streams.values()]
    return to_model_inputs({key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]})

  def get_state(self) -> dict:
    return {"layout": self._layout,
            "streams": {str(s): it.get_state() for s, it in self._streams.items()}}

  @staticmethod
  def merge_states(states: list[dict]) -> dict:
    """One state from the states every process of a run saved: each holds its own streams,
    so a run with another process count still finds each of its streams' state."""
    merged = {"layout": states[0].get("layout"), "streams": {}}
    for state in states:
      merged["streams"].update(state.get("streams", {}))
    return merged

  def set_state(self, state: dict) -> None:
    saved = state.get("layout")
    if saved != self._layout:
      changed = sorted(k for k in self._layout if (saved or {}).get(k) != self._layout[k])
      raise UserError(f"The saved data position belongs to another data layout (changed: "
                      f"{', '.join(changed)}), so the batch order cannot resume; restore "
                      "train.batch_size, train.seed, model.context_length and the data "
                      "settings of the run, or start a new --workdir.")
    missing = [s for s in self._streams if str(s) not in state["streams"]]
    if missing:
      raise UserError(f"The saved data position has no state for stream {missing[0]}; the "
                      "checkpoint lacks some processes' data files, so restore them or start "
                      "a new --workdir.")
    for stream, iterator in self._streams.items():
      iterator.set_state(_tuples_for_slices(state["streams"][str(stream)]))
