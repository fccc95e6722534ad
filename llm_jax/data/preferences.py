"""Preference pairs: `preferences:<glob>` sources, their encoding, and their batches.

A pair is a prompt and two responses to it, one preferred by a person (`chosen`) and one not
(`rejected`): what a reward model learns to score and what DPO learns from. `.jsonl` files
hold one pair a line in the form TRL's users have,

    {"prompt": "What is 17+25?", "chosen": "42", "rejected": "32"}
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", ...}], ...}

where a prompt is one user turn or a conversation ending with a user turn (`conversations.
check` rules), and a response is one assistant turn or assistant message(s) continuing it.
A line that cannot be used (not JSON, a field missing, a malformed prompt or response, an
empty response, the same response twice) is skipped and counted by reason; the split and
deduplication are those of text files (`llm_jax.data.files`).

Each side is rendered by the chat template as the conversation prompt + response, with
weights on the response's tokens and the tokens that close it, into its own row of
`max_tokens`: a chosen response is never packed with its rejected twin, and causal attention
never lets a real token see the padding after it, so neither side can attend to the other.
"""

import grain
import numpy as np

from llm_jax.data import conversations, files
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents, Source
from llm_jax.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")
FORMS_HINT = ('give one {"prompt": ..., "chosen": ..., "rejected": ...} object a line, the '
              'prompt a string or a list of {"role": ..., "content": ...} messages ending with '
              'a user turn, each response a string or a list of assistant messages')


class BadPair(files.SkipDocument):
  """A preference pair that cannot be used; `reason` is how it is counted."""


def _response(value, prompt: list[dict]) -> list[dict]:
  try:
    messages = conversations.as_messages(value, "assistant")
  except conversations.BadConversation:
    raise BadPair("malformed response") from None
  if any(not isinstance(m["content"], str) or m["role"] not in conversations.ROLES
         for m in messages):
    raise BadPair("malformed response")
  if not messages or any(not m["content"].strip() for m in messages):
    raise BadPair("empty response")
  try:
    conversations.check(prompt + messages)  # the response starts by answering the prompt
  except conversations.BadConversation:
    raise BadPair("malformed response") from None
  if messages[-1]["role"] != "assistant":  # the reward is read at the end of an answer
    raise BadPair("malformed response")
  return messages


def from_record(record) -> dict:
  """The pair of one JSON line as {"prompt", "chosen", "rejected"} lists of messages."""
  if not isinstance(record, dict) or any(field not in record for field in FIELDS):
    raise BadPair("missing field")
  try:
    prompt = conversations.prompt_of(record["prompt"])
  except conversations.BadConversation:
    raise BadPair("malformed prompt") from None
  pair = {"prompt": prompt, **{side: _response(record[side], prompt) for side in SIDES}}
  if pair["chosen"] == pair["rejected"]:  # nothing to prefer; the loss would be constant
    raise BadPair("identical responses")
  return pair


def contents(pair: dict) -> str:
  """The words of a pair as plain text (to train a tokenizer on)."""
  return conversations.contents(pair["prompt"] + pair["chosen"] + pair["rejected"])


def open_preferences(spec: str, val_fraction: float) -> Source:
  """The `preferences:<glob>` source: pairs of `.jsonl` files, split and deduplicated."""
  return files.open_files(spec.removeprefix("preferences:"), val_fraction,
                          read_record=from_record, kind="preferences", hint=FORMS_HINT)


def open_all_preferences(pattern: str) -> Source:
  """Every usable pair of the `.jsonl` files matching `pattern`, unsplit, in `.train` (to
  evaluate on); `.skipped` counts the lines that were not."""
  return files.open_files(pattern, 0.0, read_record=from_record, kind="preferences",
                          hint=FORMS_HINT, split=False)


def _side(chat_format: ChatFormat, prompt: list[dict], response: list[dict],
          max_tokens: int) -> dict[str, np.ndarray] | None:
  turns = chat_format.turns(prompt + response)
  ids = [i for t in turns for i in (*t.context, *t.target)]
  if len(ids) > max_tokens:
    return None
  # The prompt's own assistant turns (a multi-turn prompt) are context, not targets: only
  # the response is scored, as the chat template's mask alone would not ensure.
  mask = [int(index >= len(prompt)) * m for index, t in enumerate(turns)
          for m in (*[0] * len(t.context), *[1] * len(t.target))]
  inputs, mask_row = np.zeros(max_tokens, np.int32), np.zeros(max_tokens, np.float32)
  inputs[:len(ids)], mask_row[:len(ids)] = ids, mask
  targets = np.zeros(max_tokens, np.int32)
  targets[:-1] = inputs[1:]
  weights = np.zeros(max_tokens, np.float32)
  weights[:-1] = mask_row[1:]
  return {"inputs": inputs, "targets": targets, "weights": weights}


