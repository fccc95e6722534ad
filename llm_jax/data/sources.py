"""Text sources: random-access train and validation documents, read lazily.

`data.source` (or each entry of `data.mixture`) is one of

- `builtin`: this Python's standard library `.py` files (site-packages excluded): real text
  on every machine, no download;
- `files:<glob>`: local files; `.jsonl` files hold one document per line under
  `data.text_key`, any other file is one UTF-8 document;
- `tfds:<name>[/<config>][:<split>]`: a TFDS dataset prepared as ArrayRecord under
  `data.tfds_data_dir` (see `llm_jax.data.tfds_source`).

A source is indexed once (file byte ranges, or TFDS record numbers) and a document is read
only when the pipeline asks for it, so a corpus may be far larger than memory. Documents
that cannot be used are skipped and counted by reason. File sources split train/validation
by a hash of each document's path (and line), so the split does not depend on file order,
machine or process count; exact duplicates are kept once, since a copy on each side of the
split would leak validation text into training.
"""

import dataclasses
import glob
import hashlib
import json
import pathlib
import random
import sysconfig
import zlib
from typing import Protocol

import numpy as np

from llm_jax.errors import UserError

_HASH_BUCKETS = 10_000
SKIP_REASONS = ("unreadable", "binary", "undecodable", "empty", "duplicate", "not JSON",
                "missing text key")


