"""Prompt files (`generate --prompt_file`): what counts as a prompt, and bad files refused."""

import json

import pytest

from llm_jax.data.prompts import read_prompt_file
from llm_jax.errors import UserError


def test_a_text_file_holds_one_prompt_per_non_blank_line_kept_verbatim(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text('def f(\n\n   \n  indented  \n"not json"\n', encoding="utf-8")
  assert read_prompt_file(path) == ["def f(", "  indented  ", '"not json"']


def test_a_jsonl_file_holds_json_strings_or_prompt_objects(tmp_path):
  path = tmp_path / "prompts.jsonl"
  lines = [json.dumps("line\nbreak"), "", json.dumps({"prompt": "class A", "id": 3})]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  assert read_prompt_file(path) == ["line\nbreak", "class A"]


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, "does not exist"),
    ("blank.txt", b"\n  \n", "holds no prompts"),
    ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'"ok"\n{not json}\n', "Line 2"),
    ("no_prompt.jsonl", b'{"text": "x"}\n', "Line 1"),
    ("number.jsonl", b"42\n", "Line 1"),
])
def test_bad_prompt_files_are_one_sentence(tmp_path, name, content, words):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(UserError, match=words):
    read_prompt_file(path)


def test_a_directory_is_not_a_prompt_file(tmp_path):
  with pytest.raises(UserError, match="is a directory"):
    read_prompt_file(tmp_path)
