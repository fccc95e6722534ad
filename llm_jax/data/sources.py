"""Text sources by name, and mixtures of them.

`data.source` (or each entry of `data.mixture`) is one of

- `builtin`: this Python's standard library `.py` files (site-packages excluded): real text
  on every machine, no download;
- `files:<glob>`: local files (`llm_jax.data.files`);
- `tfds:<name>[/<config>][:<split>]`: a TFDS dataset prepared as ArrayRecord under
  `data.tfds_data_dir` (`llm_jax.data.tfds_source`);
- `chat:<glob>`: conversations in `.jsonl` files (`llm_jax.data.conversations`), trained on
  through the chat template with targets on the assistant's turns only;
- `preferences:<glob>`: preference pairs (a prompt, a chosen and a rejected response) in
  `.jsonl` files (`llm_jax.data.preferences`), for reward models and DPO;
- `prompts:<glob>`: prompts with the fields a reward function judges answers by, in `.jsonl`
  files (`llm_jax.data.prompts`), for RL (GRPO).

Each opens as a `Source`: random-access train and validation documents, read lazily.
"""

import random

from llm_jax.data import conversations, files, preferences, prompts
from llm_jax.data.documents import Source
from llm_jax.errors import UserError


def parse_mixture(mixture: str) -> list[tuple[str, float]]:
  """'builtin=3; files:docs/*.md=1' -> [('builtin', 0.75), ('files:docs/*.md', 0.25)]."""
  entries = []
  for entry in filter(None, (e.strip() for e in mixture.split(";"))):
    spec, sep, weight_text = entry.rpartition("=")
    try:
      weight = float(weight_text) if sep else float("nan")
    except ValueError:
      weight = float("nan")
    if not spec.strip() or not weight > 0:  # also rejects NaN
      raise UserError(f"data.mixture entry {entry!r} is not SOURCE=WEIGHT with a positive "
                      "weight; write e.g. 'builtin=3; files:docs/*.md=1'.")
    entries.append((spec.strip(), weight))
  total = sum(w for _, w in entries)
  return [(spec, w / total) for spec, w in entries]


def open_source(spec: str, data_config) -> Source:
  if spec == "builtin" or spec.startswith("files:"):
    return files.open_files(spec, data_config.val_fraction, text_key=data_config.text_key)
  if spec.startswith("chat:"):
    return conversations.open_chat(spec, data_config.val_fraction)
  if spec.startswith("preferences:"):
    return preferences.open_preferences(spec, data_config.val_fraction)
  if spec.startswith("prompts:"):
    return prompts.open_prompts(spec, data_config.val_fraction)
  if spec.startswith("tfds:"):
    from llm_jax.data import tfds_source  # TFDS is imported only when it is used
    return tfds_source.open_tfds(spec, data_config.tfds_data_dir, data_config.text_key,
                                 data_config.val_fraction)
  raise UserError(f"data.source={spec!r} is not a known source; use 'builtin', "
                  "'files:<glob>', 'tfds:<name>[/<config>][:<split>]', 'chat:<glob>', "
                  "'preferences:<glob>' or 'prompts:<glob>'.")


def open_sources(data_config) -> list[tuple[Source, float]]:
  """The configured sources with their share of training tokens (summing to 1)."""
  if data_config.mixture:
    if data_config.source != "builtin":
      raise UserError(f"Both data.source={data_config.source!r} and data.mixture are set; "
                      "list every source in data.mixture and leave data.source at 'builtin'.")
    return [(open_source(spec, data_config), weight)
            for spec, weight in parse_mixture(data_config.mixture)]
  return [(open_source(data_config.source, data_config), 1.0)]


def _text_of(kind: str, document) -> str:
  """The words of a document of a source of `kind` (`Source.kind`) as plain text."""
  if kind == "chat":
    return conversations.contents(document)
  if kind == "preferences":
    return preferences.contents(document)
  if kind == "prompts":
    return prompts.contents(document)
  return document


def text_sample(mixture: list[tuple[Source, float]], budget_bytes: int, seed: int):
  """Yields random training documents, about `budget_bytes` of text shared out by weight."""
  rng = random.Random(seed)
  for source, weight in mixture:
    budget, used = budget_bytes * weight, 0
    # A sample, not a permutation: a TFDS split may hold hundreds of millions of documents.
    for index in rng.sample(range(len(source.train)), min(len(source.train), 1_000_000)):
      if used >= budget:
        break
      text = _text_of(source.kind, source.train[index])
      used += len(text)
      yield text
