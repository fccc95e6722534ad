"""Paths and files: checks of the paths a run or a command writes into, made before any work
is done (a bad path fails at once with one sentence, and nothing already written is
overwritten); writing a file whole or not at all; running a Python file given by its path.
"""

import importlib.util
import os
import pathlib
import shutil
from collections.abc import Callable

from llm_jax.errors import UserError


def _refuse_a_file_on_the_way(path: pathlib.Path, value: str | os.PathLike, option: str) -> None:
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise UserError(f"{option} {value} cannot be used: {existing} is a file, not a directory; "
                    f"choose another {option}.")


def check_directory(value: str | os.PathLike, option: str) -> pathlib.Path:
  """An option's `value` as a directory to write into (made if missing); refused if it or a
  parent is a file."""
  path = pathlib.Path(value).expanduser()
  _refuse_a_file_on_the_way(path, value, option)
  return path


def check_new_file(value: str | os.PathLike, option: str, replace: bool = False) -> pathlib.Path:
  """An option's `value` as a file to write; refused if it is a directory or lies under a
  file, and unless `replace`, if it exists: nothing already written is overwritten."""
  path = pathlib.Path(value).expanduser()
  if path.is_dir():
    raise UserError(f"{option} {value} is a directory; give the path of a file.")
  if path.exists() and not replace:
    raise UserError(f"{path} already exists; choose another {option} (nothing was overwritten).")
  _refuse_a_file_on_the_way(path.parent, value, option)
  return path


def undo_new_entries(directory: pathlib.Path) -> Callable[[], None]:
  """A function that removes what is made under `directory` after this call: the directory
  (and any parents made with it) if it does not exist yet, else its new entries only."""
  directory = directory.absolute()
  missing = [p for p in (directory, *directory.parents) if not p.exists()]
  if missing:
    return lambda: shutil.rmtree(missing[-1], ignore_errors=True)
  before = set(os.listdir(directory)) if directory.is_dir() else None

  def remove() -> None:
    for name in set(os.listdir(directory)) - before if before is not None else ():
      path = directory / name
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink(missing_ok=True)
  return remove


def write_atomically(path: pathlib.Path, data: str | bytes) -> None:
  """Writes `path` whole or not at all (text as UTF-8): a crash never leaves half a file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data.encode() if isinstance(data, str) else data)
  tmp.replace(path)


def import_file(path: pathlib.Path, name: str):
  """The module the Python file `path` defines, run as `name`."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
