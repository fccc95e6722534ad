"""Prompt files: the prompts of `llm-jax generate --prompt_file`."""

import json
import pathlib

from llm_jax.errors import UserError


def read_prompt_file(path) -> list[str]:
  """The prompts in `path`: a JSON string or {"prompt": ...} per line of a .jsonl file, else
  one prompt per line; blank lines are skipped."""
  path = pathlib.Path(path)
  if not path.is_file():
    problem = "is a directory" if path.is_dir() else "does not exist"
    raise UserError(f"--prompt_file {path} {problem}; give a file with one prompt per line.")
  try:
    text = path.read_text(encoding="utf-8")
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
