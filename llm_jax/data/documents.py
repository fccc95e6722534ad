"""What a source is: random-access documents (texts, conversations, preference pairs or
prompts), split into train and validation."""

import dataclasses
from typing import Protocol


class Documents(Protocol):
  """A Grain random-access data source of documents."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int): ...  # a str, a conversation or a dict (`Source.kind`)


@dataclasses.dataclass
class Source:
  spec: str  # as written in the config, e.g. 'files:docs/*.md'
  train: Documents
  validation: Documents
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  # What a document is: "text" (a string), "chat" (a list of messages), "preferences" (a
  # pair: a dict of prompt, chosen and rejected messages) or "prompts" (a dict of the prompt's
  # messages, the line's other "fields" and the prompt as "given").
  kind: str = "text"

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n) or "none"
    return (f"{self.description}: {len(self.train)} train and {len(self.validation)} "
            f"validation documents; skipped: {skipped}")


class HeldOut:
  """Every `every`-th document of `documents` (held=True) or all the others (held=False)."""

  def __init__(self, documents: Documents, every: int, held: bool):
    self._documents, self._every, self._held = documents, every, held
    num_held = -(-len(documents) // every)
    self._length = num_held if held else len(documents) - num_held

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if not 0 <= index < self._length:
      raise IndexError(index)
    if self._held:
      return self._documents[index * self._every]
    return self._documents[index + index // (self._every - 1) + 1]


class Subset:
  """The documents of `documents` at `indices`, in that order."""

  def __init__(self, documents: Documents, indices):
    self._documents, self._indices = documents, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._documents[int(self._indices[index])]
