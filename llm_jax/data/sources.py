"""Text sources: the built-in corpus and local files, split by document into train/val.

`builtin` is the running interpreter's standard library (`*.py` under sysconfig's
`stdlib` path, site-packages excluded): real text on every machine, no download. A document
is one file; exact duplicates are kept once. The validation split is chosen by a hash of
each file's path relative to the source root, so it does not depend on file order, machine
or process count.
"""

import dataclasses
import glob
import hashlib
import pathlib
import sysconfig
import zlib

from llm_jax.errors import UserError

_HASH_BUCKETS = 10_000


@dataclasses.dataclass
class Corpus:
  train: list[str]
  validation: list[str]
  description: str
  skipped: dict[str, int]  # reason -> count of files skipped for it

  def summary(self) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in self.skipped.items() if n) or "none"
    return (f"{self.description}: {len(self.train)} train and {len(self.validation)} "
            f"validation documents; skipped: {skipped}")


def _builtin_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
  return root, files


def _glob_files(pattern: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  files = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)]
  files = [p for p in files if p.is_file()]
  root = pathlib.Path(glob.escape(pattern).split("*")[0] or ".").parent
  return root, files


def load_corpus(source: str, val_fraction: float) -> Corpus:
  """Reads every document of `source`; undecodable, binary or empty files are skipped."""
  if source == "builtin":
    root, files = _builtin_files()
    description = f"builtin corpus (Python stdlib at {root})"
  elif source.startswith("files:"):
    pattern = source.removeprefix("files:")
    root, files = _glob_files(pattern)
    description = f"files matching {pattern!r}"
    if not files:
      raise UserError(f"data.source={source!r} matches no files; check the glob "
                      "(use ** with quotes for subdirectories).")
  else:
    raise UserError(f"data.source={source!r} is not a known source; use 'builtin' or "
                    "'files:<glob>'.")

  skipped = {"unreadable": 0, "binary": 0, "undecodable": 0, "empty": 0, "duplicate": 0}
  seen = set()  # exact copies (the stdlib ships some) would leak validation into training
  train, validation = [], []
  for path in sorted(files):
    try:
      raw = path.read_bytes()
    except OSError:
      skipped["unreadable"] += 1
      continue
    if b"\x00" in raw:
      skipped["binary"] += 1
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      skipped["undecodable"] += 1
      continue
    if not text.strip():
      skipped["empty"] += 1
      continue
    digest = hashlib.sha256(raw).digest()
    if digest in seen:
      skipped["duplicate"] += 1
      continue
    seen.add(digest)
    key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    in_validation = zlib.crc32(key.encode()) % _HASH_BUCKETS < val_fraction * _HASH_BUCKETS
    (validation if in_validation else train).append(text)

  corpus = Corpus(train, validation, description, skipped)
  total = len(train) + len(validation)
  if total == 0:
    raise UserError(f"No usable text in {description} ({corpus.summary()}); point "
                    "data.source at UTF-8 text files.")
  if total < 2:
    raise UserError(f"{description} has a single usable document; a train and a validation "
                    "split need at least two, so add files.")
  # A tiny corpus may hash every document to one side; move one across so both exist.
  if not validation:
    validation.append(train.pop())
  if not train:
    train.append(validation.pop())
  return corpus
