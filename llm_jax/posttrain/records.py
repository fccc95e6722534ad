"""What a post-training method learns from: the records of one source of its kind (preference
pairs, prompts) that fit the context, with the run's tokenizer and chat format."""

import dataclasses
import pathlib
from collections.abc import Callable

from llm_jax.data import chat_template, sources
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.data.chat_template import ChatFormat
from llm_jax.data.documents import Documents, Subset
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import UserError
from llm_jax.parallel.distributed import log

_NAMES = {"preferences": ("trains on preference pairs", "pair"),
          "prompts": ("learns from answers to prompts", "prompt")}


@dataclasses.dataclass
class Records:
  """A run's records that fit, and how they are encoded."""
  tokenizer: Tokenizer
  chat_format: ChatFormat
  train: Documents
  validation: Documents
  spec: str


def open_records(config, workdir: pathlib.Path, inherited_tokenizer: bytes | None, kind: str,
                 room: int, statistics: Callable, room_note: str, fix: str) -> Records:
  """The records of `data.source` (one `kind:` source) whose encoding fits `room` tokens.

  One pass over each split (`statistics(documents, chat_format, room)` -> (counts with `used`
  and `too_long`, used indices)) logs how many were left out as longer than `room_note`; none
  in training is refused, saying what helps (`fix`). The tokenizer is the run's
  (`tokenizer.for_run`, written into `workdir`).
  """
  what, one = _NAMES[kind]
  if config.data.mixture or not config.data.source.startswith(f"{kind}:"):
    raise UserError(f"objective.name={config.objective.name!r} {what}; set "
                    f"--config.data.source='{kind}:<glob>' (and no data.mixture).")
  source = sources.open_source(config.data.source, config.data)
  log(source.summary())
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = tokenizer_lib.for_run(config, [(source, 1.0)], workdir, inherited_tokenizer)
  chat_format = chat_template.chat_format(tokenizer)
  fitting = {}
  for split in ("train", "validation"):
    documents = getattr(source, split)
    counts, used = statistics(documents, chat_format, room)
    log(f"{source.spec}, {split}: {counts['used']} {one}s used, {counts['too_long']} skipped "
        f"as longer than {room_note}")
    fitting[split] = Subset(documents, used)
  if not len(fitting["train"]):
    raise UserError(f"No training {one} of {source.spec} fits in {room} tokens, so there is "
                    f"nothing to train on; {fix}.")
  return Records(tokenizer, chat_format, fitting["train"], fitting["validation"], source.spec)
