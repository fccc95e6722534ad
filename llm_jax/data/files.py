"""Local files as a source: `builtin` (the Python standard library) and `files:<glob>` of
text, and the indexing that `chat:<glob>` (`llm_jax.data.conversations`) shares.

Files are indexed once (byte ranges of usable documents) and a document is read only when the
pipeline asks for it, so a corpus may be far larger than memory. `.jsonl` files hold one
document per line (for text, under `data.text_key`); any other file is one UTF-8 document.
A UTF-8 byte-order mark is skipped; a file in another encoding counts as undecodable.
Documents that cannot be used are skipped and counted by reason. The train/validation split is by a
hash of each document's path (and line), so it does not depend on file order, machine or
process count; exact duplicates are kept once, since a copy on each side of the split would
leak validation text into training.
"""

import codecs
import functools
import glob
import hashlib
import json
import pathlib
import sysconfig
import zlib

import numpy as np

from llm_jax.data.documents import Source
from llm_jax.errors import UserError

_HASH_BUCKETS = 10_000
_OTHER_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE,
               codecs.BOM_UTF16_BE)
SKIP_REASONS = ("unreadable", "binary", "undecodable", "empty", "duplicate", "not JSON",
                "missing text key")


class SkipDocument(Exception):
  """Raised by a record reader for a JSON line that is not a usable document."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def text_of(text_key: str, record) -> str:
  """The document of a text `.jsonl` line: the string under `text_key`."""
  if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
    raise SkipDocument("missing text key")
  return record[text_key]


class FileDocuments:
  """Documents stored as byte ranges of local files, decoded when read."""

  def __init__(self, paths: list[pathlib.Path], refs: np.ndarray, read_record):
    self._paths = paths
    self._refs = refs  # rows of (path index, byte offset, byte length, is JSON line)
    self._read_record = read_record  # a JSON line's record -> its document

  def __len__(self) -> int:
    return len(self._refs)

  def __getitem__(self, index: int) -> str:
    path_index, offset, length, is_json = (int(v) for v in self._refs[index])
    with open(self._paths[path_index], "rb") as f:
      f.seek(offset)
      text = f.read(length).decode("utf-8")
    return self._read_record(json.loads(text)) if is_json else text


def _in_validation(key: str, val_fraction: float) -> bool:
  return zlib.crc32(key.encode()) % _HASH_BUCKETS < val_fraction * _HASH_BUCKETS


class _FileIndexer:
  """Scans files once, keeping byte ranges of usable documents and counting the rest."""

  def __init__(self, root: pathlib.Path, val_fraction: float, read_record, json_only: bool):
    self.root, self.val_fraction = root, val_fraction
    self.read_record, self.json_only = read_record, json_only
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
    if self.json_only and path.suffix != ".jsonl":
      self._skip("not JSON Lines")
      return
    self.paths.append(path)
    key = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) \
        else path.as_posix()
    if raw.startswith(_OTHER_BOMS):  # UTF-16 or UTF-32: counted, as undecodable UTF-8 is
      self.skipped["undecodable"] += 1
      return
    # A UTF-8 byte-order mark is not part of the first document: its bytes start after it.
    offset = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    if path.suffix == ".jsonl":
      for line_number, line in enumerate(raw[offset:].splitlines(keepends=True)):
        self._add_json_line(line, offset, f"{key}:{line_number}")
        offset += len(line)
    else:
      self._add_text(raw[offset:], offset, key)

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
    try:  # decoded as `FileDocuments` decodes it, not by json's guess of the encoding
      record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
      self.skipped["undecodable"] += 1
      return
    except json.JSONDecodeError:
      self.skipped["not JSON"] += 1
      return
    try:
      document = self.read_record(record)
    except SkipDocument as e:
      self._skip(e.reason)
      return
    self._keep(document, line, offset, key, is_json=True)

  def _skip(self, reason: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1

  def _keep(self, document, raw: bytes, offset: int, key: str, is_json: bool) -> None:
    text = document if isinstance(document, str) else json.dumps(document, sort_keys=True)
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
    return FileDocuments(self.paths, refs, self.read_record)


def _builtin_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
  return root, files


def _glob_files(pattern: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  files = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)]
  files = [p for p in files if p.is_file()]
  root = pathlib.Path(glob.escape(pattern).split("*")[0] or ".").parent
  return root, files


def open_files(spec: str, val_fraction: float, *, text_key: str = "text", read_record=None,
               kind: str = "text", hint: str = "", split: bool = True) -> Source:
  """`builtin`, or the files matching a glob (`files:` prefix optional), indexed.

  `read_record` turns a `.jsonl` line's record into a document (default: the text under
  `text_key`; a source of other documents, such as conversations, reads only `.jsonl`).
  With `split=False` every document is in `.train` (to evaluate on), else documents are
  split by hash and both splits are made non-empty. `hint` says what usable input looks
  like when none is found.
  """
  if spec == "builtin":
    root, paths = _builtin_files()
    description = f"builtin corpus (Python stdlib at {root})"
  else:
    pattern = spec.removeprefix("files:")
    root, paths = _glob_files(pattern)
    description = f"{'files' if kind == 'text' else kind + ' files'} matching {pattern!r}"
    if not paths:
      raise UserError(f"{pattern!r} matches no files; check the glob (use ** with quotes for "
                      "subdirectories).")
  indexer = _FileIndexer(root, val_fraction if split else 0.0,  # nothing hashes below 0
                         read_record or functools.partial(text_of, text_key),
                         json_only=read_record is not None)
  for path in sorted(paths):
    indexer.add_file(path)
  source = Source(spec, indexer.documents("train"), indexer.documents("validation"),
                  description, indexer.skipped, kind)
  if not hint:
    hint = (f"give JSON objects with a string under data.text_key={text_key!r}"
            if any(p.suffix == ".jsonl" for p in indexer.paths) else "point it at UTF-8 text")
  return _ensure_both_splits(source, indexer, hint) if split else _ensure_any(source, hint)


_USABLE = {"text": "text", "chat": "conversation", "preferences": "preference pair",
           "prompts": "prompt"}


def _ensure_any(source: Source, hint: str) -> Source:
  if not len(source.train):
    raise UserError(f"No usable {_USABLE[source.kind]} in {source.description} "
                    f"({source.summary()}); {hint}.")
  return source


def _ensure_both_splits(source: Source, indexer: _FileIndexer, hint: str) -> Source:
  total = len(source.train) + len(source.validation)
  if total == 0:
    raise UserError(f"No usable {_USABLE[source.kind]} in {source.description} "
                    f"({source.summary()}); {hint}.")
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
