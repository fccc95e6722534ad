"""Prompts: the files of `llm-jax generate --prompt_file`, and `prompts:<glob>` sources for RL.

`read_prompt_file` reads the prompts a run is asked to continue, one a line.

A `prompts:<glob>` source holds what GRPO learns to answer. `.jsonl` files hold one prompt a
line, with whatever else its reward function needs to judge an answer:

    {"prompt": "What is 17+25?", "answer": "42"}
    {"prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}], ...}

where a prompt is one user turn or a conversation ending with a user turn (`conversations.
prompt_of`). A record is {"prompt": its messages, "fields": every other key of the line,
"given": the prompt as written}. A line that cannot be used (not JSON, no prompt, a malformed
or empty prompt) is skipped and counted by reason; the split and deduplication are those of
text files (`llm_jax.data.files`), so the same prompt with different fields is kept twice.

A prompt is encoded as the ids a model continues to answer it (`ChatFormat.prompt`: the
conversation and the assistant's header), and is used when those fit `max_prompt_tokens`.
Every process reads the same batches of prompt indices: RL generates answers to the whole
global batch of prompts.
"""

import json
import pathlib
import sys

import grain
import numpy as np

from llm_jax.data import conversations, files
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents, Source
from llm_jax.errors import UserError


def read_prompt_file(path) -> list[str]:
  """The prompts in `path`: a JSON string or {"prompt": ...} per line of a .jsonl file, else
  one prompt per line; blank lines are skipped."""
  path = pathlib.Path(path)
  if not path.is_file():
    problem = "is a directory" if path.is_dir() else "does not exist"
    raise UserError(f"--prompt_file {path} {problem}; give a file with one prompt per line.")
  try:
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no prompt
  except UnicodeDecodeError:
    raise UserError(f"--prompt_file {path} is not UTF-8 text; give a text file with one prompt "
                    "per line.") from None
  lines = [line for line in text.splitlines() if line.strip()]
  if path.suffix != ".jsonl":
    prompts = lines
  else:
    prompts = []
    for number, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      prompt = record.get("prompt") if isinstance(record, dict) else record
      if not isinstance(prompt, str):
        raise UserError(f"Line {number} of {path} is neither a JSON string nor an object with "
                        'a "prompt" string; write one prompt per line.')
      prompts.append(prompt)
  if not prompts:
    raise UserError(f"--prompt_file {path} holds no prompts; write one prompt per line.")
  return prompts


FORMS_HINT = ('give one {"prompt": ..., ...} object a line, the prompt a string or a list of '
              '{"role": ..., "content": ...} messages ending with a user turn')


class BadPrompt(files.SkipDocument):
  """A prompt that cannot be used; `reason` is how it is counted."""


def from_record(record) -> dict:
  """The prompt of one JSON line as {"prompt": messages, "fields": the line's other keys,
  "given": the prompt as written}."""
  if not isinstance(record, dict) or "prompt" not in record:
    raise BadPrompt("missing prompt")
  given = record["prompt"]
  if isinstance(given, str) and not given.strip():
    raise BadPrompt("empty prompt")
  try:
    prompt = conversations.prompt_of(given)
  except conversations.BadConversation:
    raise BadPrompt("malformed prompt") from None
  fields = {key: value for key, value in record.items() if key != "prompt"}
  return {"prompt": prompt, "fields": fields, "given": given}


def contents(record: dict) -> str:
  """The words of a prompt as plain text (to train a tokenizer on)."""
  return conversations.contents(record["prompt"])


def open_prompts(spec: str, val_fraction: float) -> Source:
  """The `prompts:<glob>` source: prompts of `.jsonl` files, split and deduplicated."""
  return files.open_files(spec.removeprefix("prompts:"), val_fraction, read_record=from_record,
                          kind="prompts", hint=FORMS_HINT)


def encode_prompt(chat_format: ChatFormat, record: dict) -> list[int]:
  """The ids a model continues to answer `record`'s prompt (ending with the assistant's
  header)."""
  return chat_format.prompt(record["prompt"])


def prompt_statistics(prompts: Documents, chat_format: ChatFormat, max_prompt_tokens: int
                      ) -> tuple[dict[str, int], np.ndarray]:
  """One pass over `prompts`: the counts of those used (encoded in at most
  `max_prompt_tokens` ids) and too long, and the indices of the used ones."""
  counts, used = dict(used=0, too_long=0), []
  for index in range(len(prompts)):
    if len(encode_prompt(chat_format, prompts[index])) > max_prompt_tokens:
      counts["too_long"] += 1
      continue
    counts["used"] += 1
    used.append(index)
  return counts, np.asarray(used, np.int64)


def prompt_batches(prompts: Documents, prompts_per_step: int, *, seed: int
                   ) -> grain.IterDataset:
  """Endless batches of {"prompt_index": int32 [prompts_per_step]}, indices into `prompts`
  (pass a `Subset` of the used ones).

  Every index comes once an epoch, shuffled anew each epoch by `seed` (a batch may span two
  epochs). Every process gets the same batches, as each generates for the whole global batch
  of prompts. The iterator's state is a JSON-able position.
  """
  if not len(prompts):
    raise UserError("There are no prompts to train on (none given, or none leaves "
                    "rl.max_completion_tokens in model.context_length); give shorter prompts "
                    "or raise model.context_length.")
  # A finite number of epochs: an endless repeat has length sys.maxsize, which Grain cannot
  # take the len() of once batched by one (a step of a single prompt).
  epochs = sys.maxsize // (2 * len(prompts))
  indices = grain.MapDataset.range(len(prompts)).shuffle(seed=seed).repeat(epochs)
  batches = indices.batch(prompts_per_step).map(
      lambda batch: {"prompt_index": np.asarray(batch, np.int32)})
  # No read-ahead threads: a batch is a few integers.
  return batches.to_iter_dataset(grain.ReadOptions(num_threads=0))