class Documents(Protocol):
  """A Grain random-access data source of documents."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...


@dataclasses.dataclass
class Source:
  spec: str  # as written in the config, e.g. 'files:docs/*.md'
  train: Documents
  validation: Documents
  description: str
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n) or "none"
    return (f"{self.description}: {len(self.train)} train and {len(self.validation)} "
            f"validation documents; skipped: {skipped}")


class FileDocuments:
  """Documents stored as byte ranges of local files, decoded when read."""

  def __init__(self, paths: list[pathlib.Path], refs: np.ndarray, text_key: str):
    self._paths = paths
    self._refs = refs  # rows of (path index, byte offset, byte length, is JSON line)
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._refs)

  def __getitem__(self, index: int) -> str:
    path_index, offset, length, is_json = (int(v) for v in self._refs[index])
    with open(self._paths[path_index], "rb") as f:
      f.seek(offset)
      text = f.read(length).decode("utf-8")
    return json.loads(text)[self._text_key] if is_json else text


class HeldOut:
  """Every `every`-th document of `documents` (held=True) or all the others (held=False)."""

  def __init__(self, documents: Documents, every: int, held: bool):
    self._documents, self._every, self._held = documents, every, held
    num_held = -(-len(documents) // every)
    self._length = num_held if held else len(documents) - num_held

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < self._length:
      raise IndexError(index)
    if self._held:
      return self._documents[index * self._every]
    return self._documents[index + index // (self._every - 1) + 1]


def _in_validation(key: str, val_fraction: float) -> bool:
  return zlib.crc32(key.encode()) % _HASH_BUCKETS < val_fraction * _HASH_BUCKETS


class _FileIndexer:
  """Scans files once, keeping byte ranges of usable documents and counting the rest."""

  def __init__(self, root: pathlib.Path, text_key: str, val_fraction: float):
    self.root, self.text_key, self.val_fraction = root, text_key, val_fraction
    self.paths: list[pathlib.Path] = []
    self.refs = {"train": [], "validation": []}
    self.skipped = dict.fromkeys(SKIP_REASONS, 0)
    self._seen: set[bytes] = set()

  def add_file(self, path: pathlib.Path) -> None:
    try:
      raw = path.read_bytes()
    except OSError:
      self.skipped["unreadable"] += 1
      return
    self.paths.append(path)
    key = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) \
        else path.as_posix()
    if path.suffix == ".jsonl":
      offset = 0
      for line_number, line in enumerate(raw.splitlines(keepends=True)):
        self._add_json_line(line, offset, f"{key}:{line_number}")
        offset += len(line)
    else:
      self._add_text(raw, 0, key)

  def _add_text(self, raw: bytes, offset: int, key: str) -> None:
    if b"\x00" in raw:
      self.skipped["binary"] += 1
      return
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      self.skipped["undecodable"] += 1
      return
    self._keep(text, raw, offset, key, is_json=False)

  def _add_json_line(self, line: bytes, offset: int, key: str) -> None:
    if not line.strip():
      return  # blank lines separate nothing in JSON Lines; not a document
    try:
      record = json.loads(line)
    except UnicodeDecodeError:
      self.skipped["undecodable"] += 1
      return
    except json.JSONDecodeError:
      self.skipped["not JSON"] += 1
      return
    if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
      self.skipped["missing text key"] += 1
      return
    self._keep(record[self.text_key], line, offset, key, is_json=True)

  def _keep(self, text: str, raw: bytes, offset: int, key: str, is_json: bool) -> None:
    if not text.strip():
      self.skipped["empty"] += 1
      return
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    if digest in self._seen:
      self.skipped["duplicate"] += 1
      return
    self._seen.add(digest)
    split = "validation" if _in_validation(key, self.val_fraction) else "train"
    self.refs[split].append((len(self.paths) - 1, offset, len(raw), is_json))

  def documents(self, split: str) -> FileDocuments:
    refs = np.asarray(self.refs[split], dtype=np.int64).reshape(-1, 4)
    return FileDocuments(self.paths, refs, self.text_key)


def _builtin_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
  return root, files


def _glob_files(pattern: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  files = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)]
  files = [p for p in files if p.is_file()]
  root = pathlib.Path(glob.escape(pattern).split("*")[0] or ".").parent
  return root, files


def open_files(spec: str, text_key: str, val_fraction: float) -> Source:
  """The `builtin` or `files:<glob>` source, indexed."""
  if spec == "builtin":
    root, files = _builtin_files()
    description = f"builtin corpus (Python stdlib at {root})"
  else:
    pattern = spec.removeprefix("files:")
    root, files = _glob_files(pattern)
    description = f"files matching {pattern!r}"
    if not files:
      raise UserError(f"data.source={spec!r} matches no files; check the glob "
                      "(use ** with quotes for subdirectories).")
  indexer = _FileIndexer(root, text_key, val_fraction)
  for path in sorted(files):
    indexer.add_file(path)
  source = Source(spec, indexer.documents("train"), indexer.documents("validation"),
                  description, indexer.skipped)
  return _ensure_both_splits(source, indexer)


def open_all_files(pattern: str, text_key: str) -> Documents:
  """Every usable document of the files matching `pattern`, unsplit (e.g. to evaluate on)."""
  root, files = _glob_files(pattern)
  if not files:
    raise UserError(f"{pattern!r} matches no files; check the glob (use ** with quotes for "
                    "subdirectories).")
  indexer = _FileIndexer(root, text_key, val_fraction=0.0)  # nothing hashes below 0
  for path in sorted(files):
    indexer.add_file(path)
  documents = indexer.documents("train")
  if not len(documents):
    skipped = ", ".join(f"{n} {reason}" for reason, n in indexer.skipped.items() if n)
    raise UserError(f"No usable text in the files matching {pattern!r} (skipped: {skipped}); "
                    "point it at UTF-8 text.")
  return documents


def _ensure_both_splits(source: Source, indexer: _FileIndexer) -> Source:
  total = len(source.train) + len(source.validation)
  if total == 0:
    hint = (f"give JSON objects with a string under data.text_key={indexer.text_key!r}"
            if any(p.suffix == ".jsonl" for p in indexer.paths) else "point it at UTF-8 text")
    raise UserError(f"No usable text in {source.description} ({source.summary()}); {hint}.")
  if total < 2:
    raise UserError(f"{source.description} has a single usable document; a train and a "
                    "validation split need at least two, so add documents.")
  # A tiny corpus may hash every document to one side; move one across so both exist.
  if not len(source.validation):
    indexer.refs["validation"].append(indexer.refs["train"].pop())
  if not len(source.train):
    indexer.refs["train"].append(indexer.refs["validation"].pop())
  source.train = indexer.documents("train")
  source.validation = indexer.documents("validation")
  return source


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
    return open_files(spec, data_config.text_key, data_config.val_fraction)
  if spec.startswith("tfds:"):
    from llm_jax.data import tfds_source  # TFDS is imported only when it is used
    return tfds_source.open_tfds(spec, data_config.tfds_data_dir, data_config.text_key,
                                 data_config.val_fraction)
  raise UserError(f"data.source={spec!r} is not a known source; use 'builtin', "
                  "'files:<glob>' or 'tfds:<name>[/<config>][:<split>]'.")


def open_sources(data_config) -> list[tuple[Source, float]]:
  """The configured sources with their share of training tokens (summing to 1)."""
  if data_config.mixture:
    if data_config.source != "builtin":
      raise UserError(f"Both data.source={data_config.source!r} and data.mixture are set; "
                      "list every source in data.mixture and leave data.source at 'builtin'.")
    return [(open_source(spec, data_config), weight)
            for spec, weight in parse_mixture(data_config.mixture)]
  return [(open_source(data_config.source, data_config), 1.0)]


def text_sample(mixture: list[tuple[Source, float]], budget_bytes: int, seed: int):
  """Yields random training documents, about `budget_bytes` of text shared out by weight."""
  rng = random.Random(seed)
  for source, weight in mixture:
    budget, used = budget_bytes * weight, 0
    # A sample, not a permutation: a TFDS split may hold hundreds of millions of documents.
    for index in rng.sample(range(len(source.train)), min(len(source.train), 1_000_000)):
      if used >= budget:
        break
      text = source.train[index]
      used += len(text)
      yield text