def encode_pair(chat_format: ChatFormat, pair: dict, max_tokens: int
                ) -> dict[str, np.ndarray] | None:
  """Both sides of `pair` as rows of `max_tokens`, or None if either side is longer.

  Per side (keys prefixed `chosen_` / `rejected_`): `inputs` (the ids of prompt + response,
  padded with 0), `targets` (the ids shifted left by one, padded) and `weights` (1 at t when
  target t, the id at t + 1, is a response token or one that closes it; 0 elsewhere and on
  padding). A reward is read at the last response token: index = (last t with weight 1) + 1
  (`objectives.pairs.last_response_position`), the token closing the response (our template's
  end-of-turn) as an input, always < max_tokens, since a side fits whole.
  """
  sides = {side: _side(chat_format, pair["prompt"], pair[side], max_tokens) for side in SIDES}
  if any(encoded is None for encoded in sides.values()):
    return None
  return {f"{side}_{key}": array for side, encoded in sides.items()
          for key, array in encoded.items()}


def pair_statistics(pairs: Documents, chat_format: ChatFormat, max_tokens: int
                    ) -> tuple[dict[str, int], np.ndarray]:
  """One pass over `pairs`: the counts of those used and too long, and the indices of the
  used ones."""
  counts, used = dict(used=0, too_long=0), []
  for index in range(len(pairs)):
    encoded = encode_pair(chat_format, pairs[index], max_tokens)
    if encoded is None:
      counts["too_long"] += 1
      continue
    counts["used"] += 1
    used.append(index)
  return counts, np.asarray(used, np.int64)


def _example(pairs: Documents, chat_format: ChatFormat, max_tokens: int, extra, index: int
             ) -> dict[str, np.ndarray] | None:
  """The arrays of pair `index` as a batch row, or None if it is too long."""
  encoded = encode_pair(chat_format, pairs[index], max_tokens)
  if encoded is None:
    return None
  example = {**encoded, "pair_index": np.int32(index), "valid": np.float32(1)}
  return {**example, **(extra(index) if extra else {})}


def _fitting_example(pairs: Documents, chat_format: ChatFormat, max_tokens: int, extra,
                     index: int) -> dict[str, np.ndarray]:
  example = _example(pairs, chat_format, max_tokens, extra, index)
  if example is None:
    raise ValueError(f"Pair {index} is longer than max_tokens={max_tokens}; batch only the "
                     "pairs pair_statistics finds used (a Subset of them).")
  return example


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([np.asarray(e[key]) for e in examples]) for key in examples[0]}


def _check_processes(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise UserError(f"train.batch_size={batch_size} does not divide among {process_count} "
                    "processes; use a batch size that is a multiple of the process count.")
  return batch_size // process_count


def pair_batches(pairs: Documents, chat_format: ChatFormat, max_tokens: int, batch_size: int,
                 *, seed: int, process_index: int = 0, process_count: int = 1,
                 extra=None) -> grain.IterDataset:
  """Endless batches of this process's `batch_size // process_count` rows of pairs.

  Every pair of `pairs` (each must fit: pass a `Subset` of the used ones) comes once an
  epoch, shuffled anew each epoch by `seed`. A batch holds the arrays of `encode_pair`,
  `pair_index` (int32, the index into `pairs`), `valid` (float32 ones) and, when `extra`
  is given, the scalars `extra(index)` returns for each pair (such as DPO's reference
  log-probabilities). The global batch is the same for any process count that divides
  `batch_size`: the stream of indices is batched globally, then process p encodes rows
  [p * local, (p + 1) * local) of each. The iterator's state is a JSON-able position.
  """
  local = _check_processes(batch_size, process_count)
  if not len(pairs):
    raise UserError(f"No preference pair fits in {max_tokens} tokens, so there is nothing to "
                    "train on; raise model.context_length or give shorter pairs.")

  def rows(indices: np.ndarray) -> dict[str, np.ndarray]:
    mine = indices[process_index * local:(process_index + 1) * local]
    return _stack([_fitting_example(pairs, chat_format, max_tokens, extra, int(i))
                   for i in mine])

  indices = grain.MapDataset.range(len(pairs)).shuffle(seed=seed).repeat().batch(batch_size)
  # No read-ahead threads: encoding is fast and overlaps the device through async dispatch.
  return indices.map(rows).to_iter_dataset(grain.ReadOptions(num_threads=0))


def evaluation_pair_batches(pairs: Documents, chat_format: ChatFormat, max_tokens: int,
                            batch_size: int, num_pairs: int, process_index: int = 0,
                            process_count: int = 1, extra=None) -> list[dict[str, np.ndarray]]:
  """This process's rows of a fixed evaluation set: the first `min(num_pairs, len(pairs))`
  pairs in order, those too long left out, as whole batches of `batch_size` rows.

  The arrays are those of `pair_batches`; the last batch is padded with empty pairs (weights
  0, `valid` 0, `pair_index` -1, `extra` arrays 0), so objectives leave them out. The set
  depends on neither the seed nor the process count.
  """
  local = _check_processes(batch_size, process_count)
  examples = [_example(pairs, chat_format, max_tokens, extra, index)
              for index in range(min(num_pairs, len(pairs)))]
  examples = [example for example in examples if example is not None]
  if not examples:
    return []
  empty = {key: np.zeros_like(value) for key, value in examples[0].items()}
  empty["pair_index"] = np.int32(-1)
  examples += [empty] * (-len(examples) % batch_size)
  return [_stack(examples[start + process_index * local:][:local])
          for start in range(0, len(examples), batch_size)]
